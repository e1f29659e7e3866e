"""`aldm add-step-graph`: add the sampler-step graph to a folder exported without it (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from aldm.cli._common import handle_errors, say


@handle_errors
def add_step_graph(
    model_dir: Annotated[Path, typer.Argument(help="Exported model folder (any format; it becomes format 4).")],
    overwrite: Annotated[bool, typer.Option(help="Recompose a step graph the folder already has.")] = False,
) -> None:
    """Compose unet_step.onnx (the UNet + the DDIM update in FP32) from the folder's UNet, and one
    per precision variant that has a UNet; the manifest is rewritten atomically. Needs onnx only."""
    from aldm.errors import require

    require("onnx", "export")
    from aldm.export.step_graph import add_step_graph as add

    spec = add(model_dir, say=say, overwrite=overwrite)
    typer.echo(f"{model_dir}: step graph {spec.file} (inputs {', '.join(t.name for t in spec.inputs)}; "
               f"output {spec.outputs[0].name})")
