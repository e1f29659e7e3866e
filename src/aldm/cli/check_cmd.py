"""`aldm check`: every component on every available backend and precision against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from aldm.atomic import write_text
from aldm.cli._common import handle_errors, say, split_list


@handle_errors
def check(
    model_dir: Annotated[Path, typer.Argument(help="Exported model folder.")],
    reference: Annotated[Optional[Path], typer.Option("--reference", "--ldm", help="LDM checkpoint to compare with. Default: the one the manifest records (a relative path is looked up in the aldm repository above the model folder: the bundled model's is models/default/last.ckpt), checked against its recorded sha256.")] = None,
    backends: Annotated[Optional[str], typer.Option(help="Comma-separated backends. Default: every available one (ort-cpu, ov-cpu, ort-cuda, trt).")] = None,
    precisions: Annotated[Optional[str], typer.Option(help="Comma-separated precisions (fp32, fp16, int8). Default: every one the model folder holds.")] = None,
    e2e: Annotated[Optional[list[Path]], typer.Option(help="Source volumes (repeatable): also translate each at every reduced precision and at FP32 and require the end-to-end PSNR (45 dB FP16, 35 dB INT8).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="DDIM steps of the end-to-end runs. Default: the manifest's.")] = None,
    batch: Annotated[int, typer.Option(help="Batch size of the inputs (rows get different classes).")] = 2,
    inputs: Annotated[str, typer.Option(help="auto: real inputs recorded by `aldm calibrate` (held out from calibration) when the folder has them, else seeded random ones; or random / recorded.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the inputs.")] = 0,
    calib: Annotated[Optional[Path], typer.Option(help="Folder of inputs recorded by `aldm calibrate --out`. Default: MODEL_DIR/calibration.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON here.")] = None,
) -> None:
    """One line per component, backend and precision: errors vs PyTorch FP32 against stated
    tolerances, PASS or FAIL; exit 1 on any FAIL."""
    from aldm.export.check import check_model, reference_model
    from aldm.export.e2e_check import e2e_precision
    from aldm.runtime.manifest import ModelDir

    md = ModelDir(model_dir)
    precs = split_list(precisions) or md.precisions
    report = check_model(md, reference_model(md, str(reference) if reference else None),
                         backends=split_list(backends) or None, precisions=precs, batch=batch, seed=seed,
                         inputs=inputs, calib=calib)
    e2e_results = []
    for p in precs:
        if p != "fp32" and e2e:
            e2e_results += e2e_precision(md.path, e2e, p, steps=steps, say=say)
    typer.echo(str(report))
    for r in e2e_results:
        typer.echo(str(r))
    passed = bool(report) and all(e2e_results)
    if json_out:
        write_text(json_out, json.dumps({
            "passed": passed, "inputs": report.inputs, "skipped": report.skipped,
            "results": [{"component": r.component, "backend": r.backend, "max_abs": r.max_abs,
                         "max_rel": r.max_rel, "rtol": r.tolerance.rtol, "code_agreement": r.code_agreement,
                         "code_ties": r.ties,
                         "passed": bool(r)} for r in report.results],
            "end_to_end": [r.__dict__ | {"passed": bool(r)} for r in e2e_results]}, indent=1))
    if not passed:
        raise typer.Exit(1)
