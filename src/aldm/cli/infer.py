"""`aldm-infer`: translate NIfTI volumes into the missing modalities."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def infer(
    sources: Annotated[list[Path], typer.Argument(help="Source NIfTI volumes.")],
    targets: Annotated[str, typer.Option(help="Comma-separated target modalities.")] = "t2,flair",
    model: Annotated[Optional[Path], typer.Option(help="Exported model folder.")] = None,
) -> None:
    typer.echo("error: no default model is bundled with this version of aldm yet; "
               "pass --model DIR (an exported model folder)", err=True)
    raise typer.Exit(1)
