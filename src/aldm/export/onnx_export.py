"""ALDM (PyTorch) -> four ONNX graphs + schedule + manifest, written atomically.

Graphs: encoder (x -> z_q, quantizer inside, fp32 argmin), spade (z, y -> z_tgt; y is an int64
input and rows may differ), unet (x_t, t, c_concat, y -> eps), decoder (z -> x). The batch axis
is dynamic everywhere; spatial dims are fixed by the crop. Group/instance normalisations are
written as staged reductions (aldm.export.stable_norm: ONNX Runtime's own kernels lose ~1e-3 on
full-resolution groups). Every graph must pass the TensorRT-compatibility checker.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

import aldm
from aldm.atomic import atomic_path, write_text
from aldm.errors import UsageError
from aldm.export.tiled import export_tiles, supports_tiling
from aldm.export.trt_compat import require_trt_compatible
from aldm.models.aldm import ALDM
from aldm.runtime.manifest import (MANIFEST, SCHEDULE_FILE, STEP_GRAPH, ComponentSpec, Manifest,
                                   Preprocessing, SamplerDefaults, ScheduleSpec, TensorSpec, sample_feeds,
                                   sha256_file)

OPSET = 21
B = "batch"


class EncoderGraph(nn.Module):
    def __init__(self, m: ALDM):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.encode(x)


class SpadeGraph(nn.Module):
    def __init__(self, m: ALDM):
        super().__init__()
        self.m = m

    def forward(self, z, y):
        return self.m.spade(z, y)


class SpadeClassGraph(nn.Module):
    """MS-SPADE for one fixed target class: only that class's branches run (the all-class graph
    runs every branch and keeps each row's own: 2.8x the work for one target)."""

    def __init__(self, m: ALDM, k: int):
        super().__init__()
        self.m, self.k = m, k

    def forward(self, z):
        return self.m.spade(z, self.k)


class UNetGraph(nn.Module):
    def __init__(self, m: ALDM):
        super().__init__()
        self.m = m

    def forward(self, x_t, t, c_concat, y):
        return self.m.unet(x_t, t, c_concat, y)


class DecoderGraph(nn.Module):
    def __init__(self, m: ALDM):
        super().__init__()
        self.m = m

    def forward(self, z):
        return self.m.decode(z)


def latent_shape(model: ALDM, crop: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """(C, h, w, d) of the latent for a crop; the crop must fit both VQ-GAN and UNet strides."""
    cfg = model.config
    vq_factor = 2 ** (len(cfg.first_stage_config.ddconfig.ch_mult) - 1)
    unet_factor = 2 ** (len(cfg.unet_config.channel_mult) - 1)
    if any(s % (vq_factor * unet_factor) for s in crop):
        raise UsageError(f"crop {crop} must be a multiple of {vq_factor * unet_factor} on every axis "
                         f"(VQ-GAN stride {vq_factor} x UNet stride {unet_factor})")
    return (cfg.first_stage_config.embed_dim,) + tuple(s // vq_factor for s in crop)


def component_specs(model: ALDM, crop: tuple[int, int, int]) -> dict[str, ComponentSpec]:
    c, *lat = latent_shape(model, crop)
    dd = model.config.first_stage_config.ddconfig
    f32, i64 = "float32", "int64"
    vol_in, vol_out = (B, dd.in_channels, *crop), (B, dd.out_ch, *crop)
    z = (B, c, *lat)
    return {
        "encoder": ComponentSpec("encoder", "encoder.onnx", (TensorSpec("x", vol_in, f32),),
                                 (TensorSpec("z_q", z, f32),)),
        "spade": ComponentSpec("spade", "spade.onnx", (TensorSpec("z", z, f32), TensorSpec("y", (B,), i64)),
                               (TensorSpec("z_tgt", z, f32),)),
        "unet": ComponentSpec("unet", "unet.onnx",
                              (TensorSpec("x_t", z, f32), TensorSpec("t", (B,), i64),
                               TensorSpec("c_concat", (B, 2 * c, *lat), f32), TensorSpec("y", (B,), i64)),
                              (TensorSpec("eps", z, f32),)),
        "decoder": ComponentSpec("decoder", "decoder.onnx", (TensorSpec("z", z, f32),),
                                 (TensorSpec("x_rec", vol_out, f32),)),
    }


GRAPHS = {"encoder": EncoderGraph, "spade": SpadeGraph, "unet": UNetGraph, "decoder": DecoderGraph}


def _export_one(model: ALDM, spec: ComponentSpec, path: Path, opset: int) -> None:
    graph = GRAPHS[spec.name](model).eval()
    feeds = sample_feeds(spec, batch=2, num_classes=model.config.first_stage_config.num_classes)
    args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
    batch = torch.export.Dim("batch", min=1, max=1024)
    export_graph(graph, spec, path, args, {t.name: {0: batch} for t in spec.inputs}, opset)


def export_graph(graph: nn.Module, spec: ComponentSpec, path: Path, args: tuple, dynamic: dict,
                 opset: int = OPSET) -> None:
    """One module -> one self-contained ONNX file: dynamo export, staged normalisations, no
    debug metadata. `dynamic`: input name -> {axis: torch.export.Dim} (or None: all static)."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), _quiet_logs():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, args, str(path), input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs], opset_version=opset, dynamo=True,
            dynamic_shapes=dynamic, optimize=True, verbose=False,
            external_data=False,
        )
    import onnx

    from aldm.export.stable_norm import stabilise_norms

    proto = onnx.load(str(path))
    stabilise_norms(proto)  # ORT's own norm kernels lose ~1e-3 on full-resolution groups
    strip_debug_metadata(proto)
    with atomic_path(path) as tmp:  # one self-contained file (the graphs stay far below 2 GB)
        onnx.save(proto, str(tmp))


def _export_spade_classes(model: ALDM, spec: ComponentSpec, out_dir: Path, opset: int) -> list[str]:
    files = []
    z = torch.from_numpy(sample_feeds(spec, batch=2)["z"])
    batch = torch.export.Dim("batch", min=1, max=1024)
    for k in range(model.config.first_stage_config.num_classes):
        one = ComponentSpec("spade", f"spade_class{k}.onnx", spec.inputs[:1], spec.outputs)
        export_graph(SpadeClassGraph(model, k).eval(), one, out_dir / one.file, (z,), {"z": {0: batch}}, opset)
        require_trt_compatible(out_dir / one.file)
        files.append(one.file)
    return files


DEBUG_KEYS = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


def strip_debug_metadata(proto) -> None:
    """Drop the exporter's per-node Python stack traces and FX node dumps. The traces hold the
    exporting checkout's absolute paths, so the same weights exported from two checkouts gave two
    different files; both are debugging aids (6-20 % of a graph's bytes). The name scopes that
    the precision passes read are kept."""
    for node in proto.graph.node:
        keep = [p for p in node.metadata_props if p.key not in DEBUG_KEYS]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)


@contextlib.contextmanager
def _quiet_logs():
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def export_model(model: ALDM, out_dir: str | Path, *, crop_size: tuple[int, int, int] = (144, 192, 144),
                 steps: int = 200, eta: float = 1.0, strength: float = 1.0, spacing=(1.0, 1.0, 1.0),
                 source: dict | None = None, opset: int = OPSET, overwrite: bool = False,
                 bound_latents: bool = False, tiles: bool = True, per_class_spade: bool = True,
                 step_graph: bool = True, progress: Callable[[str], None] | None = None) -> Manifest:
    """Export `model` into `out_dir` (created atomically); returns the manifest written.

    bound_latents: record the codebook's per-channel range, so the runtime clamps the MS-SPADE
    output to it (off by default: the official code does not clamp).
    per_class_spade: also write one MS-SPADE graph per target class (FP32 CPU backends run the
    one a target needs instead of every class's branches).
    tiles: also write the decoder cut for slab-wise decoding (aldm.export.tiled), which bounds the
    decoder's memory; off, the folder decodes whole volumes only.
    step_graph: also write the sampler-step graph (UNet + DDIM update, `unet_step.onnx`, composed
    from the exported UNet: aldm.export.step_graph), which runs a whole DDIM step per call.
    """
    from aldm.runtime.sampler import check_strength, ddim_timesteps

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UsageError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    ddim_timesteps(steps, model.config.timesteps)  # refuse sampler defaults that cannot run
    check_strength(strength)
    crop = tuple(int(s) for s in crop_size)
    specs = component_specs(model, crop)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        model = model.eval()
        with torch.no_grad():
            for name, spec in specs.items():
                if progress:
                    progress(f"exporting {name}")
                _export_one(model, spec, tmp / spec.file, opset)
                require_trt_compatible(tmp / spec.file)
            if step_graph:
                from aldm.export.step_graph import compose, step_spec

                if progress:
                    progress("composing the sampler-step graph (UNet + DDIM update)")
                specs[STEP_GRAPH] = step_spec(specs["unet"])
                compose(tmp / specs["unet"].file, tmp / specs[STEP_GRAPH].file)
                require_trt_compatible(tmp / specs[STEP_GRAPH].file)
            spade_files = None
            if per_class_spade:
                if progress:
                    progress("exporting one MS-SPADE graph per target class")
                spade_files = _export_spade_classes(model, specs["spade"], tmp, opset)
            tiling = None
            if tiles and supports_tiling(model):
                if progress:
                    progress("exporting the decoder's slab graphs")
                tiling = export_tiles(model, tmp, crop, latent_shape(model, crop),
                                      lambda g, spec, path, a, dyn: export_graph(g, spec, path, a, dyn, opset))
                for step_file in [tiling["head"]] + [st["file"] for st in tiling["steps"]]:
                    require_trt_compatible(tmp / step_file)
        with atomic_path(tmp / SCHEDULE_FILE) as part:
            np.savez(part, **model.schedule())
        files = {f: sha256_file(tmp / f) for f in sorted(p.name for p in tmp.iterdir())}
        manifest = Manifest(
            components=specs, latent_shape=latent_shape(model, crop), files=files,
            scale_factor=float(model.scale_factor),
            preprocessing=Preprocessing(crop_size=crop, spacing=tuple(map(float, spacing))),
            schedule=ScheduleSpec(timesteps=model.config.timesteps, beta_schedule=model.config.beta_schedule,
                                  linear_start=model.config.linear_start, linear_end=model.config.linear_end,
                                  parameterization=model.config.parameterization),
            sampler=SamplerDefaults("ddim", steps, float(eta), float(strength)), config=model.config.to_dict(),
            source=source or {}, tools=_tool_versions(opset),
            latent_bounds=codebook_bounds(model) if bound_latents else None,
            decoder_tiling=tiling, spade_per_class=spade_files,
        )
        write_text(tmp / MANIFEST, manifest.to_json())
        tmp.chmod(0o755)
        _replace_dir(tmp, out_dir)
        return manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new: Path, dst: Path) -> None:
    """Put the finished folder `new` at `dst`; an existing `dst` is moved aside first and removed
    only once `new` is in place, so a crash leaves the old model or the new one at `dst`."""
    from aldm.atomic import write_error

    old = None
    try:
        if dst.exists() or dst.is_symlink():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            dst.rename(old)
        new.rename(dst)
    except OSError as exc:
        if old is not None and not dst.exists():
            old.rename(dst)
        raise write_error(dst, exc) from None
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def codebook_bounds(model: ALDM) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(lows, highs) of the quantizer's codebook per latent channel."""
    codes = model.first_stage_model.quantize.embedding.weight.detach().cpu()
    return tuple(codes.min(0).values.tolist()), tuple(codes.max(0).values.tolist())


def export_official(ldm_ckpt: str | Path, out_dir: str | Path, *, vqgan_ckpt: str | Path | None = None,
                    config=None, ema: bool = True, **kwargs) -> Manifest:
    """load_official + export_model, recording the checkpoint and its sha256 in the manifest."""
    from aldm.models import load_official

    model = load_official(ldm_ckpt, vqgan_ckpt, config=config, ema=ema)
    source = {"ldm_ckpt": str(Path(ldm_ckpt).resolve()), "ldm_sha256": sha256_file(Path(ldm_ckpt)),
              "ema": ema}
    if vqgan_ckpt is not None:
        source["vqgan_ckpt"] = str(Path(vqgan_ckpt).resolve())
    return export_model(model, out_dir, source=source, **kwargs)


def _tool_versions(opset: int) -> dict[str, str]:
    import onnx

    versions = {"aldm": aldm.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                "opset": str(opset)}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return versions
