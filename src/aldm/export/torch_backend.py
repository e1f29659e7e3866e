"""The `torch` backend: PyTorch on the checkpoint a model folder records, on the CPU (parity checks,
debugging) or a CUDA GPU (a real GPU path where TensorRT and onnxruntime-gpu are not installed).
The runtime never imports it; the command line registers it with
aldm.runtime.backends.register_backend, so an inference without it needs no torch.

Options: `--precision fp16` runs the networks under CUDA FP16 autocast (the DDIM update stays
FP32); the device is CUDA when torch sees one, else the CPU, or what ALDM_TORCH_DEVICE names
(cpu, cuda, cuda:1). Besides the four components it gives the sampler-step runner
(manifest.STEP_GRAPH, `unet_step`): TorchStepRunner.ddim_loop keeps x, c_concat, y and the
coefficient table on the device for the whole DDIM loop.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from aldm.errors import BackendError, ModelError, UsageError
from aldm.runtime.backends import register_backend
from aldm.runtime.manifest import COMPONENTS, STEP_GRAPH, ModelDir
from aldm.runtime.runners import Runner

PRECISIONS = ("fp32", "fp16")


def register(device: str | None = None) -> None:
    """Make `torch` a backend (what the command line does). device: None picks as torch_runners does."""
    register_backend("torch", lambda model, precision=None: torch_runners(model, precision=precision,
                                                                          device=device))


def torch_device(device: str | None = None) -> str:
    """`device`, else $ALDM_TORCH_DEVICE, else cuda when torch sees a GPU, else cpu."""
    import torch

    device = device or os.environ.get("ALDM_TORCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown torch device {device!r} (cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"torch device {device}: this torch sees no CUDA GPU")
    return str(dev)


def torch_runners(model: ModelDir, *, precision: str | None = None, device: str | None = None) -> dict[str, Runner]:
    """PyTorch on the checkpoint the manifest records: the four components and the step runner."""
    try:
        import torch  # noqa: F401

        from aldm.export.check import reference_model
    except ImportError:
        raise BackendError("the torch backend needs torch: pip install 'aldm[export]'") from None
    if not model.manifest.source.get("ldm_ckpt"):
        raise BackendError("the torch backend needs the source checkpoint, and this model's "
                           "manifest records none")
    device = torch_device(device)
    _check_precision(precision or "fp32", device)
    try:  # a relative path is found in the repository above the model folder, sha256 checked
        ref = reference_model(model, hint="run it from a clone of the aldm repository, which "
                                          "holds the file (or compare with `aldm check --reference CKPT`)")
    except ModelError as exc:
        raise BackendError(f"the torch backend needs the model's PyTorch weights: {exc}") from None
    return runners_from_model(ref, device, precision or "fp32")


def _check_precision(precision: str, device: str) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"the torch backend runs fp32 or fp16 (autocast), not {precision}")
    if precision == "fp16" and not device.startswith("cuda"):
        raise BackendError("the torch backend's fp16 is CUDA autocast: it needs a CUDA device")


def runners_from_model(ref, device: str = "cpu", precision: str = "fp32", *,
                       cudnn_benchmark: bool | None = None, device_noise: bool = False) -> dict[str, Runner]:
    """Runners over an ALDM already in memory (`ref`): the four components (TorchRunner) and
    STEP_GRAPH (TorchStepRunner). cudnn_benchmark (default: on for CUDA) lets cuDNN time its
    convolution algorithms at each new shape (the first call of a shape is slower, the rest
    faster; a process-wide setting)."""
    import torch

    from aldm.export.check import TorchRunner

    _check_precision(precision, device)
    fp16 = precision == "fp16"
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True if cudnn_benchmark is None else bool(cudnn_benchmark)
    runners: dict[str, Runner] = {c: TorchRunner(ref, c, device, autocast=fp16) for c in COMPONENTS}
    runners[STEP_GRAPH] = TorchStepRunner(ref, device, autocast=fp16, device_noise=device_noise)
    return runners


class TorchStepRunner:
    """One whole DDIM step on torch: the UNet (under FP16 autocast when `autocast`) then the DDIM
    update in FP32, the same expression in the same order as aldm.runtime.sampler.ddim_update (on
    the CPU in FP32 the loop equals the numpy loop to rounding).

    `infer` is the step graph's contract (x_t, t, c_concat, y, coef, noise -> x_prev), one call
    with host arrays. `ddim_loop` runs the whole loop where the model lives: x_T, c_concat, y, the
    timesteps and the coefficient table are uploaded once, x stays on the device between steps,
    and the result is copied to the host once at the end. A callback gets x on the host each
    step (a copy) unless aldm.runtime.sampler.progress_only marked it (then it gets None and no copy is made).

    Noise: the host `noise` callable is drawn exactly as the numpy loop draws it (every step with
    official_rng, even where sigma is 0), so a seeded translation replays the numpy noise stream; a
    draw is uploaded only when sigma > 0 (eta 0 uploads nothing per step). device_noise=True draws
    with torch.randn on the device instead (no host draw, no upload: faster at eta > 0, but the
    result no longer replays the numpy stream, only its distribution)."""

    def __init__(self, model, device: str = "cpu", autocast: bool = False, device_noise: bool = False):
        import torch

        self.model, self.autocast, self.device_noise = model, autocast, device_noise
        self.device = torch.device(device)
        self.name = f"torch-{self.device.type}" + ("/fp16" if autocast else "")
        self.uploads = 0  # host -> device copies made by ddim_loop (tests count them)
        self.downloads = 0  # device -> host copies

    def activate(self) -> None:
        self.model.to(self.device)

    def deactivate(self) -> None:
        pass

    # ------------------------------------------------------------------------------ pieces
    def _up(self, a: np.ndarray):
        import torch

        self.uploads += 1
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _down(self, x) -> np.ndarray:
        self.downloads += 1
        return x.float().cpu().numpy()

    def eps(self, x, t, c_concat, y):
        """The UNet's noise prediction, FP32 (from FP16 autocast when asked)."""
        import torch

        with torch.autocast(self.device.type, torch.float16, enabled=self.autocast):
            return self.model.unet(x, t, c_concat, y).float()

    @staticmethod
    def factors(coef):
        """Rows of ddim_coefficients (a_t, a_prev, sigma, sqrt(1 - a_t)), float32, (..., 4) -> the
        update's factors (sqrt(a_t), sqrt(1 - a_prev - sigma^2), sqrt(a_prev), sigma, sqrt(1 - a_t)),
        (..., 5): computed once per schedule, not per step."""
        import torch

        a_t, a_prev, sigma, s1m = coef.unbind(-1)
        return torch.stack([torch.sqrt(a_t), torch.sqrt(1 - a_prev - sigma**2), torch.sqrt(a_prev), sigma, s1m], -1)

    @staticmethod
    def update(x, eps, f, z):
        """ddim_update on tensors, f = one row of `factors` (0-d float32 tensors); z None adds
        nothing (sigma 0). Same expression, in the same order, as aldm.runtime.sampler.ddim_update."""
        sqrt_a_t, dir_coef, sqrt_a_prev, sigma, s1m = f.unbind()
        x0_hat = (x - s1m * eps) / sqrt_a_t
        out = sqrt_a_prev * x0_hat + dir_coef * eps
        return out if z is None else out + sigma * z

    # ------------------------------------------------------------------------------ runner protocol
    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        need = {"x_t", "t", "c_concat", "y", "coef", "noise"}
        if set(feeds) != need:
            raise BackendError(f"unet_step: inputs must be {sorted(need)}, got {sorted(feeds)}")
        self.activate()
        with torch.inference_mode():
            f = {k: self._up(np.asarray(v)) for k, v in feeds.items()}
            coef = f["coef"].float()
            x = f["x_t"].float()
            eps = self.eps(x, f["t"], f["c_concat"].float(), f["y"])
            out = self.update(x, eps, self.factors(coef), f["noise"].float())
            return {"x_prev": self._down(out)}

    def ddim_loop(self, x_T: np.ndarray, c_concat: np.ndarray, y: np.ndarray, schedule, noise, *,
                  official_rng: bool = True, callback=None) -> np.ndarray:
        """The DDIM loop of aldm.runtime.sampler.ddim_sample_steps with every tensor on the device."""
        import torch

        from aldm.runtime.sampler import ddim_coefficients, wants_x

        self.activate()
        sigmas = np.asarray(schedule.sigmas)
        taus = np.asarray(schedule.timesteps, np.int64)
        total = len(taus)
        needs_x = wants_x(callback)
        with torch.inference_mode():
            x = self._up(np.asarray(x_T, np.float32))
            c = self._up(np.asarray(c_concat, np.float32))
            yy = self._up(np.asarray(y, np.int64))
            fs = self.factors(self._up(ddim_coefficients(schedule)))
            ts = self._up(taus)
            shape, batch = tuple(x.shape), x.shape[0]
            gen = None
            if self.device_noise:
                gen = torch.Generator(self.device)
                gen.manual_seed(int(np.random.SeedSequence().generate_state(1)[0]))
            for i in range(total):
                j = total - 1 - i
                z = None
                if self.device_noise:
                    if sigmas[j] > 0:
                        z = torch.randn(shape, generator=gen, device=self.device, dtype=torch.float32)
                elif sigmas[j] > 0 or official_rng:
                    drawn = noise(shape)
                    if sigmas[j] > 0:  # sigma 0: the draw only keeps the stream in step
                        z = self._up(np.asarray(drawn, np.float32))
                x = self.update(x, self.eps(x, ts[j].expand(batch), c, yy), fs[j], z)
                if callback is not None:
                    callback(i, total, int(taus[j]), self._down(x) if needs_x else None)
            return self._down(x)
