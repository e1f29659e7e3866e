"""`aldm train`: train ALDM on a BraTS-layout folder (resumable), default size or official, CPU or GPU."""

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
    device: Annotated[str, typer.Option(help="Where to train: cpu, cuda or cuda:N.")] = "cpu",
    precision: Annotated[str, typer.Option(help="Autocast precision: fp32 (off), bf16, or fp16 (with a gradient scaler). Weights, optimiser state and EMA stay fp32.")] = "fp32",
    accum: Annotated[int, typer.Option(help="Gradient accumulation: micro-batches per optimiser step.")] = 1,
    batch: Annotated[Optional[int], typer.Option(help="Micro-batch size of every stage. Default: each stage's own (2, 4, 4).")] = None,
    size: Annotated[str, typer.Option(help="Model size: small (the bundled default model's widths) or official (the paper's: 58.6 M parameters, a GPU's size). Fixed by a run folder's first run.")] = "small",
    unet_channels: Annotated[Optional[int], typer.Option(help="UNet model_channels (a multiple of 32). Default: the size's (32 small, 128 official).")] = None,
    spade_nf: Annotated[Optional[int], typer.Option(help="MS-SPADE width nf; its hidden width is half. Default: the size's (32 / 128).")] = None,
    vq_channels: Annotated[Optional[int], typer.Option(help="VQ-GAN base width ch. Default: the size's (16 / 64).")] = None,
) -> None:
    """Train stages 1-3; each writes <run>/stageN/last.ckpt (official Lightning layout) and log.csv.

    Several GPUs (data parallel): torchrun --no-python --nproc_per_node N aldm train ... --device cuda
    (each process trains on its own patches, gradients are averaged; the effective batch is N x batch x accum)."""
    from aldm.errors import UsageError
    from aldm.training import Compute, init_distributed, run_training, sized

    try:
        config = sized(size, unet_channels=unet_channels, spade_nf=spade_nf, vq_channels=vq_channels)
        compute = Compute(device, precision, accum)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None
    if compute.kind == "cuda" and not torch_cuda():
        raise UsageError("--device cuda: torch sees no CUDA device here (a CPU-only torch build, or no GPU)")
    compute = init_distributed(compute)  # under torchrun: one process per GPU (or gloo on CPUs)
    status = run_training(data, run, stages=tuple(int(s) for s in split_list(stages)),
                          max_minutes=max_minutes, checkpoint_minutes=checkpoint_minutes, seed=seed,
                          val_cases=split_list(val_cases) or None, threads=threads, quiet=quiet,
                          config=config, compute=compute, batch=batch, say=say)
    for stage, done in status.items():
        say(f"stage {stage}: {'complete' if done else 'paused (time budget); rerun to resume'}")


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
