"""`aldm eval`: PSNR, 3-D SSIM and NMSE inside the brain mask (the paper's metrics)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from aldm.cli._common import handle_errors


@handle_errors
def eval(  # noqa: A001 - the command is called eval
    pred: Annotated[Path, typer.Argument(help="A predicted volume, or a folder of aldm-infer outputs (with their JSON sidecars).")],
    ref: Annotated[Path, typer.Argument(help="The reference volume, or a BraTS-layout folder holding the references.")],
    baselines: Annotated[bool, typer.Option("--baselines", help="Also score the identity (source as prediction), the identity + histogram (source mapped onto the mean target histogram of the other reference cases) and a per-case linear fit of source to reference (peeks at the truth).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Write OUT.csv and OUT.md (per case and mean per task).")] = None,
) -> None:
    """Per-case and mean-per-task metrics after 0.5/99.5 percentile normalisation to [0, 1]."""
    from aldm.evaluate import evaluate, summarise, to_markdown, write_reports

    rows = evaluate(pred, ref, baselines=baselines)
    typer.echo(to_markdown(list(rows) + summarise(rows)))
    if out:
        csv_path, md_path = write_reports(rows, out)
        typer.echo(f"wrote {csv_path} and {md_path}", err=True)
