"""`aldm export`: an official checkpoint -> ONNX graphs + manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from aldm.cli._common import handle_errors, parse_triple, say


@handle_errors
def export(
    ldm: Annotated[Path, typer.Option(help="Official LDM checkpoint (last.ckpt).")],
    out: Annotated[Path, typer.Option(help="Output model folder (written atomically).")],
    vqgan: Annotated[Optional[Path], typer.Option(help="VQ-GAN stage-2 checkpoint; only used when the LDM file has no first_stage_model.*")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Official LDM yaml/json, for what tensor shapes cannot tell (norm groups, head width). Default: official values.")] = None,
    crop: Annotated[str, typer.Option(help="Model grid H,W,D in RAS voxels; fixes the graphs' spatial dims.")] = "144,192,144",
    steps: Annotated[int, typer.Option(help="Default DDIM steps recorded in the manifest (official: 200).")] = 200,
    eta: Annotated[float, typer.Option(help="Default DDIM eta (official sampling.py: 1.0, stochastic).")] = 1.0,
    strength: Annotated[float, typer.Option(help="Default sampling strength recorded in the manifest (official: 1.0, from pure noise; < 1 starts from the noised MS-SPADE latent; 0: no diffusion, the MS-SPADE latent decoded).")] = 1.0,
    bound_latents: Annotated[bool, typer.Option("--bound-latents", help="Record the codebook's range so the runtime clamps the MS-SPADE output to it: guards against runaway latents on unusual inputs (seen with the default model on T2/FLAIR sources). Off by default because the official code does not clamp; use it for models trained with a trained codebook (aldm train).")] = False,
    raw_weights: Annotated[bool, typer.Option("--raw-weights", help="Use the raw UNet weights instead of EMA.")] = False,
    step_graph: Annotated[bool, typer.Option("--step-graph/--no-step-graph", help="Also write the sampler-step graph (unet_step.onnx: UNet + DDIM update, one call per step; a GPU keeps x on the device). An older folder gets it with `aldm add-step-graph`.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Export the four components (and the sampler-step graph) to ONNX (opset 21, dynamic batch) and
    write manifest.json."""
    from aldm.export import export_official

    manifest = export_official(ldm, out, vqgan_ckpt=vqgan, config=config, ema=not raw_weights,
                               crop_size=parse_triple(crop, "--crop"), steps=steps, eta=eta,
                               strength=strength, bound_latents=bound_latents, step_graph=step_graph,
                               overwrite=overwrite,
                               progress=say)
    size = sum((out / f).stat().st_size for f in manifest.files) / 1e6
    typer.echo(f"exported {len(manifest.components)} components to {out} ({size:.1f} MB); "
               f"every graph passed the TensorRT-compatibility check")
