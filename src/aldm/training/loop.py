"""What every training stage shares: resumable state, timed atomic checkpoints, CSV loss logs,
a progress bar, and a wall-clock budget so a background run stops cleanly and resumes later."""

from __future__ import annotations

import csv
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aldm.atomic import atomic_path
from aldm.models.checkpoint import read_checkpoint, save_official


@dataclass
class TrainState:
    stage: int
    step: int = 0
    elapsed_s: float = 0.0  # training time over all runs of this stage
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state,
            "python": random.getstate()}


def restore_rng(state: dict[str, Any], rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    rng.bit_generator.state = state["numpy"]
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class Loop:
    """Drives one stage: `for step in loop:` ... `loop.log(loss=...)`; checkpoints on a timer."""

    def __init__(self, stage_dir: Path, state: TrainState, total_steps: int, *, max_minutes: float,
                 checkpoint_minutes: float, save, quiet: bool = False):
        self.dir, self.state, self.total = stage_dir, state, total_steps
        self.deadline = time.monotonic() + 60 * max_minutes
        self.every = 60 * checkpoint_minutes
        self.save_fn = save
        self.quiet = quiet
        self._last_save = time.monotonic()
        self._t = time.monotonic()
        self._log_path = stage_dir / "log.csv"
        self._fields: list[str] | None = None
        self._bar = None
        self._trim_log()

    def _trim_log(self) -> None:
        """Drop logged rows past the resumed step: that work died with the run that logged it and
        is about to be redone, so the CSV keeps one row per step."""
        if not self._log_path.exists():
            return
        with open(self._log_path, newline="") as f:
            rows = list(csv.reader(f))
        keep = rows[:1] + [r for r in rows[1:] if _step_row(r, rows[0]) < self.state.step]
        if len(keep) < len(rows):
            with atomic_path(self._log_path) as tmp, open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(keep)

    def __iter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if not self.quiet:
            self._bar = Progress(TextColumn(f"stage {self.state.stage}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("", total=self.total, completed=self.state.step, info="")
        try:
            while self.state.step < self.total and time.monotonic() < self.deadline:
                yield self.state.step
                self.state.step += 1
                now = time.monotonic()
                self.state.elapsed_s += now - self._t
                self._t = now
                if now - self._last_save > self.every:
                    self.checkpoint()
        finally:
            self.checkpoint()
            if self._bar:
                self._bar.stop()

    @property
    def done(self) -> bool:
        return self.state.step >= self.total

    def checkpoint(self) -> None:
        self.save_fn()
        self._last_save = time.monotonic()

    def log(self, **values: float) -> None:
        row = {"step": self.state.step, "elapsed_s": round(self.state.elapsed_s, 1),
               **{k: float(v) for k, v in values.items()}}
        new = not self._log_path.exists()
        if self._fields is None:
            self._fields = list(row)
        with open(self._log_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        if self._bar:
            info = " ".join(f"{k} {v:.4f}" for k, v in values.items())
            self._bar.update(self._task, completed=self.state.step + 1, info=info)


def _step_row(row: list[str], header: list[str]) -> float:
    """The step of a logged row; inf (dropped) for a row a killed run left half-written."""
    try:
        return int(row[0]) if len(row) >= len(header) else float("inf")
    except (ValueError, IndexError):
        return float("inf")


def save_stage(path: Path, state_dict: dict[str, torch.Tensor], state: TrainState, *,
               config: dict, optimizer: torch.optim.Optimizer, rng: np.random.Generator,
               ema: dict[str, torch.Tensor] | None = None, extra: dict | None = None) -> None:
    """Official Lightning layout plus our resumable training state under `aldm_train`."""
    train = {"stage": state.stage, "step": state.step, "elapsed_s": state.elapsed_s,
             "seed": state.seed, "extra": state.extra, "optimizer": optimizer.state_dict(),
             "rng": rng_state(rng)}
    save_official(path, {k: v.detach().clone() for k, v in state_dict.items()}, ema,
                  global_step=state.step, extra={"aldm_config": config, "aldm_train": train, **(extra or {})})


def load_stage(path: Path) -> dict[str, Any]:
    return read_checkpoint(path)
