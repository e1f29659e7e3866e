"""aldm-infer: translate brain MRI volumes (NIfTI) into the missing modalities.

Outputs overlay exactly on the source: same grid, affine and header, background 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from aldm.cli._common import fail, say, split_list
from aldm.errors import AldmError, UsageError, one_line
from aldm.runtime.sampler import progress_only
from aldm.runtime.tiled import DEFAULT_TILE_ROWS

app = typer.Typer(add_completion=False, help=__doc__, pretty_exceptions_enable=False)


@app.command()
def infer(
    ctx: typer.Context,
    sources: Annotated[Optional[list[Path]], typer.Argument(help="Source NIfTI volumes (.nii / .nii.gz), any orientation, spacing and dtype; or DICOM: a series folder, a study folder, a .dcm file or a .zip/.tar(.gz) of one study (pip install 'aldm\\[dicom]').", show_default=False)] = None,
    targets: Annotated[Optional[str], typer.Option(help="Comma-separated targets from t1, t1ce, t2, flair. Default: every modality but the source's.")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Exported model folder. Default: the model bundled with aldm.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder. Default: next to each source.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="DDIM steps. Default: the model's (manifest). More steps: slower, usually sharper; valid counts divide 1000.")] = None,
    eta: Annotated[Optional[float], typer.Option(help="DDIM eta. Default: the model's. 0 is deterministic given the seed's x_T; 1 is the official stochastic sampler.")] = None,
    strength: Annotated[Optional[float], typer.Option(help="Where sampling starts. Default: the model's. 1 is the official sampler (pure noise at the last step); below 1 it starts from the MS-SPADE translation noised to step round(strength x steps) and runs only those steps: faster, closer to the SPADE estimate; 0 runs no diffusion (the MS-SPADE translation decoded: fastest, smoothest).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed; the same seed reproduces the same output. Default: a fresh seed, recorded in the sidecar.")] = None,
    backend: Annotated[str, typer.Option(help="auto (TensorRT > ONNX Runtime CUDA > OpenVINO CPU > ONNX Runtime CPU: the fastest that is here), ort-cpu, ort-cuda, ov-cpu, trt, torch (needs the source checkpoint). ov-cpu is OpenVINO on the CPU: faster than ort-cpu on these graphs, FP32 like it, and what auto picks on a CPU when openvino is installed (it is by default); --backend ort-cpu forces ONNX Runtime.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for ONNX Runtime or OpenVINO. Default: all cores.")] = None,
    source_modality: Annotated[str, typer.Option(help="Modality of the sources (a target may not equal it). DICOM studies: the series of this contrast is the source (README: selection rules).")] = "t1",
    source_series: Annotated[Optional[str], typer.Option(help="DICOM: the source series, by SeriesDescription (case-insensitive; a shell pattern with * ? [ ], else a substring), or its exact SeriesNumber or SeriesInstanceUID; exactly one series of each study must match. Default: the series of --source-modality by the selection rules.")] = None,
    dicom_out: Annotated[bool, typer.Option("--dicom-out", help="DICOM sources: also write each target as a derived MR series (<stem>_<target>_dicom/, one file per slice) that a viewer opens over the source: same study, frame of reference and slice geometry, new UIDs, Synthetic Data YES, marked not for diagnosis.")] = False,
    naming: Annotated[str, typer.Option(help="stem: <stem>_<target>.nii.gz; brasyn: <ID>-<t1n|t1c|t2w|t2f>.nii.gz.")] = "stem",
    intensity: Annotated[str, typer.Option(help="unit: float32 in [0, 1]; source: mapped to the source's 0.5-99.5 percentile range.")] = "unit",
    decode_batch: Annotated[int, typer.Option(help="Volumes decoded at once: higher is faster on big GPUs, lower needs less memory (~6 GB per volume on CPU at 144x192x144).")] = 1,
    tile_rows: Annotated[int, typer.Option(help="Decode in slabs of N rows of the model grid, every GroupNorm's statistics gathered over the whole volume, so the result equals the whole decode (within 1e-5 relative) while only the slabs and two full-resolution activations are in memory, and every engine frees its working memory after its stage. 0: whole volumes, every engine keeps its memory. Bundled model, 3 targets, ov-cpu: 1.3 GB in slabs of 8 vs 3.8 GB whole, and as fast; ort-cpu: less memory but slower in slabs. FP32 on ort-cpu and ov-cpu; GPU backends and model folders exported before format 3 decode whole volumes.")] = DEFAULT_TILE_ROWS,
    preview: Annotated[bool, typer.Option("--preview", help="Also write <stem>_preview.png: axial, coronal and sagittal slices of the source and every output.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs (default: refuse).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or per-file lines; errors still print.")] = False,
    batch: Annotated[Optional[Path], typer.Option(help="Convert a whole input: a folder (recursive), a .txt/.csv list, a BraTS layout (one folder per subject; --source-modality picks the file) or a .zip/.tar(.gz) archive. Needs --out. Exit 0 if every case succeeds, 3 if some failed.")] = None,
    prefetch: Annotated[int, typer.Option(help="Batch: cases read and preprocessed ahead of the computation; with --server: cases in flight on the server at once.")] = 2,
    ray: Annotated[bool, typer.Option("--ray", help="Batch: spread cases over a Ray cluster (a local one unless --ray-address), one model per worker, a GPU each when the cluster has them.")] = False,
    ray_address: Annotated[Optional[str], typer.Option(help="Batch with --ray: the cluster to join (e.g. 10.0.0.5:6379 or auto).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Batch with --ray: number of workers. Default: one per GPU, else per CPU.")] = None,
    skull_strip: Annotated[bool, typer.Option("--skull-strip", help="Extract the brain first (ROBEX 1.2; pip install 'aldm\\[skullstrip]'), for raw scans with skull and neck; slow (one ROBEX run per source); writes <stem>_brainmask.nii.gz beside the outputs. ROBEX is built for T1 (Dice vs HD-BET 0.96 on a clinical T1, 0.88 on its T2). Default: off (sources must be skull-stripped).")] = False,
    no_skull_check: Annotated[bool, typer.Option("--no-skull-check", help="Translate sources that do not look skull-stripped. Default: refuse them (more than 75% of the grid non-zero: skull, neck or background noise), since the model was trained on skull-stripped brains and its output on a raw scan is a plausible-looking texture, not a translation.")] = False,
    max_voxels: Annotated[int, typer.Option(help="Refuse a source whose header declares more voxels, before reading its data (a corrupt or hostile header can claim any size).")] = 1024**3,
    max_member_mb: Annotated[int, typer.Option(help="Batch archives: refuse a member larger than this once extracted.")] = 4096,
    max_extract_gb: Annotated[int, typer.Option(help="Batch archives: stop extracting after this many GB in one batch (zip bombs; members are also refused above a 1000:1 compression ratio).")] = 1024,
    server: Annotated[Optional[str], typer.Option(help="Send every source (or --batch case) to an `aldm serve` server at this URL, e.g. http://127.0.0.1:8080, instead of computing here: same outputs, names, sidecars, report and exit codes, made with the server's model and backend (so --model, --backend, --threads, --decode-batch, --tile-rows, --preview, --skull-strip, --ray, --ray-address, --workers, --max-voxels, --source-series and --dicom-out are refused; DICOM inputs are converted locally only). 429/503 answers are retried after their Retry-After. Default: compute locally.")] = None,
    token_file: Annotated[Optional[Path], typer.Option(help="With --server: a file holding the server's bearer token (surrounding whitespace ignored). Default: no token.")] = None,
) -> None:
    """Translate each SOURCE into the target modalities: <stem>_<target>.nii.gz plus a JSON sidecar."""
    from aldm.cli._common import ignore_file_size_signal
    from aldm.translator import Options, Translator, default_model_dir
    from aldm.runtime.pipeline import Pipeline

    ignore_file_size_signal()
    mods = ("t1", "t1ce", "t2", "flair")
    target_list = split_list(targets) or [m for m in mods if m != source_modality]
    if batch is not None and sources:
        fail("give either SOURCES or --batch INPUT, not both", 2)
    if batch is None and not sources:
        fail("no sources given (or use --batch INPUT)", 2)
    if batch is not None and out is None:
        fail("--batch needs --out DIR", 2)
    if min(max_voxels, max_member_mb, max_extract_gb) < 1:
        fail("--max-voxels, --max-member-mb and --max-extract-gb must be positive", 2)
    opts = Options(tuple(t.lower() for t in target_list), out, steps, eta, seed,
                   source_modality.lower(), naming, intensity, overwrite, preview, strength=strength,
                   max_voxels=max_voxels, skull_check=not no_skull_check, skull_strip=skull_strip,
                   source_series=source_series, dicom_out=dicom_out)
    if server is not None or token_file is not None:
        from aldm.batch import ArchiveLimits
        from aldm.cli.remote import main as remote

        limits = ArchiveLimits(member_bytes=max_member_mb << 20, total_bytes=max_extract_gb << 30)
        raise typer.Exit(remote(ctx, server, token_file, opts, sources, batch, out, prefetch=prefetch,
                                quiet=quiet, limits=limits))
    try:
        if tile_rows < 0:
            fail("--tile-rows must be 0 (whole volumes) or positive", 2)
        pipeline = Pipeline.load(model or default_model_dir(), backend=backend, threads=threads,
                                 decode_batch=decode_batch, tile_rows=tile_rows)
        translator = Translator(pipeline, opts)
    except AldmError as exc:
        fail(str(exc), exc.exit_code)
    if batch is not None:
        from aldm.batch import ArchiveLimits
        from aldm.cli.batch_cmd import run_batch

        limits = ArchiveLimits(member_bytes=max_member_mb << 20, total_bytes=max_extract_gb << 30)
        raise typer.Exit(run_batch(translator, batch, out, prefetch=prefetch,
                                   ray=(ray_address or "local") if ray else None, workers=workers,
                                   backend=backend, threads=threads, quiet=quiet, limits=limits))

    failed = 0
    with _progress(quiet) as bar:
        for src in sources:
            task = bar.add_task(f"{src.name}: loading", total=None) if bar else None

            def on_stage(name, task=task, src=src):
                if bar:
                    bar.update(task, description=f"{src.name}: {name}")

            def on_step(i, n, t, x, task=task):
                if bar:
                    bar.update(task, total=n, completed=i + 1)

            try:
                res = translator.run(src, callback=progress_only(on_step), on_stage=on_stage)
            except UsageError as exc:
                fail(str(exc), exc.exit_code)
            except AldmError as exc:
                failed += 1
                typer.echo(f"error: {exc}", err=True)
                if bar:
                    bar.update(task, description=f"{src.name}: failed", visible=False)
                continue
            except MemoryError:
                failed += 1
                typer.echo(f"error: {src}: out of memory (try --decode-batch 1 or another backend)", err=True)
                continue
            except Exception as exc:  # any other failure of this source: say which, go on to the next
                failed += 1
                typer.echo(f"error: {src}: {type(exc).__name__}: {one_line(exc)}", err=True)
                continue
            if bar:
                bar.update(task, description=f"{src.name}: done", visible=False)
            for w in res.warnings:
                typer.echo(f"warning: {src.name}: {w}", err=True)
            if not quiet:
                if res.dicom:
                    say(f"{src}: {res.dicom}")
                outs = ", ".join(str(p) for p in res.outputs.values())
                say(f"{src} -> {outs} ({res.timings['total']:.1f} s)")
    if failed:
        if len(sources) > 1:  # one source: its own error line already says everything
            typer.echo(f"error: {failed} of {len(sources)} source(s) failed", err=True)
        raise typer.Exit(1)


def _progress(quiet: bool):
    import contextlib

    if quiet:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True)


if __name__ == "__main__":
    app()
