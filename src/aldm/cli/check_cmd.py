"""`aldm check`: every component on every available backend against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from aldm.cli._common import handle_errors, split_list


@handle_errors
def check(
    model_dir: Annotated[Path, typer.Argument(help="Exported model folder.")],
    reference: Annotated[Optional[Path], typer.Option(help="LDM checkpoint to compare with. Default: the one recorded in the manifest.")] = None,
    backends: Annotated[Optional[str], typer.Option(help="Comma-separated backends. Default: every available one.")] = None,
    batch: Annotated[int, typer.Option(help="Batch size of the seeded inputs (rows get different classes).")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the inputs.")] = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON here.")] = None,
) -> None:
    """One line per component and backend: max abs / max rel error, PASS or FAIL; exit 1 on any FAIL."""
    from aldm.export.check import check_model, reference_model
    from aldm.runtime.manifest import ModelDir

    md = ModelDir(model_dir)
    report = check_model(md, reference_model(md, str(reference) if reference else None),
                         backends=split_list(backends) or None, batch=batch, seed=seed)
    typer.echo(str(report))
    if json_out:
        json_out.write_text(json.dumps({"passed": bool(report), "skipped": report.skipped,
                                        "results": [r.__dict__ | {"passed": bool(r)} for r in report.results]},
                                       indent=1))
    if not report:
        raise typer.Exit(1)
