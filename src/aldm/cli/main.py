"""`aldm`: export, check, bench, build, calibrate, train, eval."""

from __future__ import annotations

import typer

import aldm

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)


@app.command()
def version() -> None:
    """Print the aldm version."""
    typer.echo(aldm.__version__)
