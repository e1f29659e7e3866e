"""Per-class MS-SPADE graphs: a CPU pipeline runs only the branch a target needs, with the same
result as the all-class graph."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from aldm.errors import ModelError
from aldm.runtime.manifest import ModelDir
from aldm.runtime.pipeline import Pipeline
from aldm.runtime.runners import OrtRunner
from conftest import rel_err


@pytest.mark.parametrize("backend", ["ort-cpu", "ov-cpu"])
def test_per_class_graphs_equal_the_all_class_graph_row_by_row(tiny_export, backend):
    with Pipeline.load(tiny_export, backend=backend) as pipe:
        assert pipe.spade_classes is not None and len(pipe.spade_classes) == 4
        z = np.random.default_rng(0).standard_normal((5,) + tuple(pipe.manifest.latent_shape)).astype(np.float32)
        y = np.array([2, 0, 3, 2, 1], np.int64)  # mixed, one repeated
        got = pipe.spade(z, y)
    whole = OrtRunner(ModelDir(tiny_export).component_file("spade"), ModelDir(tiny_export).component("spade"))
    ref = whole.infer({"z": z, "y": y})["z_tgt"]
    assert rel_err(got, ref) <= 1e-5
    for i in range(5):  # each row is its own class's result, not a neighbour's
        assert rel_err(got[i], ref[i]) <= 1e-5


def test_the_per_class_graphs_hold_a_quarter_of_the_branch_work(tiny_export):
    from aldm.runtime.flops import graph_flops

    m = ModelDir(tiny_export)
    whole = graph_flops(m.component_file("spade"))["flops"]
    one = graph_flops(m.file(m.manifest.spade_per_class[0]))["flops"]
    assert one < whole / 2  # every branch runs in the all-class graph


def test_a_folder_without_them_uses_the_all_class_graph(tiny_export, tmp_path):
    d = Path(shutil.copytree(tiny_export, tmp_path / "m"))
    m = json.loads((d / "manifest.json").read_text())
    for f in m.pop("spade_per_class"):
        m["files"].pop(f)
        (d / f).unlink()
    (d / "manifest.json").write_text(json.dumps(m))
    with Pipeline.load(d, backend="ort-cpu") as old, Pipeline.load(tiny_export, backend="ort-cpu") as new:
        assert old.spade_classes is None
        z = np.random.default_rng(1).standard_normal((2,) + tuple(old.manifest.latent_shape)).astype(np.float32)
        y = np.array([3, 1], np.int64)
        assert rel_err(new.spade(z, y), old.spade(z, y)) <= 1e-5


@pytest.mark.parametrize("value, message", [
    (["spade_class0.onnx"], "one file per class"),
    ("spade_class0.onnx", "one file per class"),
    (["spade_class0.onnx", "spade_class1.onnx", "spade_class2.onnx", "../d.onnx"], "spade_per_class.3"),
])
def test_a_bad_per_class_list_is_one_clear_model_error(tiny_export, tmp_path, value, message):
    d = Path(shutil.copytree(tiny_export, tmp_path / "m"))
    m = json.loads((d / "manifest.json").read_text())
    m["spade_per_class"] = value
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match=message):
        ModelDir(d)
