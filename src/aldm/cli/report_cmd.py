"""aldm report: (re)write a batch folder's aldm_report.html from its JSON report, outputs and sidecars."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from aldm.cli._common import handle_errors, say


@handle_errors
def report(
    out: Annotated[Path, typer.Argument(help="A batch output folder (holds aldm_report.json), local or written through --server.", show_default=False)],
    refresh: Annotated[bool, typer.Option("--refresh", help="Remake every thumbnail (default: keep those the folder has).")] = False,
) -> None:
    """Write OUT/aldm_report.html: summary, failures first, one row per case with previews."""
    from aldm.report_html import rebuild

    page, n, thumbs = rebuild(out, refresh=refresh)
    say(f"report: {page} ({n} cases, {thumbs} with previews)")
