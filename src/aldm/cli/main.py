"""aldm: export, check, benchmark, train and evaluate ALDM models, rebuild batch reports (translation itself: `aldm-infer`)."""

from __future__ import annotations

import typer

import aldm
from aldm.cli.bench_cmd import bench
from aldm.cli.bench_serve_cmd import bench_serve
from aldm.cli.build_cmd import build
from aldm.cli.calibrate_cmd import calibrate
from aldm.cli.check_cmd import check
from aldm.cli.eval_cmd import eval
from aldm.cli.export_cmd import export
from aldm.cli.report_cmd import report
from aldm.cli.serve_cmd import serve
from aldm.cli.step_graph_cmd import add_step_graph
from aldm.cli.train_cmd import train

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.command()(export)
app.command()(check)
app.command()(bench)
app.command()(build)
app.command(name="add-step-graph")(add_step_graph)
app.command()(calibrate)
app.command()(train)
app.command(name="eval")(eval)
app.command()(serve)
app.command(name="bench-serve")(bench_serve)
app.command()(report)


@app.command()
def version() -> None:
    """Print the aldm version."""
    typer.echo(aldm.__version__)


if __name__ == "__main__":
    app()
