"""`aldm check`: every component on every available backend and precision against PyTorch FP32,
on seeded inputs (the sampler-step graph, where the folder has it, against the PyTorch UNet's eps
through the numpy DDIM update); with TensorRT present, also polygraphy's ONNX Runtime vs TensorRT
comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from aldm.errors import BackendError, ModelError
from aldm.models import ALDM, LDMConfig, load_official
from aldm.runtime.backends import single_backend
from aldm.runtime.compare import TOLERANCES, Report, Result, Tolerance, code_gaps, compare
from aldm.runtime.manifest import COMPONENTS, STEP_GRAPH, ModelDir, sample_feeds


class TorchRunner:
    """The PyTorch model behind the runner protocol (the reference every backend is held to).
    `autocast=True` runs CUDA FP16 autocast (the official UNet cannot simply be `.half()`-ed)."""

    def __init__(self, model: ALDM, component: str, device: str = "cpu", autocast: bool = False):
        self.model, self.component, self.autocast = model, component, autocast
        self.name = f"torch-{device}" + ("/fp16" if autocast else "")
        self.device = torch.device(device)

    def activate(self) -> None:
        self.model.to(self.device)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        f = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in feeds.items()}
        m = self.model
        calls = {"encoder": lambda: self._encode(f["x"]),
                 "spade": lambda: {"z_tgt": m.spade(f["z"], f["y"])},
                 "unet": lambda: {"eps": m.unet(f["x_t"], f["t"], f["c_concat"], f["y"])},
                 "decoder": lambda: {"x_rec": m.decode(f["z"])}}
        with torch.inference_mode(), torch.autocast(self.device.type, torch.float16, enabled=self.autocast):
            out = calls[self.component]()
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """z_q, and the pre-quantization latent h (the near-tie test of `compare` needs it)."""
        vq = self.model.first_stage_model
        h = vq.quant_conv(vq.encoder(x))
        return {"z_q": vq.quantize(h)[0], "h": h}

    def deactivate(self) -> None:
        pass


def reference_model(model_dir: ModelDir, checkpoint: str | None = None, *,
                    hint: str = "pass --reference CKPT") -> ALDM:
    """The PyTorch model an export came from: `checkpoint`, else the manifest's recorded source
    (found by `source_checkpoint`: relative paths from the repository root, sha256 checked)."""
    from aldm.errors import UsageError

    m = model_dir.manifest
    vqgan = None
    if checkpoint:
        path = checkpoint
        try:  # a first stage the manifest records is still offered (used if `checkpoint` lacks one)
            vqgan = source_checkpoint(model_dir, "vqgan", hint)
        except ModelError:
            vqgan = None
    else:
        path = source_checkpoint(model_dir, "ldm", hint)
        if path is None:
            raise UsageError("no reference checkpoint: pass --reference CKPT")
        vqgan = source_checkpoint(model_dir, "vqgan", hint)
    cfg = LDMConfig.from_dict(m.config) if m.config else None
    return load_official(path, vqgan, config=cfg, ema=m.source.get("ema", True))


REPO_MARKERS = ("models", "pyproject.toml")


def source_checkpoint(model_dir: ModelDir, kind: str = "ldm",
                      hint: str = "pass --reference CKPT") -> Path | None:
    """The checkpoint the manifest records as `source.<kind>_ckpt` (kind: ldm or vqgan), found on
    this machine and checked against `source.<kind>_sha256` when the manifest records one; None
    when it records no such checkpoint.

    An absolute path is used as is. A relative one (the bundled model's `models/default/last.ckpt`)
    is relative to the aldm repository root: each folder above the model folder that holds
    `models/` or `pyproject.toml` is tried, nearest first, and the first that has the file wins. A
    missing file or a different sha256 is a one-line ModelError ending in `hint` (what to pass)."""
    from aldm.runtime.manifest import sha256_file

    src = model_dir.manifest.source
    recorded = src.get(f"{kind}_ckpt")
    if not recorded:
        return None
    digest = src.get(f"{kind}_sha256")
    what = f"{model_dir.path}: the {kind.upper()} checkpoint its manifest records"
    if digest:
        hint += f" (the file's sha256 starts {digest[:12]})"
    rel = Path(str(recorded))
    if rel.is_absolute():
        path = rel
        if not path.is_file():
            raise ModelError(f"{what}, {path}, is not on this machine; {hint}")
    else:
        if ".." in rel.parts:
            raise ModelError(f"{what}, {recorded}, leaves the repository (..); {hint}")
        roots = [p for p in Path(model_dir.path).resolve().parents
                 if any((p / m).exists() for m in REPO_MARKERS)]
        path = next((r / rel for r in roots if (r / rel).is_file()), None)
        if path is None:
            raise ModelError(
                f"{what}, {rel.as_posix()} (relative to the aldm repository), is not on this "
                f"machine (no repository checkout above the model folder; an installed wheel does "
                f"not carry it); {hint}")
    if digest and sha256_file(path) != digest:
        raise ModelError(f"{path}: sha256 does not match the {kind}_sha256 its manifest records "
                         f"({digest[:12]}…); corrupted or replaced; {hint}")
    return path


def available_backends() -> list[str]:
    from aldm.runtime import trt
    from aldm.runtime.backends import ort_cuda_available, ov_available

    return ["ort-cpu"] + (["ov-cpu"] if ov_available() else []) + (
        ["ort-cuda"] if ort_cuda_available() else []) + (["trt"] if trt.tensorrt_version() else [])


def reference_feeds(model_dir: ModelDir, batch: int, seed: int, n_classes: int,
                inputs: str = "auto", calib: str | Path | None = None,
                ) -> tuple[dict[str, dict[str, np.ndarray]], str]:
    """Inputs for every component: recorded real ones (held out from INT8 calibration) when `calib`
    (default: the model folder's calibration/) has recordings and `inputs` is auto/recorded, else
    seeded random ones."""
    calib = Path(calib) if calib is not None else model_dir.path / "calibration"
    if inputs in ("auto", "recorded") and any(calib.glob("unet_*.npz")):
        from aldm.calibration.ort_int8 import held_out_feeds

        feeds = {c: held_out_feeds(calib, c, batch) for c in COMPONENTS}
        if all(f is not None for f in feeds.values()):
            return feeds, "recorded"
    if inputs == "recorded":
        raise ModelError(f"{calib} holds no recorded inputs (run `aldm calibrate` first)")
    return {c: sample_feeds(model_dir.component(c), batch, seed + i, n_classes,
                            model_dir.manifest.schedule.timesteps) for i, c in enumerate(COMPONENTS)}, "random"


def check_model(model_dir: ModelDir, reference: ALDM, *, backends: Sequence[str] | None = None,
                precisions: Sequence[str] = ("fp32",), batch: int = 2, seed: int = 0,
                inputs: str = "auto", calib: str | Path | None = None,
                tolerances: Mapping[str, Mapping[str, Tolerance]] = TOLERANCES) -> Report:
    report = Report()
    n_classes = reference.config.first_stage_config.num_classes
    feeds, report.inputs = reference_feeds(model_dir, batch, seed, n_classes, inputs, calib)
    expected = {c: TorchRunner(reference, c).infer(feeds[c]) for c in COMPONENTS}
    if model_dir.has_step_graph:
        feeds[STEP_GRAPH], expected[STEP_GRAPH] = step_reference(model_dir, feeds["unet"],
                                                                 expected["unet"]["eps"], seed)
    codebook = reference.first_stage_model.quantize.embedding.weight.detach().cpu().numpy()
    gaps = {"encoder": code_gaps(expected["encoder"]["h"], codebook)}
    for precision in precisions:
        for backend in backends or available_backends():
            try:
                runners = single_backend(model_dir, backend, precision=precision)
            except (BackendError, ModelError) as exc:
                report.skipped.append(f"{backend}/{precision}: {exc}")
                continue
            for c in COMPONENTS + ((STEP_GRAPH,) if STEP_GRAPH in runners else ()):
                out = model_dir.component(c).outputs[0].name
                try:
                    got = runners[c].infer(feeds[c])[out]
                except BackendError as exc:
                    report.skipped.append(f"{c} on {backend}/{precision}: {exc}")
                    continue
                report.results.append(compare(c, f"{backend}/{precision}", got, expected[c][out],
                                              tolerances[precision][c], gaps.get(c)))
                if backend == "trt":
                    report.results.extend(polygraphy_compare(model_dir, c, precision, feeds[c],
                                                             tolerances[precision][c]))
            for r in runners.values():
                r.deactivate()
            if precision == "fp32":
                report.results.extend(_extra_graphs(model_dir, backend, feeds, expected,
                                                    tolerances[precision]))
    return report


def step_reference(model_dir: ModelDir, unet_feeds: Mapping[str, np.ndarray], eps: np.ndarray,
                   seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Feeds of the sampler-step graph (the UNet's, the middle row of the manifest's DDIM schedule
    at eta 1 so that every term of the update counts, seeded noise) and the reference x_prev: the
    numpy update (aldm.runtime.sampler.ddim_update) of the PyTorch UNet's eps."""
    from aldm.runtime import sampler as S

    m = model_dir.manifest
    sched = S.ddim_schedule(model_dir.schedule()["alphas_cumprod"], m.sampler.steps, 1.0)
    coef = S.ddim_coefficients(sched)[len(sched.timesteps) // 2]
    noise = np.random.default_rng(seed + 100).standard_normal(unet_feeds["x_t"].shape, dtype=np.float32)
    feeds = dict(unet_feeds) | {"coef": coef, "noise": noise}
    name = model_dir.component(STEP_GRAPH).outputs[0].name
    return feeds, {name: S.ddim_update(unet_feeds["x_t"], eps, coef, noise)}


def _extra_graphs(model_dir: ModelDir, backend: str, feeds, expected, tol) -> list[Result]:
    """The graphs CPU backends run instead of two components: the per-class MS-SPADE graphs and
    the decoder's slab graphs, held to the component's tolerance against the same reference."""
    from aldm.runtime.backends import extra_graph_runners
    from aldm.runtime.pipeline import spade_by_class, spade_class_spec
    from aldm.runtime.tiled import DEFAULT_TILE_ROWS, TiledDecoder

    factory = extra_graph_runners(model_dir, backend)
    if factory is None:
        return []
    m, out = model_dir.manifest, []
    if m.spade_per_class:
        runners = [factory(f, spade_class_spec(model_dir, k)) for k, f in enumerate(m.spade_per_class)]
        got = spade_by_class(model_dir, runners, feeds["spade"]["z"], feeds["spade"]["y"])
        for r in runners:
            r.deactivate()
        name = model_dir.component("spade").outputs[0].name
        out.append(compare("spade", f"{backend}/fp32 per class", got, expected["spade"][name], tol["spade"]))
    if m.decoder_tiling:
        name = model_dir.component("decoder").outputs[0].name
        tiled = TiledDecoder(model_dir, factory, rows=DEFAULT_TILE_ROWS)
        got = tiled(feeds["decoder"]["z"])
        tiled.deactivate()
        out.append(compare("decoder", f"{backend}/fp32 slabs of {tiled.rows}", got, expected["decoder"][name],
                           tol["decoder"]))
    return out


def polygraphy_compare(model_dir: ModelDir, component: str, precision: str,
                       feeds: Mapping[str, np.ndarray], tol: Tolerance) -> list[Result]:
    """Polygraphy's Comparator: ONNX Runtime (FP32 graph) vs the TensorRT engine, same feeds."""
    try:
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.backend.trt import TrtRunner
        from polygraphy.comparator import Comparator
    except ImportError:
        return []
    from aldm.runtime.trt import engine_paths, load_engine

    engine, _ = engine_paths(model_dir, component, precision)
    # the same checked load as the runtime: registered sha256 of the bytes read, host code only
    # for version-compatible engines (keep `runtime` alive while the engine runs)
    runtime, trt_engine = load_engine(engine)
    runners = [OnnxrtRunner(SessionFromOnnx(str(model_dir.component_file(component)))),
               TrtRunner(trt_engine)]
    results = Comparator.run(runners, data_loader=[dict(feeds)])
    del runtime
    (_, ort_iters), (trt_name, trt_iters) = results[0], results[1]
    out = []
    for name in ort_iters[0].keys():
        r = compare(component, f"polygraphy:{trt_name}", np.asarray(trt_iters[0][name]),
                    np.asarray(ort_iters[0][name]), tol)
        out.append(r)
    return out
