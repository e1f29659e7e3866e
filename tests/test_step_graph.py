"""The sampler-step graph (UNet + DDIM update in one graph, aldm.export.step_graph): it replays the
golden DDIM traces, equals the numpy loop on the bundled model, is added to older folders without
torch, and folders without it (format 3, the bundled model) keep sampling with the numpy loop."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aldm.errors import AldmError, ModelError, UsageError
from aldm.export.step_graph import add_step_graph, compose
from aldm.runtime import sampler as S
from aldm.runtime.manifest import STEP_GRAPH, ModelDir, sample_feeds, sha256_file
from aldm.runtime.pipeline import Pipeline
from conftest import edit_manifest, rel_err

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "aldm" / "assets" / "default_model"
GOLDEN_TOL = 1e-5  # issue 19's bar for the step graph on ONNX Runtime CPU
FP32_TOL = 1e-4  # aldm check's FP32 tolerance (aldm.runtime.compare.TOLERANCES)


def as_format_3(folder: Path) -> Path:
    """`folder` (an export with the step graph) as a format-3 export had it: no step graph."""
    def to_v3(m):
        m["format_version"] = 3
        for p, v in list(m["variants"].items()):
            v.pop(STEP_GRAPH, None)
        m["files"] = {f: h for f, h in m["files"].items() if not f.startswith(STEP_GRAPH)}
        m["components"].pop(STEP_GRAPH)
    edit_manifest(folder, to_v3)
    for f in folder.glob(f"{STEP_GRAPH}*.onnx"):
        f.unlink()
    return folder


def _sample(pipe: Pipeline, steps: int = 4, eta: float = 1.0, seed: int = 0, rows: int = 2) -> np.ndarray:
    feeds = sample_feeds(pipe.model.component("unet"), batch=rows, seed=seed)
    return pipe.sample(feeds["c_concat"], feeds["y"], S.gaussian_noise(np.random.default_rng(seed)),
                       steps=steps, eta=eta, strength=1.0)


# ------------------------------------------------------------------------------ golden traces
@pytest.mark.parametrize("eta", [0, 1])
def test_the_step_graph_replays_the_golden_ddim_traces(golden_export, golden, eta):
    """Every step of the official eta-0 and eta-1 traces (recorded noises) within 1e-5 on ORT CPU;
    and the step graph is the numpy loop on the same backend, bit for bit."""
    g, u = golden[f"ddim_eta{eta}"], golden["unet"]
    sched = S.ddim_schedule(ModelDir(golden_export).schedule()["alphas_cumprod"], 10, float(eta))
    runs = {}
    for mode in ("on", "off"):
        xs: list[np.ndarray] = []
        noise = S.replay_noise(g["noise"]) if eta else S.gaussian_noise(np.random.default_rng(0))
        with Pipeline.load(golden_export, backend="ort-cpu", step_graph=mode) as pipe:
            assert (pipe.step is not None) == (mode == "on")
            out = pipe.ddim(u["c_concat"], g["y"], g["x_seq"][0], sched, noise,
                            callback=lambda i, n, t, x: xs.append(x))
        runs[mode] = xs + [out]
    errors = [rel_err(x, g["x_seq"][i + 1]) for i, x in enumerate(runs["on"][:-1])]
    assert len(errors) == 10
    print(f"eta {eta}: step graph vs official trace, max relative error per step "
          f"{', '.join(f'{e:.1e}' for e in errors)}")
    assert max(errors) <= GOLDEN_TOL, errors
    assert rel_err(runs["on"][-1], g["sample"]) <= GOLDEN_TOL
    for a, b in zip(runs["on"], runs["off"]):
        np.testing.assert_array_equal(a, b)


def test_the_update_nodes_compute_ddim_update_exactly(tiny_export):
    """UNet eps through numpy's ddim_update == the step graph's x_prev, every row of a schedule."""
    import onnxruntime as ort

    md = ModelDir(tiny_export)
    feeds = sample_feeds(md.component(STEP_GRAPH), batch=2, seed=3)
    unet = ort.InferenceSession(str(md.component_file("unet")))
    step = ort.InferenceSession(str(md.component_file(STEP_GRAPH)))
    eps = unet.run(["eps"], {k: feeds[k] for k in ("x_t", "t", "c_concat", "y")})[0]
    coefs = S.ddim_coefficients(S.ddim_schedule(md.schedule()["alphas_cumprod"], 10, 1.0))
    for row in coefs:
        got = step.run(["x_prev"], feeds | {"coef": row})[0]
        np.testing.assert_array_equal(got, S.ddim_update(feeds["x_t"], eps, row, feeds["noise"]))


# ------------------------------------------------------------------------------ bundled model
@pytest.fixture(scope="module")
def bundled_with_step(tmp_path_factory):
    """The bundled model (format 3) in a temporary copy, with the step graph added."""
    d = shutil.copytree(BUNDLED, tmp_path_factory.mktemp("bundled") / "model")
    add_step_graph(d)
    return d


def test_adding_the_step_graph_to_the_bundled_model(bundled_with_step):
    old, new = ModelDir(BUNDLED).manifest, ModelDir(bundled_with_step).manifest
    assert (old.format_version, new.format_version) == (3, 4)
    assert new.components[STEP_GRAPH].file == "unet_step.onnx"
    assert [t.name for t in new.components[STEP_GRAPH].inputs] == ["x_t", "t", "c_concat", "y", "coef", "noise"]
    assert new.components[STEP_GRAPH].inputs[5].shape == new.components["unet"].inputs[0].shape
    assert new.files == old.files | {"unet_step.onnx": sha256_file(bundled_with_step / "unet_step.onnx")}
    same = lambda m: {k: v for k, v in m.__dict__.items() if k not in ("components", "files", "format_version")}
    assert same(new) == same(old)


@pytest.mark.parametrize("backend", ["ort-cpu", "ov-cpu"])
def test_the_bundled_models_translation_with_the_step_graph_equals_the_numpy_loops(bundled_with_step, backend):
    """A whole translation (encode, SPADE, 4 DDIM steps at eta 1, decode), step graph vs numpy
    loop on the same backend: bit-identical on ORT CPU, within FP32 rounding on OpenVINO."""
    if backend == "ov-cpu":
        pytest.importorskip("openvino")
    x = sample_feeds(ModelDir(bundled_with_step).component("encoder"), 1, 99)["x"]
    out = {}
    for mode in ("on", "off"):
        with Pipeline.load(bundled_with_step, backend=backend, step_graph=mode) as pipe:
            assert (pipe.step is not None) == (mode == "on")
            out[mode] = pipe.translate(x, ["t2"], steps=4, eta=1.0, strength=1.0, seed=0).volumes["t2"]
    err = rel_err(out["on"], out["off"])
    print(f"{backend}: step graph vs numpy loop, whole translation: max relative difference {err:.2e}")
    assert err <= FP32_TOL
    if backend == "ort-cpu":
        assert err == 0


def test_the_bundled_model_has_no_step_graph_and_samples_with_the_numpy_loop():
    md = ModelDir(BUNDLED)
    assert md.manifest.format_version == 3 and not md.has_step_graph
    assert not (BUNDLED / "unet_step.onnx").exists()  # the tracked tree is near its size cap
    with Pipeline.load(BUNDLED, backend="ort-cpu") as pipe:
        assert STEP_GRAPH not in pipe.runners and pipe.step is None
        with pytest.raises(UsageError, match="aldm add-step-graph"):
            Pipeline(pipe.model, pipe.runners, step_graph="on")


# ------------------------------------------------------------------------------ older folders
def test_a_format_3_folder_samples_with_the_numpy_loop_and_gains_the_step_graph(tiny_export, tmp_path):
    """A format-3 folder loads and samples as before (numpy loop); `aldm add-step-graph` (a real
    process, no torch needed) makes it format 4, and its step graph samples the same numbers."""
    d = as_format_3(shutil.copytree(tiny_export, tmp_path / "m"))
    with Pipeline.load(d, backend="ort-cpu") as pipe:
        assert pipe.manifest.format_version == 3 and pipe.step is None and STEP_GRAPH not in pipe.runners
        before = _sample(pipe)
    with Pipeline.load(tiny_export, backend="ort-cpu", step_graph="off") as pipe:
        np.testing.assert_array_equal(before, _sample(pipe))
    res = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; "
                          "from aldm.cli.main import app; app()", "add-step-graph", str(d)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "unet_step.onnx" in res.stdout and "unet.onnx + the DDIM update" in res.stderr
    md = ModelDir(d)
    assert md.manifest.format_version == 4 and md.has_step_graph
    assert sha256_file(d / "unet_step.onnx") == sha256_file(tiny_export / "unet_step.onnx")
    with Pipeline.load(d, backend="ort-cpu", step_graph="on") as pipe:
        np.testing.assert_array_equal(before, _sample(pipe))


def test_the_step_graph_on_openvino(tiny_export):
    pytest.importorskip("openvino")
    out = {}
    for mode in ("on", "off"):
        with Pipeline.load(tiny_export, backend="ov-cpu", step_graph=mode) as pipe:
            assert pipe.backend == "ov-cpu" and (pipe.step is not None) == (mode == "on")
            out[mode] = _sample(pipe, eta=1.0)
    assert rel_err(out["on"], out["off"]) <= 1e-5


def test_ddpm_and_step_graph_off_keep_the_numpy_loop(tiny_export):
    with Pipeline.load(tiny_export, backend="ort-cpu", step_graph="on") as pipe:
        calls = []
        pipe.step.infer = lambda feeds: calls.append(1)  # DDPM must not touch the step graph
        feeds = sample_feeds(pipe.model.component("unet"), batch=1)
        z = pipe.sample(feeds["c_concat"], feeds["y"], S.gaussian_noise(np.random.default_rng(0)), sampler="ddpm")
        assert calls == [] and np.isfinite(z).all()
    with pytest.raises(UsageError, match="step_graph must be one of"):
        Pipeline.load(tiny_export, step_graph="yes")


def test_a_device_loop_runner_runs_the_whole_loop(tiny_export):
    """A step runner with ddim_loop (a GPU loop) gets the whole DDIM loop, once."""
    with Pipeline.load(tiny_export, backend="ort-cpu", step_graph="on") as pipe:
        got = {}

        def ddim_loop(x_T, c_concat, y, schedule, noise, *, official_rng=True, callback=None):
            got.update(x_T=x_T, steps=len(schedule.timesteps), official_rng=official_rng)
            return np.zeros_like(x_T)

        pipe.step.ddim_loop = ddim_loop
        z = _sample(pipe, steps=5)
    assert got["steps"] == 5 and got["official_rng"] and z.shape == got["x_T"].shape and not z.any()


# ------------------------------------------------------------------------------ FP16 variant
def test_the_fp16_variant_keeps_the_update_in_fp32(tiny_export, tmp_path):
    import onnx

    from aldm.export.precision import add_fp16_variant

    d = shutil.copytree(tiny_export, tmp_path / "m")
    add_fp16_variant(d, say=lambda s: None)
    md = ModelDir(d)
    assert md.manifest.variants["fp16"][STEP_GRAPH] == "unet_step.fp16.onnx"
    g = onnx.load(str(d / "unet_step.fp16.onnx")).graph
    update = [n for n in g.node if n.name.startswith("ddim_update/")]
    assert len(update) == 16 and not any(n.op_type == "Cast" for n in update)  # eps came out FP32
    assert {i.name: i.type.tensor_type.elem_type for i in g.input} == {
        "x_t": 1, "t": 7, "c_concat": 1, "y": 7, "coef": 1, "noise": 1}
    import onnxruntime as ort

    feeds = sample_feeds(md.component(STEP_GRAPH), batch=2, seed=5)
    feeds["coef"] = S.ddim_coefficients(S.ddim_schedule(md.schedule()["alphas_cumprod"], 10, 1.0))[6]
    unet_feeds = {k: feeds[k] for k in ("x_t", "t", "c_concat", "y")}
    eps = ort.InferenceSession(str(d / "unet.fp16.onnx")).run(["eps"], unet_feeds)[0]
    got = ort.InferenceSession(str(d / "unet_step.fp16.onnx")).run(["x_prev"], feeds)[0]
    np.testing.assert_array_equal(got, S.ddim_update(feeds["x_t"], eps, feeds["coef"], feeds["noise"]))
    with Pipeline.load(d, backend="ort-cpu", precision="fp16") as pipe:
        assert pipe.runners[STEP_GRAPH].name == "ort-cpu/fp16"


def test_a_variant_from_before_the_step_graph_gets_one_when_it_is_added(tiny_export, tmp_path):
    from aldm.export.precision import add_fp16_variant

    d = as_format_3(shutil.copytree(tiny_export, tmp_path / "m"))
    add_fp16_variant(d, say=lambda s: None)
    assert STEP_GRAPH not in ModelDir(d).manifest.variants["fp16"]
    ModelDir(d).add_variant("int8", {"unet": "unet.onnx"})  # an INT8 copy that left the UNet FP32
    with Pipeline.load(d, backend="ort-cpu", precision="fp16") as pipe:
        assert pipe.step is None  # that precision has no step graph: the numpy loop
    add_step_graph(d)
    md = ModelDir(d)
    assert md.manifest.variants["fp16"][STEP_GRAPH] == "unet_step.fp16.onnx"
    assert md.manifest.variants["int8"][STEP_GRAPH] == "unet_step.onnx"  # its UNet's step graph, not a copy
    assert "unet_step.fp16.onnx" in md.manifest.files and not (d / "unet_step.int8.onnx").exists()


def test_an_fp16_unet_output_is_cast_to_fp32_before_the_update(tiny_export, tmp_path):
    """A UNet whose eps is FP16 (not what to_fp16 writes, but allowed): a Cast first."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(tiny_export / "unet.onnx"))
    out = m.graph.output[0]
    for node in m.graph.node:
        node.output[:] = ["eps_f32" if o == "eps" else o for o in node.output]
    m.graph.node.append(helper.make_node("Cast", ["eps_f32"], ["eps"], to=TensorProto.FLOAT16))
    out.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.save(m, str(tmp_path / "unet16.onnx"))
    compose(tmp_path / "unet16.onnx", tmp_path / "step.onnx")
    g = onnx.load(str(tmp_path / "step.onnx")).graph
    assert [n.op_type for n in g.node if n.name.startswith("ddim_update/")][0] == "Cast"
    assert [o.name for o in g.output] == ["x_prev"] and g.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


# ------------------------------------------------------------------------------ bad folders
def test_a_corrupt_step_graph_is_one_line_model_error(tiny_export, tmp_path):
    d = shutil.copytree(tiny_export, tmp_path / "m")
    data = bytearray((d / "unet_step.onnx").read_bytes())
    data[100:200] = b"\xff" * 100
    (d / "unet_step.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="unet_step.onnx: sha256 does not match") as err:
        Pipeline.load(d)
    assert "\n" not in str(err.value)
    # hashed as it is: the graph itself is unreadable, said when the step runner loads
    (d / "unet_step.onnx").write_bytes(b"garbage, not a protobuf" * 10)
    edit_manifest(d, lambda m: m["files"].update({"unet_step.onnx": sha256_file(d / "unet_step.onnx")}))
    with Pipeline.load(d, backend="ort-cpu", step_graph="on") as pipe:
        with pytest.raises(ModelError, match="cannot load .*unet_step.onnx") as err:
            _sample(pipe)
    assert "\n" not in str(err.value)


def test_an_absent_step_graph_is_one_line_model_error(tiny_export, tmp_path):
    d = shutil.copytree(tiny_export, tmp_path / "m")
    (d / "unet_step.onnx").unlink()
    with pytest.raises(ModelError, match="missing file unet_step.onnx") as err:
        ModelDir(d)
    assert "\n" not in str(err.value)
    res = subprocess.run([sys.executable, "-m", "aldm.cli.main", "check", str(d)], capture_output=True, text=True)
    assert res.returncode != 0 and res.stderr.strip().splitlines() == [
        f"error: {d}: missing file unet_step.onnx"]


def test_a_step_graph_before_format_4_is_refused(tiny_export, tmp_path):
    d = shutil.copytree(tiny_export, tmp_path / "m")
    edit_manifest(d, lambda m: m.update(format_version=3))
    with pytest.raises(ModelError, match="unknown component unet_step \\(format 3\\)"):
        ModelDir(d)


def test_composing_from_a_graph_that_is_no_unet_is_a_model_error(tiny_export, tmp_path):
    with pytest.raises(ModelError, match="not a UNet graph"):
        compose(tiny_export / "decoder.onnx", tmp_path / "x.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="not a readable ONNX graph"):
        compose(tmp_path / "bad.onnx", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("backend", ["ort-cpu", "ov-cpu"])
def test_auto_runs_the_step_graph_on_the_cpu(tiny_export, backend):
    """The CPU default (measured no slower: docs/performance.md) where the folder has the graph."""
    if backend == "ov-cpu":
        pytest.importorskip("openvino")
    with Pipeline.load(tiny_export, backend=backend) as pipe:
        assert pipe.step is pipe.runners[STEP_GRAPH]
    with Pipeline.load(tiny_export, backend=backend, step_graph="off") as pipe:
        assert pipe.step is None and STEP_GRAPH in pipe.runners


def test_a_format_2_folder_gains_the_step_graph_and_still_decodes_whole_volumes(tiny_export, tmp_path):
    """Format 4 reads decoder_tiling in format 3's layout: adding the step graph to a format-2 folder
    drops its old channels-first cut (never used) instead of making the folder unreadable."""
    d = as_format_3(shutil.copytree(tiny_export, tmp_path / "m"))

    def to_v2(m):
        m["format_version"] = 2
        m["decoder_tiling"].update(axis=2)
        m["decoder_tiling"].pop("layout")
    edit_manifest(d, to_v2)
    add_step_graph(d)
    md = ModelDir(d)
    assert md.manifest.format_version == 4 and md.has_step_graph and md.manifest.decoder_tiling is None
    with Pipeline.load(d, backend="ort-cpu", tile_rows=16) as old, \
         Pipeline.load(tiny_export, backend="ort-cpu", tile_rows=0) as new:
        assert old.tiles is None and old.step is not None
        np.testing.assert_array_equal(_sample(old), _sample(new))


def test_a_crash_while_adding_the_step_graph_leaves_the_old_manifest(tiny_export, tmp_path, monkeypatch):
    """The manifest is replaced in one rename: a failure at that moment leaves the format-3 manifest
    as it was, and the folder loads and samples as before."""
    import aldm.atomic

    d = as_format_3(shutil.copytree(tiny_export, tmp_path / "m"))
    before = (d / "manifest.json").read_bytes()

    real = aldm.atomic.os.replace

    def crash(src, dst):  # the step graph's file lands; the manifest's rename fails
        if Path(dst).name == "manifest.json":
            raise OSError("killed")
        real(src, dst)

    monkeypatch.setattr(aldm.atomic.os, "replace", crash)
    with pytest.raises(AldmError, match="killed"):
        add_step_graph(d)
    assert (d / "unet_step.onnx").is_file()
    monkeypatch.undo()
    assert (d / "manifest.json").read_bytes() == before
    md = ModelDir(d)
    assert md.manifest.format_version == 3 and not md.has_step_graph
