"""The numpy sampler driving ONNX Runtime replays the official traces (≤ 1e-4 relative)."""

from __future__ import annotations

import numpy as np
import pytest

from aldm.runtime import sampler as S
from aldm.runtime.pipeline import Pipeline
from conftest import rel_err

TOL = 1e-4


@pytest.fixture(scope="module")
def pipe(golden_export):
    with Pipeline.load(golden_export) as p:
        yield p


@pytest.mark.parametrize("eta", [0, 1])
def test_ddim_traces_replay(pipe, golden, eta):
    g, u = golden[f"ddim_eta{eta}"], golden["unet"]
    xs = []
    noise = S.replay_noise(g["noise"]) if eta else S.gaussian_noise(np.random.default_rng(0))
    sched = S.ddim_schedule(pipe.model.schedule()["alphas_cumprod"], 10, float(eta))
    out = S.ddim_sample(pipe.denoiser(u["c_concat"], g["y"]), g["x_seq"][0], sched, noise,
                        callback=lambda i, n, t, x: xs.append(x))
    assert len(xs) == 10
    for i, x in enumerate(xs):
        assert rel_err(x, g["x_seq"][i + 1]) <= TOL, f"step {i}"
    assert rel_err(out, g["sample"]) <= TOL


def test_ddpm_single_steps_replay(pipe, golden):
    g, u = golden["ddpm_steps"], golden["unet"]
    sched = pipe.model.schedule()
    eps_fn = pipe.denoiser(u["c_concat"], u["y"])
    for i, t in enumerate(g["t"]):
        tt = np.full((2,), t, np.int64)
        x = S.ddpm_step(g["x_in"], eps_fn(g["x_in"], tt), tt, sched, g["noise"][i])
        assert rel_err(x, g["x_out"][i]) <= TOL, f"t={t}"


def test_the_official_sampling_py_path_replays(pipe, golden):
    """encode -> SPADE -> 10 DDIM steps (eta 1, x_T then one noise per step) -> decode."""
    sp, fs = golden["sampling_py_path"], golden["first_stage"]
    c = pipe.condition(pipe.encode(fs["x_src"]), sp["y"])
    assert rel_err(c, golden["unet"]["c_concat"]) <= TOL
    z0 = pipe.sample(c, sp["y"], S.replay_noise([sp["x_T"], *sp["noise"]]), steps=10, eta=1.0)
    assert rel_err(z0, sp["sample_latent"]) <= TOL
    assert rel_err(pipe.decode(z0)[:1], sp["samples_x0_quantized_row0"]) <= TOL


def test_translate_row0_is_what_sampling_py_writes(pipe, golden):
    sp, fs = golden["sampling_py_path"], golden["first_stage"]
    noise = S.replay_noise([sp["x_T"][:1], *(n[:1] for n in sp["noise"])])
    tr = pipe.translate(fs["x_src"][:1], ["t2"], steps=10, eta=1.0, noise=noise)
    assert list(tr.volumes) == ["t2"] and tr.volumes["t2"].shape == (1, 1, 32, 48, 16)
    assert rel_err(tr.volumes["t2"], sp["samples_x0_quantized_row0"]) <= TOL
    assert set(tr.timings) == {"encode", "spade", "sample", "decode"}


def test_aldm_check_passes_on_the_golden_export(golden_export):
    from typer.testing import CliRunner

    from aldm.cli.main import app
    from aldm.export.check import available_backends

    res = CliRunner().invoke(app, ["check", str(golden_export)])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.startswith(("PASS", "FAIL"))]
    backends = available_backends()  # every one available here: ort-cpu, ov-cpu with openvino, ...
    # four components and the sampler-step graph per backend; the CPU ones also run the per-class
    # MS-SPADE and slab graphs
    assert len(lines) == sum(7 if b in ("ort-cpu", "ov-cpu") else 5 for b in backends), res.output
    assert sum(line.split()[1] == "unet_step" for line in lines) == len(backends)
    assert all(line.startswith("PASS") for line in lines)
    assert {line.split()[2].split("/")[0] for line in lines} == set(backends)
    for line in lines:
        rel = float(line.split("max_rel=")[1].split()[0])
        assert rel <= 1e-4
