"""What every training stage shares: resumable state, timed atomic checkpoints, CSV loss logs,
a progress bar, a wall-clock budget so a background run stops cleanly and resumes later, and
where the arithmetic runs (`Compute`: device, autocast precision, gradient accumulation)."""

from __future__ import annotations

import csv
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from aldm.atomic import atomic_path
from aldm.models.checkpoint import read_checkpoint, save_official


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Compute:
    """Where and how a stage computes: `device` ("cpu", "cuda", "cuda:1"), autocast `precision`
    (fp32 = off; bf16; fp16 with a gradient scaler) and `accum` micro-batches per optimiser step
    (the effective batch is Budget.batch x accum). Weights, optimiser state and EMA stay fp32."""

    device: str = "cpu"
    precision: str = "fp32"
    accum: int = 1

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.accum < 1:
            raise ValueError(f"accum must be >= 1, not {self.accum}")
        torch.device(self.device)  # raises on a malformed name

    @property
    def kind(self) -> str:
        return torch.device(self.device).type

    def autocast(self):
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.kind, dtype=dtype or torch.float32, enabled=dtype is not None)

    def scaler(self) -> "torch.amp.GradScaler":
        return torch.amp.GradScaler(self.kind, enabled=self.precision == "fp16")

    def describe(self) -> str:
        return f"{self.device}, {self.precision}" + (f", {self.accum} micro-batches per step" if self.accum > 1 else "")


# ------------------------------------------------------------------------------ several processes

def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return dist_info()[0] == 0


def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if dist_info()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast_module(module: torch.nn.Module) -> None:
    """Every process takes rank 0's parameters and buffers (identical models before training)."""
    if dist_info()[1] == 1:
        return
    import torch.distributed as dist

    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != _comm_device().type:
            tmp = t.detach().to(_comm_device())
            dist.broadcast(tmp, 0)
            t.data.copy_(tmp)
        else:
            dist.broadcast(t.data, 0)


def broadcast_values(*values: float) -> list[float]:
    """Rank 0's numbers, on every process (decisions every process must share: stop, lr plan)."""
    if dist_info()[1] == 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.broadcast(t, 0)
    return t.tolist()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist_info()[1] == 1:
        return t
    import torch.distributed as dist

    tmp = t.to(_comm_device())
    dist.all_reduce(tmp)
    return tmp.to(t.device)


def sync_gradients(params: list[torch.Tensor]) -> None:
    """Average gradients over the processes (data parallel; what DDP's all-reduce does). A
    parameter no process computed a gradient for keeps none, as in one process (the optimiser
    then leaves it alone: unused MS-SPADE class branches)."""
    rank, world = dist_info()
    if world == 1:
        return
    has = all_reduce_sum(torch.tensor([float(p.grad is not None) for p in params]))
    used = [p for p, h in zip(params, has.tolist()) if h > 0]
    if not used:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in used]
    flat = all_reduce_sum(torch._utils._flatten_dense_tensors(grads)) / world
    for p, g in zip(used, torch._utils._unflatten_dense_tensors(flat, grads)):
        p.grad = g.to(p.dtype)


def init_distributed(compute: "Compute") -> "Compute":
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPUs, nccl on GPUs) and
    return this process's Compute (cuda -> cuda:LOCAL_RANK). Unchanged in one process."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return compute
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if compute.kind == "cuda":
        compute = Compute(f"cuda:{local}", compute.precision, compute.accum)
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if compute.kind == "cuda" else "gloo")
    return compute


def backward_step(opt: torch.optim.Optimizer, scaler, compute: Compute,
                  micro: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One optimiser step over `compute.accum` micro-batches: `micro()` (run under autocast)
    returns {"loss": ..., other logged values}; each micro-batch's gradients are accumulated
    (backward right away, so only one graph is alive), then the (scaled) step. Returns the
    detached means over the micro-batches, and "finite": False when the step was skipped
    because a gradient was inf/nan (one device sync per step, for that check)."""
    opt.zero_grad(set_to_none=True)
    params = [p for g in opt.param_groups for p in g["params"]]
    sums: dict[str, torch.Tensor] = {}
    for _ in range(compute.accum):
        with compute.autocast():
            out = micro()
        scaler.scale(out["loss"].float() / compute.accum).backward()
        for k, v in out.items():
            v = v.detach().float()
            sums[k] = sums[k] + v if k in sums else v
    sync_gradients(params)  # several processes: every one steps with the mean gradient
    if scaler.is_enabled():  # fp16: the scaler skips steps with inf/nan gradients itself
        scaler.step(opt)
        scaler.update()
        finite = True
    else:  # a step with non-finite gradients would poison the weights and the EMA: skip it
        with_grad = [p for p in params if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(with_grad, float("inf")) if with_grad else torch.zeros(())
        finite = bool(torch.isfinite(norm))
        if finite:
            opt.step()
    out = {k: v / compute.accum for k, v in sums.items()}
    out["finite"] = finite
    return out


def to_cpu(obj: Any) -> Any:
    """A copy of `obj` (tensors in dicts/lists) with every tensor on the CPU (checkpoints hold CPU
    tensors only; the optimiser moves its state back to its parameters' device on load)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


@dataclass
class TrainState:
    stage: int
    step: int = 0
    elapsed_s: float = 0.0  # training time over all runs of this stage
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def rng_state(rng: np.random.Generator, device: str = "cpu") -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state,
             "python": random.getstate()}
    if torch.device(device).type == "cuda":  # noise is drawn on the GPU there
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def restore_rng(state: dict[str, Any], rng: np.random.Generator, device: str = "cpu") -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))
    rng.bit_generator.state = state["numpy"]
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class Loop:
    """Drives one stage: `for step in loop:` ... `loop.log(loss=...)`; checkpoints on a timer."""

    def __init__(self, stage_dir: Path, state: TrainState, total_steps: int, *, max_minutes: float,
                 checkpoint_minutes: float, save, quiet: bool = False, min_steps: int = 0):
        self.dir, self.state, self.total = stage_dir, state, total_steps
        self.min_steps = min_steps  # run at least this many steps, whatever the clock says
        self._first_step = state.step
        self._timed: tuple[int, float] | None = None  # (step, time) once the first steps are done
        self.deadline = time.monotonic() + 60 * max_minutes
        self.every = 60 * checkpoint_minutes
        self.save_fn = save
        self.quiet = quiet
        self._last_save = time.monotonic()
        self._t = time.monotonic()
        self._log_path = stage_dir / "log.csv"
        self._fields: list[str] | None = None
        self._bar = None
        self._main = is_main()  # several processes: only rank 0 logs and checkpoints
        self._world = dist_info()[1]
        self._planned_shared: int | None = None
        if self._main:
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

        if not self.quiet and self._main:
            self._bar = Progress(TextColumn(f"stage {self.state.stage}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("", total=self.total, completed=self.state.step, info="")
        try:
            while self._go():
                yield self.state.step
                self.state.step += 1
                now = time.monotonic()
                if self._timed is None and self.state.step - self._first_step == 3:
                    self._timed = (self.state.step, now)  # after warm-up (allocation, autotuning)
                self.state.elapsed_s += now - self._t
                self._t = now
                if now - self._last_save > self.every:
                    self.checkpoint()
        finally:
            self.checkpoint()
            if self._bar:
                self._bar.stop()
            barrier()  # the next stage reads this one's checkpoint

    def _go(self) -> bool:
        go = self.state.step < self.total and (time.monotonic() < self.deadline
                                               or self.state.step - self._first_step < self.min_steps)
        if self._world > 1:  # rank 0's clock decides for every process
            flag, planned = broadcast_values(float(go), float(self._local_planned()))
            go, self._planned_shared = bool(flag), int(planned)
        return go

    @property
    def planned(self) -> int:
        """The step this run will stop at: `total`, or fewer where the wall-clock budget ends
        first, estimated from the step time measured so far (for an lr schedule sized to the
        time: see Budget.decay_frac). Several processes: rank 0's estimate."""
        if self._planned_shared is not None:
            return self._planned_shared
        return self._local_planned()

    def _local_planned(self) -> int:
        if self._timed is None or self.state.step <= self._timed[0]:
            return self.total
        step0, t0 = self._timed
        per_step = (time.monotonic() - t0) / (self.state.step - step0)
        left = max(0.0, self.deadline - time.monotonic())
        return min(self.total, self.state.step + int(left / per_step))

    @property
    def done(self) -> bool:
        return self.state.step >= self.total

    def checkpoint(self) -> None:
        if self._main:
            self.save_fn()
        self._last_save = time.monotonic()

    def log(self, **values: float) -> None:
        if not self._main:
            return
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
               ema: dict[str, torch.Tensor] | None = None, extra: dict | None = None,
               compute: Compute | None = None, scaler=None) -> None:
    """Official Lightning layout plus our resumable training state under `aldm_train`; every
    tensor is copied to the CPU first, whatever device trained it."""
    compute = compute or Compute()
    train = {"stage": state.stage, "step": state.step, "elapsed_s": state.elapsed_s,
             "seed": state.seed, "extra": state.extra, "optimizer": to_cpu(optimizer.state_dict()),
             "rng": rng_state(rng, compute.device), "precision": compute.precision,
             "accum": compute.accum}
    if scaler is not None and scaler.is_enabled():
        train["grad_scaler"] = to_cpu(scaler.state_dict())
    save_official(path, to_cpu(state_dict), to_cpu(ema) if ema is not None else None,
                  global_step=state.step, extra={"aldm_config": config, "aldm_train": train, **(extra or {})})


def load_stage(path: Path) -> dict[str, Any]:
    return read_checkpoint(path)
