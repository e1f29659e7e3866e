"""aldm: export, check and benchmark ALDM models (translation itself: `aldm-infer`)."""

from __future__ import annotations

import typer

import aldm
from aldm.cli.bench_cmd import bench
from aldm.cli.check_cmd import check
from aldm.cli.export_cmd import export

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.command()(export)
app.command()(check)
app.command()(bench)


@app.command()
def version() -> None:
    """Print the aldm version."""
    typer.echo(aldm.__version__)
