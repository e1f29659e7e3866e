"""`aldm train`: the official three stages on a BraTS-layout folder, resumable, on a CPU or a GPU.

Needs torch (`pip install 'aldm[train]'`). A run folder holds the split, the model size
(`config.json`), the preprocessed cache, one folder per stage (`last.ckpt` in the official layout,
`log.csv`) and the latent cache.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import torch

from aldm.atomic import atomic_path, clean_partials, write_text
from aldm.errors import UsageError
from aldm.models.aldm import VQModel
from aldm.models.config import LDMConfig
from aldm.runtime.manifest import Preprocessing
from aldm.training.data import cache_cases, find_cases, split
from aldm.training.loop import Compute, barrier, dist_info, init_distributed, load_stage
from aldm.training.stages import (BUDGETS, OFFICIAL, SMALL, Budget, sized, stage_path, train_stage1,
                                  train_stage2, train_stage3)

__all__ = ["run_training", "Compute", "SMALL", "OFFICIAL", "BUDGETS", "sized", "init_distributed"]


def run_training(data: str | Path, run: str | Path, *, stages: tuple[int, ...] = (1, 2, 3),
                 max_minutes: float = 115, checkpoint_minutes: float = 10, seed: int = 0,
                 val_cases: list[str] | None = None, budgets: dict[int, Budget] = BUDGETS,
                 threads: int | None = None, quiet: bool = False, config: LDMConfig = SMALL,
                 preprocessing: Preprocessing | None = None, warmup: int = 300,
                 compute: Compute = Compute(), batch: int | None = None,
                 say: Callable[[str], None] = print) -> dict:
    """Run (or resume) the stages in order until done or `max_minutes` of wall time are used.

    `compute`: device, autocast precision and gradient accumulation (any of them may change
    between runs of one run folder); `batch` replaces every stage's micro-batch size. The model
    size (`config`) is fixed by the first run of a run folder (`config.json`)."""
    if threads:
        torch.set_num_threads(threads)
    if compute.kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device here (a CPU-only torch build, or no GPU)")
    if batch is not None:
        budgets = {k: dataclasses.replace(b, batch=batch) for k, b in budgets.items()}
    rank, world = dist_info()  # under torchrun: rank 0 prepares the data and writes every file
    if rank:
        say = lambda s: None  # noqa: E731
    run = Path(run)
    deadline = time.monotonic() + 60 * max_minutes
    train, val = split(find_cases(data), val_cases)
    if rank == 0:
        _prepare(run, config, train, val, preprocessing, say)
    barrier()
    cache = [run / "cache" / f"{c.name}.npz" for c in train]
    cfg = config
    left = lambda: max(0.0, (deadline - time.monotonic()) / 60)  # noqa: E731
    kw = dict(checkpoint_minutes=checkpoint_minutes, seed=seed, quiet=quiet, compute=compute)
    say(f"training on {compute.describe()}" + (f", {world} processes" if world > 1 else ""))
    status = {}

    if 1 in stages and not _done(run, 1, budgets):
        status[1] = train_stage1(run, cache, cfg, budget=budgets[1], max_minutes=left(), warmup=warmup, **kw)
        if not status[1]:
            return status
    vq = VQModel(cfg.first_stage_config)
    latents_file = run / "latents.pt"
    if 2 in stages or 3 in stages:
        vq.load_state_dict(load_stage(stage_path(run, 1))["state_dict"])
        if not latents_file.exists() and rank == 0:
            from aldm.training.stages import encode_cases

            latents = encode_cases(vq, cache, say, device=compute.device)
            with atomic_path(latents_file) as tmp:
                torch.save(latents, tmp)
        barrier()
        latents = torch.load(latents_file, map_location="cpu")
    if 2 in stages and not _done(run, 2, budgets):
        status[2] = train_stage2(run, latents, cfg, vq, budget=budgets[2], max_minutes=left(), **kw)
        if not status[2]:
            return status
    if 3 in stages and not _done(run, 3, budgets):
        vq.load_state_dict(load_stage(stage_path(run, 2))["state_dict"])
        status[3] = train_stage3(run, latents, cfg, vq, budget=budgets[3], max_minutes=left(), say=say, **kw)
    return status


def _prepare(run: Path, config: LDMConfig, train: list, val: list, preprocessing, say) -> None:
    """The run folder: cleaned of partial files, its model size and split checked and recorded,
    the training cases preprocessed (never the held-out ones)."""
    run.mkdir(parents=True, exist_ok=True)
    clean_partials(run)  # temporary files a killed run left
    config_file = run / "config.json"
    held = json.loads(config_file.read_text()) if config_file.exists() else None
    if held is None and stage_path(run, 1).exists():  # a run folder from before config.json
        held = load_stage(stage_path(run, 1)).get("aldm_config")
    if held is not None and held != json.loads(json.dumps(config.to_dict())):
        raise UsageError(f"{config_file} holds another model size; use the same --size and widths, "
                         "or a new --run folder")
    write_text(config_file, json.dumps(config.to_dict(), indent=1))
    split_file = run / "split.json"
    names = {"train": [c.name for c in train], "validation": [c.name for c in val]}
    if split_file.exists() and json.loads(split_file.read_text()) != names:
        raise UsageError(f"{split_file} holds another split; use a new --run folder")
    write_text(split_file, json.dumps(names, indent=1))
    say(f"{len(train)} training cases, {len(val)} held out: {', '.join(names['validation'])}")
    cache_cases(train, run / "cache", preprocessing or Preprocessing(), say=say)


def _done(run: Path, stage: int, budgets: dict[int, Budget]) -> bool:
    path = stage_path(run, stage)
    return path.exists() and load_stage(path)["aldm_train"]["step"] >= budgets[stage].steps
