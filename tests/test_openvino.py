"""The OpenVINO CPU backend (`ov-cpu`) is held to what ONNX Runtime is held to: the same outputs
within `aldm check`'s FP32 tolerances on every component and batch size, `aldm check` passing on the
golden model, the same translation through aldm-infer; `auto` prefers it on a CPU; without
openvino it says so in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from aldm.errors import BackendError, ModelError
from aldm.runtime.backends import BACKENDS, DEFAULT_PRECISION, auto_order, make_runners, ov_available, single_backend
from aldm.runtime.compare import TOLERANCES, compare
from aldm.runtime.manifest import COMPONENTS, ModelDir, sample_feeds
from conftest import rel_err, synthetic_volume, write_nifti

needs_ov = pytest.mark.skipif(not ov_available(), reason="openvino is not installed (pip install 'aldm[cpu]')")


def _feeds(md, component, batch, seed):
    return sample_feeds(md.component(component), batch, seed, timesteps=md.manifest.schedule.timesteps)


def test_ov_cpu_is_a_backend_with_fp32_by_default():
    assert "ov-cpu" in BACKENDS and DEFAULT_PRECISION["ov-cpu"] == "fp32"


@needs_ov
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_compile_runs_fp32_never_bf16(tiny_export, tmp_path, precision):
    """The README's promise: ov-cpu computes in FP32 on every CPU, bf16 units or not, for every
    precision variant (a variant's own file carries its FP16 weights)."""
    import shutil

    from aldm.export.precision import add_fp16_variant
    from aldm.runtime.openvino import OvRunner

    d = tmp_path / "m"
    shutil.copytree(tiny_export, d)
    if precision == "fp16":
        add_fp16_variant(d, say=lambda s: None)
    md = ModelDir(d)
    spec = md.component("decoder")
    r = OvRunner(md.component_file("decoder", precision), spec, precision=precision)
    r.infer(sample_feeds(spec, 1, 0))
    (compiled, *_), = r.compiled.values()
    assert "f32" in str(compiled.get_property("INFERENCE_PRECISION_HINT")).lower() or \
        "float32" in str(compiled.get_property("INFERENCE_PRECISION_HINT")).lower()


@needs_ov
@pytest.mark.parametrize("batch", [1, 3])
def test_every_component_matches_onnx_runtime_within_the_fp32_tolerances(tiny_export, batch):
    md = ModelDir(tiny_export)
    ov, ort = single_backend(md, "ov-cpu"), single_backend(md, "ort-cpu")
    for i, c in enumerate(COMPONENTS):
        feeds = _feeds(md, c, batch, seed=10 * batch + i)
        got, ref = ov[c].infer(feeds), ort[c].infer(feeds)
        assert ov[c].name == "ov-cpu" and set(got) == {t.name for t in md.component(c).outputs}
        for t in md.component(c).outputs:
            assert got[t.name].dtype == np.dtype(t.dtype) and got[t.name].shape == t.concrete(batch)
            r = compare(c, "ov-cpu/fp32", got[t.name], ref[t.name], TOLERANCES["fp32"][c])
            assert r, f"{c} at batch {batch}: {r}"
            if c == "encoder":  # no ties here: every latent position picks ONNX Runtime's code
                assert r.code_agreement == 1.0


@needs_ov
def test_int64_inputs_reach_the_graph(tiny_export, tmp_path):
    """y (int64) steers the MS-SPADE as it does on ONNX Runtime; and on a small graph, int64
    values go in and come out exactly (OpenVINO's CPU plugin computes integers in int32: every
    timestep and class fits)."""
    md = ModelDir(tiny_export)
    ov, ort = single_backend(md, "ov-cpu")["spade"], single_backend(md, "ort-cpu")["spade"]
    base = _feeds(md, "spade", 2, seed=0)
    outs = []
    for y in ([0, 1], [3, 2]):
        feeds = base | {"y": np.array(y, np.int64)}
        got, ref = ov.infer(feeds)["z_tgt"], ort.infer(feeds)["z_tgt"]
        assert rel_err(got, ref) <= TOLERANCES["fp32"]["spade"].rtol
        outs.append(got)
    assert rel_err(outs[0], outs[1]) > 0.1  # the classes do matter here

    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from aldm.runtime.manifest import ComponentSpec, TensorSpec
    from aldm.runtime.openvino import OvRunner

    graph = helper.make_graph(
        [helper.make_node("Cast", ["t"], ["tf"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["tf", "x"], ["s"]),
         helper.make_node("Add", ["t", "one"], ["n"])],
        "ints", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"]),
                 helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("n", TensorProto.INT64, ["batch"])],
        [helper.make_tensor("one", TensorProto.INT64, [], [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "ints.onnx")
    spec = ComponentSpec("ints", "ints.onnx", (TensorSpec("x", ("batch",), "float32"), TensorSpec("t", ("batch",), "int64")),
                         (TensorSpec("s", ("batch",), "float32"), TensorSpec("n", ("batch",), "int64")))
    t = np.array([0, 999, 123456], np.int64)
    out = OvRunner(tmp_path / "ints.onnx", spec).infer({"x": np.full(3, 0.5, np.float32), "t": t})
    assert out["n"].dtype == np.int64 and out["s"].dtype == np.float32
    np.testing.assert_array_equal(out["n"], t + 1)
    np.testing.assert_array_equal(out["s"], t.astype(np.float32) + 0.5)


@needs_ov
def test_outputs_belong_to_the_caller_and_batch_sizes_alternate(tiny_export):
    md = ModelDir(tiny_export)
    runner = single_backend(md, "ov-cpu")["decoder"]
    a1, b3, a1_again = (_feeds(md, "decoder", b, s) for b, s in [(1, 0), (3, 1), (1, 0)])
    first = runner.infer(a1)["x_rec"]
    kept = first.copy()
    other = runner.infer(_feeds(md, "decoder", 1, 5))["x_rec"]  # same batch size: same request
    np.testing.assert_array_equal(first, kept)  # not overwritten by the next inference
    assert first.flags.owndata and first.flags.writeable and not np.shares_memory(first, other)
    first[...] = 0  # writing into it does not reach OpenVINO's buffers
    assert runner.infer(b3)["x_rec"].shape[0] == 3
    np.testing.assert_array_equal(runner.infer(a1_again)["x_rec"], kept)
    assert sorted(runner.compiled) == [((1, 4, 8, 8, 4),), ((3, 4, 8, 8, 4),)]  # one per shape, kept


@needs_ov
def test_past_a_few_shapes_one_dynamic_compile_serves_the_rest(tiny_export, monkeypatch):
    from aldm.runtime import openvino

    monkeypatch.setattr(openvino, "MAX_COMPILED", 2)
    md = ModelDir(tiny_export)
    ov, ort = single_backend(md, "ov-cpu")["spade"], single_backend(md, "ort-cpu")["spade"]
    for batch in (1, 2, 3, 4, 1, 3):
        feeds = _feeds(md, "spade", batch, seed=batch)
        assert rel_err(ov.infer(feeds)["z_tgt"], ort.infer(feeds)["z_tgt"]) <= TOLERANCES["fp32"]["spade"].rtol
    assert sorted(k[0][0] for k in ov.compiled if k is not None) == [1, 2] and None in ov.compiled
    assert len(ov.compiled) == 3


@needs_ov
def test_auto_prefers_openvino_on_the_cpu(tiny_export):
    md = ModelDir(tiny_export)
    order = auto_order(md)
    assert order.index("ov-cpu") < order.index("ort-cpu")
    assert auto_order(md, trt_ok=False, cuda_ok=False) == ["ov-cpu", "ort-cpu"]
    if order[0] == "ov-cpu":  # no GPU backend here
        runners = make_runners(md, "auto")
        assert {r.name for r in runners.values()} == {"ov-cpu"}
        assert all(type(r).__name__ == "OvRunner" for r in runners.values())


def test_without_openvino_the_backend_says_so_in_one_line(tiny_export, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    md = ModelDir(tiny_export)
    assert not ov_available()
    assert auto_order(md, trt_ok=False, cuda_ok=False) == ["ort-cpu"]
    assert {r.name for r in make_runners(md, "auto").values()} <= {"ort-cpu", "ort-cuda", "trt"}
    runner = single_backend(md, "ov-cpu")["unet"]  # made without openvino; it is needed to run
    with pytest.raises(BackendError) as e:
        runner.infer(_feeds(md, "unet", 1, 0))
    assert str(e.value) == ("the ov-cpu backend needs OpenVINO, which is not installed "
                            "(pip install 'aldm[cpu]', or choose --backend ort-cpu)")

    from typer.testing import CliRunner

    from aldm.cli.infer import app

    src = write_nifti(md.path.parent / "no_ov_t1.nii.gz", synthetic_volume())
    res = CliRunner().invoke(app, [str(src), "--model", str(tiny_export), "--targets", "t2", "--steps", "5",
                                   "--backend", "ov-cpu", "--out", str(md.path.parent / "no_ov"), "--quiet"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert "needs OpenVINO" in res.output and "Traceback" not in res.output


@needs_ov
def test_an_unreadable_graph_is_a_one_line_model_error(tiny_export, tmp_path):
    from aldm.runtime.openvino import OvRunner

    spec = ModelDir(tiny_export).component("unet")
    for path, why in [(tmp_path / "garbage.onnx", "not an ONNX model"), (tmp_path / "nope.onnx", "no such file")]:
        if path.name == "garbage.onnx":
            path.write_bytes(b"garbage" * 100)
        with pytest.raises(ModelError) as e:
            OvRunner(path, spec).activate()
        assert str(e.value) == f"cannot load {path} in OpenVINO: {why}"


def test_openvino_messages_keep_the_line_that_says_what_went_wrong():
    from aldm.runtime.openvino import ov_message

    msg = ("Exception from src/inference/src/cpp/infer_request.cpp:224:\n"
           "Check 'getShape().isCompatible(dims)' failed at src/plugins/intel_cpu/src/memory_desc/cpu_memory_desc.h:99:\n"
           "ParameterMismatch: Can not clone with new dims.\n\n")
    assert ov_message(RuntimeError(msg)) == "ParameterMismatch: Can not clone with new dims."
    assert ov_message(RuntimeError("")) == "RuntimeError"


@needs_ov
def test_aldm_infer_with_ov_cpu_writes_what_ort_cpu_writes(tiny_export, tmp_path):
    """Real processes, as a user runs them: same seed, the same translation within the FP32
    tolerance; each sidecar names its backend."""
    src = write_nifti(tmp_path / "case01_t1.nii.gz", synthetic_volume())
    for backend in ("ov-cpu", "ort-cpu"):
        res = subprocess.run([sys.executable, "-m", "aldm.cli.infer", str(src), "--model", str(tiny_export),
                              "--targets", "t2,flair", "--steps", "5", "--seed", "3", "--backend", backend,
                              "--out", str(tmp_path / backend), "--quiet"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
    for target in ("t2", "flair"):
        name = f"case01_t1_{target}"
        ov, ort = (nib.load(str(tmp_path / b / f"{name}.nii.gz")) for b in ("ov-cpu", "ort-cpu"))
        assert ov.shape == ort.shape and np.array_equal(ov.affine, ort.affine)
        assert rel_err(ov.get_fdata(), ort.get_fdata()) <= TOLERANCES["fp32"]["decoder"].rtol
        sides = {b: json.loads((tmp_path / b / f"{name}.json").read_text()) for b in ("ov-cpu", "ort-cpu")}
        assert sides["ov-cpu"]["backend"] == "ov-cpu" and sides["ort-cpu"]["backend"] == "ort-cpu"
        assert sides["ov-cpu"]["seed"] == sides["ort-cpu"]["seed"]


@needs_ov
def test_aldm_check_passes_for_ov_cpu_on_the_golden_model(golden_export):
    from typer.testing import CliRunner

    from aldm.cli.main import app
    from aldm.export.check import available_backends

    assert "ov-cpu" in available_backends()
    res = CliRunner().invoke(app, ["check", str(golden_export), "--backends", "ov-cpu"])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.startswith(("PASS", "FAIL"))]
    # four components and the sampler-step graph, then the per-class MS-SPADE and the slab decoder
    # (what ov-cpu runs instead)
    assert len(lines) == 7 and all(line.startswith("PASS") and "ov-cpu/fp32" in line for line in lines), res.output
    assert lines[4].split()[1] == "unet_step"
    assert "codes=100.00%" in next(line for line in lines if "encoder" in line)


@needs_ov
def test_staged_means_stay_staged(tmp_path):
    """aldm exports a normalisation's mean one axis at a time (aldm.export.stable_norm); OpenVINO
    would merge the chain into one reduction over 16 M values, ~1e-6 off instead of ~1e-8 (which,
    layer after layer, put the bundled decoder at 1.03e-4 vs PyTorch and flipped encoder codes)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from aldm.runtime import openvino
    from aldm.runtime.manifest import ComponentSpec, TensorSpec

    shape, axes = [1, 1, 4, 144, 192, 144], [5, 4, 3, 2]  # one GroupNorm group of a full-size volume
    nodes, prev = [], "x"
    for a in axes:
        nodes.append(helper.make_node("ReduceMean", [prev, f"axis{a}"], [f"mean{a}"], keepdims=1))
        prev = f"mean{a}"
    graph = helper.make_graph(nodes, "staged", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1] * 6)],
                              [helper.make_tensor(f"axis{a}", TensorProto.INT64, [1], [a]) for a in axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "staged.onnx")
    spec = ComponentSpec("staged", "staged.onnx", (TensorSpec("x", tuple(shape), "float32"),),
                         (TensorSpec(prev, (1,) * 6, "float32"),))
    x = np.random.default_rng(0).uniform(1, 2, shape).astype(np.float32)
    exact = x.astype(np.float64).mean()
    runner = openvino.OvRunner(tmp_path / "staged.onnx", spec)
    got = float(runner.infer({"x": x})[prev].ravel()[0])
    assert abs(got - exact) / exact < 2e-7
    model = runner.model.clone()
    assert openvino.keep_staged(model) == 3  # every stage but the last


@needs_ov
def test_aldm_check_passes_for_ov_cpu_on_the_bundled_model():
    """The full-size bundled model (16 M-value normalisation groups, a trained codebook) through
    `aldm check` on ov-cpu: what `auto` runs on a CPU, held to the same tolerances as ORT."""
    import os

    from aldm.translator import default_model_dir

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    aldm = [sys.executable, "-c", "from aldm.cli.main import app; app()"]
    res = subprocess.run([*aldm, "check", str(default_model_dir()), "--precisions", "fp32",
                          "--backends", "ov-cpu", "--batch", "1"], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert len(lines) == 6 and all(ln.startswith("PASS") and "ov-cpu/fp32" in ln for ln in lines), res.stdout


@needs_ov
def test_an_ov_cpu_translation_never_imports_torch(tiny_export):
    from test_no_torch import run_without_torch

    res = run_without_torch(f"""
        import numpy as np
        from aldm.runtime.pipeline import Pipeline
        p = Pipeline.load({str(tiny_export)!r}, backend="ov-cpu")
        x = np.random.default_rng(0).uniform(-1, 1, (1, 1, 32, 32, 16)).astype(np.float32)
        tr = p.translate(x, ["t2", "flair"], steps=5, seed=0)
        assert p.backend == "ov-cpu" and all(np.isfinite(v).all() for v in tr.volumes.values())
    """)
    assert "NO-TORCH-OK" in res.stdout, res.stderr[-2000:]
