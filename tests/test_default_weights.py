"""The bundled model's own PyTorch weights (issue 16 item 1): kept in the repository (not the wheel)
at models/default/last.ckpt, recovered from the FP32 ONNX graphs (scripts/recover_default_weights.py),
recorded with their sha256 in the manifest, and found by `aldm check` / the torch backend without a
path from another machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from aldm.translator import default_model_dir
from aldm.runtime.manifest import MANIFEST, ModelDir, sha256_file
from aldm.runtime.tiled import DEFAULT_TILE_ROWS
from conftest import REPO, rel_err

torch = pytest.importorskip("torch", reason="the PyTorch weights need the export extra")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from aldm.errors import BackendError, ModelError  # noqa: E402
from aldm.export.check import TorchRunner, source_checkpoint  # noqa: E402
from aldm.models import LDMConfig, load_official  # noqa: E402
from aldm.models.checkpoint import read_checkpoint  # noqa: E402

CKPT = REPO / "models" / "default" / "last.ckpt"
MAX_FILE_BYTES = 20 * 10**6


@pytest.fixture(scope="module")
def md():
    return ModelDir(default_model_dir())


@pytest.fixture(scope="module")
def models(md):
    cfg = LDMConfig.from_dict(md.manifest.config)
    return {ema: load_official(CKPT, config=cfg, ema=ema) for ema in (True, False)}


def test_weights_are_in_the_repository_and_recorded_in_the_manifest(md):
    src = md.manifest.source
    assert src["ldm_ckpt"] == "models/default/last.ckpt"  # relative: no path from another machine
    assert CKPT.is_file() and CKPT.stat().st_size <= MAX_FILE_BYTES
    assert sha256_file(CKPT) == src["ldm_sha256"]
    assert "vqgan_ckpt" not in src  # the first stage is inside the LDM file
    assert source_checkpoint(md) == CKPT.resolve()
    # in git, not in the wheel: package data is the model folder only
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert all(p == "py.typed" or p.startswith("assets/default_model/") for p in data["aldm"])
    if shutil.which("git") is None:
        return
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "models/default/last.ckpt"],
                             cwd=REPO, capture_output=True, text=True)
    if tracked.returncode != 0 and "not a git repository" not in tracked.stderr:
        pytest.fail(f"models/default/last.ckpt is not tracked by git: {tracked.stderr.strip()}")


def test_checkpoint_is_official_layout_without_optimizer_state(md):
    ck = read_checkpoint(CKPT)  # the hardened reader: no code runs
    assert "aldm_train" not in ck and "optimizer_states" not in ck
    sd = ck["state_dict"]
    unet = [k for k in sd if k.startswith("model.diffusion_model.")]
    ema = [k for k in sd if k.startswith("model_ema.") and k not in ("model_ema.decay",
                                                                    "model_ema.num_updates")]
    assert len(unet) == len(ema) > 0
    assert any(k.startswith("first_stage_model.") for k in sd) and "scale_factor" in sd
    assert float(sd["scale_factor"]) == pytest.approx(md.manifest.scale_factor, rel=1e-7)
    with np.load(md.file(md.manifest.schedule.file)) as z:
        for name in z.files:
            np.testing.assert_array_equal(sd[name].numpy(), z[name])
    assert ck["aldm_config"] == md.manifest.config


def test_every_weight_equals_the_graphs_and_ema_equals_raw(md, models):
    """Every parameter of the model loaded either way equals the initializer of the FP32 graph it
    came from, bit for bit: the graphs hold the EMA UNet, stored under both names."""
    from onnx import numpy_helper

    sd_ema, sd_raw = models[True].state_dict(), models[False].state_dict()
    seen = set()
    for c in ("encoder", "spade", "unet", "decoder"):
        g = onnx.load(str(md.component_file(c)))
        for init in g.graph.initializer:
            if init.name.startswith("m."):
                key = init.name[2:]
                arr = numpy_helper.to_array(init)
                np.testing.assert_array_equal(sd_ema[key].numpy(), arr, err_msg=key)
                np.testing.assert_array_equal(sd_raw[key].numpy(), arr, err_msg=key)
                seen.add(key)
    assert seen == set(sd_ema)  # nothing in the model that the graphs do not hold
    np.testing.assert_array_equal(models[True].alphas_cumprod, models[False].alphas_cumprod)


@pytest.mark.parametrize("component", ["spade", "unet"])
def test_loaded_model_matches_the_onnx_graph(md, models, component):
    """PyTorch on the recovered weights vs ONNX Runtime on the bundled graph (latent-sized
    components here; the encoder and decoder run in the `aldm check` test below)."""
    spec = md.component(component)
    from aldm.runtime.manifest import sample_feeds

    feeds = sample_feeds(spec, batch=1, seed=3, num_classes=4,
                         timesteps=md.manifest.schedule.timesteps)
    sess = ort.InferenceSession(str(md.component_file(component)),
                                providers=["CPUExecutionProvider"])
    out = spec.outputs[0].name
    got = sess.run([out], feeds)[0]
    expected = TorchRunner(models[True], component).infer(feeds)[out]
    assert rel_err(got, expected) < 1e-4


def test_aldm_check_finds_the_weights_and_passes():
    """`aldm check` of the bundled model, no --reference: all four components, ORT vs PyTorch."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    aldm = [sys.executable, "-c", "from aldm.cli.main import app; app()"]
    res = subprocess.run([*aldm, "check", str(default_model_dir()), "--precisions", "fp32",
                          "--backends", "ort-cpu", "--batch", "1"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    # the four components, then the graphs the CPU runs instead of two of them
    assert len(lines) == 6 and all(ln.startswith("PASS") for ln in lines), res.stdout
    assert "per class" in lines[4] and f"slabs of {DEFAULT_TILE_ROWS}" in lines[5], res.stdout


# ------------------------------------------------------------------- finding the weights


def _model_copy(folder, source: dict):
    """A model folder (manifest only: enough for `source_checkpoint`) with `source` replaced."""
    folder.mkdir(parents=True)
    d = json.loads((default_model_dir() / MANIFEST).read_text())
    d["source"] = source
    (folder / MANIFEST).write_text(json.dumps(d))
    return ModelDir(folder, verify=False)


def _bundled_source() -> dict:
    return dict(ModelDir(default_model_dir(), verify=False).manifest.source)


def test_relative_weights_resolve_from_a_checkout_above_the_model(tmp_path):
    """The nearest folder holding models/ or pyproject.toml that has the file wins; a nearer
    `models/` package without it (src/aldm/models) is passed over."""
    repo = tmp_path / "clone"
    (repo / "models" / "default").mkdir(parents=True)
    (repo / "pyproject.toml").write_text("")
    shutil.copyfile(CKPT, repo / "models" / "default" / "last.ckpt")
    (repo / "src" / "aldm" / "models").mkdir(parents=True)
    md = _model_copy(repo / "src" / "aldm" / "assets" / "default_model", _bundled_source())
    assert source_checkpoint(md) == (repo / "models" / "default" / "last.ckpt").resolve()


def test_absent_weights_say_what_to_pass(tmp_path):
    """An installed wheel: no checkout above the model folder. One line naming --reference."""
    md = _model_copy(tmp_path / "site-packages" / "aldm" / "assets" / "default_model",
                     _bundled_source())
    with pytest.raises(ModelError) as exc:
        source_checkpoint(md)
    msg = str(exc.value)
    assert "\n" not in msg and "--reference" in msg and "models/default/last.ckpt" in msg
    from aldm.export.torch_backend import torch_runners

    with pytest.raises(BackendError) as exc:
        torch_runners(md)
    assert "\n" not in str(exc.value) and "models/default/last.ckpt" in str(exc.value)


def test_absent_weights_cli_one_line(tmp_path):
    from typer.testing import CliRunner

    from aldm.cli.main import app

    # a full copy (the CLI verifies the folder) where no checkout is above it
    folder = tmp_path / "wheel" / "default_model"
    shutil.copytree(default_model_dir(), folder)
    res = CliRunner().invoke(app, ["check", str(folder), "--precisions", "fp32"])
    assert res.exit_code != 0
    assert "--reference" in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_replaced_weights_are_refused(tmp_path):
    repo = tmp_path / "clone"
    (repo / "models" / "default").mkdir(parents=True)
    (repo / "models" / "default" / "last.ckpt").write_bytes(b"not the recovered weights")
    md = _model_copy(repo / "m", _bundled_source())
    with pytest.raises(ModelError, match="sha256 does not match"):
        source_checkpoint(md)


def test_paths_that_leave_the_repository_are_refused(tmp_path):
    md = _model_copy(tmp_path / "m", dict(_bundled_source(), ldm_ckpt="../../etc/last.ckpt"))
    with pytest.raises(ModelError, match="leaves the repository"):
        source_checkpoint(md)


def test_torch_backend_finds_the_weights(md):
    from aldm.export.torch_backend import register
    from aldm.runtime.backends import make_runners

    register()  # what the command line does; the runtime itself never imports torch
    runners = make_runners(md, "torch")
    assert set(runners) == {"encoder", "spade", "unet", "decoder", "unet_step"}  # + the step runner
    assert runners["unet"].model.config.scale_factor == pytest.approx(md.manifest.scale_factor)
