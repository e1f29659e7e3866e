"""`aldm train`: train the default-size ALDM on a BraTS-layout folder (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from aldm.cli._common import handle_errors, say, split_list


@handle_errors
def train(
    data: Annotated[Path, typer.Argument(help="BraTS-layout folder: <case>/<case>_{t1,t1ce,t2,flair}.nii.gz (BraTS-2023 t1n/t1c/t2w/t2f too).")],
    run: Annotated[Path, typer.Option(help="Run folder: split, cache, stage checkpoints and logs. Rerun with the same folder to resume.")],
    stages: Annotated[str, typer.Option(help="Stages to run, in order: 1 VQ-GAN, 2 MS-SPADE, 3 UNet.")] = "1,2,3",
    max_minutes: Annotated[float, typer.Option(help="Stop cleanly (checkpoint) after this much wall time; rerun to resume.")] = 115,
    checkpoint_minutes: Annotated[float, typer.Option(help="Checkpoint interval.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of weights, patches and noise.")] = 0,
    val_cases: Annotated[Optional[str], typer.Option(help="Comma-separated held-out cases. Default: every fifth of the sorted cases from the second on.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads. Default: all cores.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Train stages 1-3; each writes <run>/stageN/last.ckpt (official Lightning layout) and log.csv."""
    from aldm.training import run_training

    status = run_training(data, run, stages=tuple(int(s) for s in split_list(stages)),
                          max_minutes=max_minutes, checkpoint_minutes=checkpoint_minutes, seed=seed,
                          val_cases=split_list(val_cases) or None, threads=threads, quiet=quiet, say=say)
    for stage, done in status.items():
        say(f"stage {stage}: {'complete' if done else 'paused (time budget); rerun to resume'}")
