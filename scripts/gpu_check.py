#!/usr/bin/env python3
"""What one lent GPU call can measure (issue 19 item 4): the full-size ALDM (official widths,
seeded random weights: speed does not depend on the values) on PyTorch, two ways, one T1 -> {T2,
FLAIR} translation each (one source, two targets: batch 2 through SPADE and the UNet):

* peer: PyTorch eager FP32 with the official per-step structure (DDIMSampler.p_sample_ddim: a UNet
  forward, then the coefficients broadcast with torch.full from 0-d CUDA tensors, i.e. a
  device -> host read per coefficient per step, the update and torch.randn on the device), cuDNN
  and TF32 left at PyTorch's defaults, as the official code leaves them;
* ours: the aldm torch backend (aldm.export.torch_backend): FP16 autocast, the DDIM loop resident
  on the device (TorchStepRunner.ddim_loop), the components through their runners with host
  arrays between stages as aldm's Pipeline passes them, cuDNN autotuning on;

plus their ratio, per-component times (encoder, spade, UNet per step, decoder: network time on
device-resident inputs), peak GPU memory (torch.cuda.max_memory_allocated), FLOPs per component
(torch.utils.flop_counter on the meta device: the method of ../shared/reference/FLOPs.md, 2 FLOPs
per multiply-accumulate) and the fraction of the GPU's peak they reach. It says what it could not
run (TensorRT, ONNX Runtime CUDA: not installed on the lent machine) instead of failing.

Every measurement is in its own try/except (a failure is recorded under "errors" and the rest
runs), the JSON is rewritten after every stage, and a time budget (--budget-s) skips what would
not fit. Output under --out: gpu_check.json and gpu_check_summary.txt.

Fit (full size, --steps 50): one translation is 2.32 (encode) + 4.71 (SPADE, batch 2; this
implementation runs all four class branches) + 50 x 1.50 (UNet, batch 2) + 2 x 5.75 (decode) =
93.4 TFLOP. Even at a pessimistic 25 TFLOP/s (3 % of the H200's dense FP16 peak, 5 % of TF32) that
is 3.7 s per translation; the check runs about 12 translations' worth (warm-ups, 3 timed runs per
path, the variants) plus cuDNN's autotuning and the model build: about 1-2 minutes expected,
under the 480 s budget by a wide margin, inside a 600 s call.

    python3 scripts/gpu_check.py --out DIR [--steps 50] [--eta 1] [--budget-s 480]
    python3 scripts/gpu_check.py --dry-run --out DIR    # CPU, tiny model, same code path, < 1 min
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

# NVIDIA H200 SXM datasheet (nvidia.com/en-us/data-center/h200, "H200 Tensor Core GPU" datasheet;
# the same compute as the H100 SXM): FP16/BF16 tensor 1,979 TFLOPS and TF32 tensor 989 TFLOPS
# *with sparsity*, i.e. half of that dense; FP32 (no tensor cores) 67 TFLOPS.
DATASHEET = {"name": "NVIDIA H100/H200 SXM datasheet, dense (no sparsity)",
             "fp16_tensor_tflops": 989.5, "tf32_tensor_tflops": 494.7, "fp32_tflops": 67.0}
NOT_INSTALLED_WHY = "not installed here (the lent machine has neither, and no network to install them)"


class Check:
    """The report, written after every stage; `stage` runs one measurement in a try/except."""

    def __init__(self, out: Path, budget_s: float, t0: float):
        self.out, self.budget_s, self.t0 = out, budget_s, t0
        self.report: dict = {"errors": {}, "skipped": {}, "stages_done": []}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def stage(self, name: str, fn, *, need_s: float | None = None):
        """need_s: skip the stage when fewer seconds are left (None: always run it)."""
        if need_s is not None and self.left() < need_s:
            self.report["skipped"][name] = f"time budget: {self.left():.0f} s left, needs about {need_s:.0f} s"
            say(f"[{name}] skipped: {self.report['skipped'][name]}")
            self.write()
            return None
        say(f"[{name}] ...")
        t = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - one failure must not lose the other measurements
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.report["errors"][name] = msg
            say(f"[{name}] FAILED: {msg}")
            traceback.print_exc()
            result = None
        else:
            self.report["stages_done"].append(name)
            say(f"[{name}] done in {time.perf_counter() - t:.1f} s")
        self.write()
        return result

    def write(self) -> None:
        self.report["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=1, default=_jsonable))
        tmp.replace(self.out / "gpu_check.json")
        (self.out / "gpu_check_summary.txt").write_text(summary(self.report))


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return str(v)


def say(s: str) -> None:
    print(s, flush=True)


# --------------------------------------------------------------------------------------- timing

class Timer:
    """Wall-clock timing of calls with the device synchronised before and after each."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gb(self):
        return round(self.torch.cuda.max_memory_allocated() / 1e9, 3) if self.cuda else None

    def time(self, fn, warmup: int, repeats: int, left=None) -> dict:
        """warmup untimed calls, then up to `repeats` timed ones (fewer when `left()` seconds would
        not hold another); mean/min/max seconds and the peak memory of the timed calls."""
        t_warm = []
        for _ in range(warmup):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            t_warm.append(time.perf_counter() - t)
        self.reset_peak()
        times = []
        for _ in range(max(1, repeats)):
            if times and left is not None and left() < 2 * max(times):
                break
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return {"mean_s": float(np.mean(times)), "min_s": float(np.min(times)), "max_s": float(np.max(times)),
                "n": len(times), "warmup_s": [round(w, 4) for w in t_warm], "peak_gpu_gb": self.peak_gb()}


# --------------------------------------------------------------------------------------- setup

def environment(torch, device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "device": str(device), "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
           "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_memory_gb=round(p.total_memory / 1e9, 1),
                   capability=f"{p.major}.{p.minor}")
    return env


def not_run() -> list[dict]:
    """What this check cannot run here, and why: TensorRT and ONNX Runtime CUDA need their own
    wheels (far over what travels with a call); where they are installed, scripts/gpu_check.sh
    runs its TensorRT part after this check."""
    out = []
    if importlib.util.find_spec("tensorrt") is None:
        out.append({"name": "tensorrt", "why": "tensorrt " + NOT_INSTALLED_WHY})
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        ort_note = f"onnxruntime {ort.__version__} here has {', '.join(providers)} only"
    except ImportError:
        providers, ort_note = [], "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in providers:
        out.append({"name": "ort-cuda", "why": f"onnxruntime-gpu {NOT_INSTALLED_WHY}; {ort_note}"})
    return out


def build_model(torch, cfg, seed: int):
    from aldm.models import ALDM

    torch.manual_seed(seed)
    return ALDM(cfg).eval()


def count_flops(torch, cfg, shapes: dict) -> dict:
    """FLOPs of each component at this check's shapes, counted by torch's FlopCounterMode on the
    meta device (no arithmetic, seconds even at full size)."""
    from torch.utils.flop_counter import FlopCounterMode

    from aldm.models import ALDM

    with torch.device("meta"):
        m = ALDM(cfg).eval()
        t = make_tensors(torch, shapes, torch.device("meta"))
    calls = component_calls(m, t)
    out = {}
    for name, fn in calls.items():
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            fn()
        out[name] = int(fc.get_total_flops())
    s = shapes["steps"]
    out["e2e"] = out["encoder"] + out["spade"] + s * out["unet"] + shapes["targets"] * out["decoder"]
    out["method"] = ("torch.utils.flop_counter.FlopCounterMode on the meta device, 2 FLOPs per "
                     "multiply-accumulate (convolutions, matmuls); encoder includes quant_conv and the "
                     "quantizer's distance matmul; spade and unet at batch = targets; decoder per volume")
    out["e2e_formula"] = f"encoder + spade + {s} x unet + {shapes['targets']} x decoder"
    return out


def make_tensors(torch, shapes: dict, device) -> dict:
    g = torch.Generator().manual_seed(0)
    b, lat, vol = shapes["targets"], shapes["latent"], shapes["crop"]

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device) if device.type != "meta" else torch.empty(*shape, device=device)

    return {"x1": randn(1, 1, *vol), "z1": randn(1, 4, *lat), "z2": randn(b, 4, *lat),
            "x_t": randn(b, 4, *lat), "c": randn(b, 8, *lat),
            "t": torch.full((b,), 500, dtype=torch.long, device=device),
            "y": torch.arange(2, 2 + b, device=device) % 4}


def component_calls(m, t: dict) -> dict:
    vq = m.first_stage_model
    return {"encoder": lambda: vq.quantize(vq.quant_conv(vq.encoder(t["x1"])))[0],
            "spade": lambda: m.spade(t["z2"], t["y"]),
            "unet": lambda: m.unet(t["x_t"], t["t"], t["c"], t["y"]),
            "decoder": lambda: m.decode(t["z1"])}


def matmul_ceiling(torch, device, n: int, dtype, tf32: bool, repeats: int) -> float:
    """TFLOP/s of an n x n x n matrix product: the practical ceiling to read fractions against."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        timer = Timer(torch, device)
        r = timer.time(lambda: a @ b, warmup=2, repeats=repeats)
        return 2 * n**3 / r["mean_s"] / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


# --------------------------------------------------------------------------------------- the two paths

def peer_translate(torch, m, x_host: np.ndarray, classes: np.ndarray, sched, device, seed: int) -> np.ndarray:
    """The official structure: everything on the device in FP32, the DDIM loop of
    DDIMSampler.sample / p_sample_ddim (ldm/models/diffusion/ddim.py) with its host reads."""
    dev = device
    torch.manual_seed(seed)
    with torch.inference_mode():
        x = torch.from_numpy(x_host).to(dev)
        z = m.encode(x)
        zz = z.repeat(len(classes), 1, 1, 1, 1)
        y = torch.from_numpy(classes).to(dev)
        c = torch.cat([zz, m.spade(zz, y)], dim=1) * m.scale_factor
        # the official sampler's buffers: ddim_alphas, ddim_sigmas and ddim_sqrt_one_minus_alphas
        # are CUDA tensors (its register_buffer moves them), ddim_alphas_prev a numpy array
        alphas = torch.tensor(sched.alphas, dtype=torch.float32, device=dev)
        sigmas = torch.tensor(sched.sigmas, dtype=torch.float32, device=dev)
        s1m = torch.tensor(sched.sqrt_one_minus_alphas, dtype=torch.float32, device=dev)
        alphas_prev = np.asarray(sched.alphas_prev)
        b = zz.shape[0]
        img = torch.randn(zz.shape, device=dev)
        total = len(sched.timesteps)
        for i, step in enumerate(np.flip(sched.timesteps)):
            index = total - i - 1
            ts = torch.full((b,), int(step), device=dev, dtype=torch.long)
            e_t = m.unet(img, ts, c, y)
            # torch.full with a 0-d CUDA tensor reads it on the host: a sync per coefficient, as officially
            a_t = torch.full((b, 1, 1, 1, 1), alphas[index].item(), device=dev)
            a_prev = torch.full((b, 1, 1, 1, 1), float(alphas_prev[index]), device=dev)
            sigma_t = torch.full((b, 1, 1, 1, 1), sigmas[index].item(), device=dev)
            sqrt_one_minus_at = torch.full((b, 1, 1, 1, 1), s1m[index].item(), device=dev)
            pred_x0 = (img - sqrt_one_minus_at * e_t) / a_t.sqrt()
            dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
            noise = sigma_t * torch.randn(img.shape, device=dev)
            img = a_prev.sqrt() * pred_x0 + dir_xt + noise
        vols = [m.decode(img[k : k + 1] / m.scale_factor) for k in range(b)]
        return torch.cat(vols).cpu().numpy()


def ours_translate(runners: dict, x_host: np.ndarray, classes: np.ndarray, sched, seed: int, *,
                   scale: float, channels: int = 4, loop: str = "device") -> tuple[np.ndarray, dict]:
    """What aldm's Pipeline.translate does with the torch backend's runners (host arrays between
    stages); loop "device": the step runner's ddim_loop, "numpy": ddim_sample around the UNet
    runner (a host round trip per step, the path without the step runner). Returns the volumes
    and each stage's seconds."""
    from aldm.runtime import sampler as S

    noise = S.gaussian_noise(np.random.default_rng(seed))
    times = {}
    t = time.perf_counter()
    z = runners["encoder"].infer({"x": x_host})["z_q"]
    times["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    zz = np.concatenate([z] * len(classes))
    z_tgt = runners["spade"].infer({"z": zz, "y": classes})["z_tgt"]
    c = (np.concatenate([zz, z_tgt], axis=1) * np.float32(scale)).astype(np.float32)
    times["spade"] = time.perf_counter() - t
    t = time.perf_counter()
    x_T = noise((c.shape[0], channels) + c.shape[2:])
    if loop == "device":
        z0 = runners["unet_step"].ddim_loop(x_T, c, classes, sched, noise)
    else:
        unet = runners["unet"]
        z0 = S.ddim_sample(lambda x, tt: unet.infer({"x_t": x, "t": tt, "c_concat": c, "y": classes})["eps"],
                           x_T, sched, noise)
    times["sample"] = time.perf_counter() - t
    t = time.perf_counter()
    zs = (z0 / np.float32(scale)).astype(np.float32)
    vol = np.concatenate([runners["decoder"].infer({"z": zs[k : k + 1]})["x_rec"] for k in range(len(zs))])
    times["decode"] = time.perf_counter() - t
    return vol, times


# --------------------------------------------------------------------------------------- the check

def run(args) -> int:
    t0 = time.perf_counter()
    out = Path(args.out)
    chk = Check(out, args.budget_s, t0)
    rep = chk.report
    import torch

    from aldm.export.torch_backend import runners_from_model
    from aldm.models import LDMConfig
    from aldm.runtime import sampler as S

    dry = args.dry_run
    if dry:  # one thread: the dry run proves the path, and a shared CPU runs it no slower
        torch.set_num_threads(1)
    device = torch.device("cpu" if dry else args.device)
    cfg = LDMConfig.tiny() if dry else LDMConfig()
    crop = (16, 16, 16) if dry else (144, 192, 144)
    steps = args.steps or (4 if dry else 50)
    try:
        S.ddim_timesteps(steps)
    except Exception as exc:  # a bad --steps: one line, before any device time is spent
        say(f"error: {exc}")
        return 2
    latent = tuple(s // 4 for s in crop)
    classes = np.array([2, 3], np.int64)  # T1 -> {T2, FLAIR}
    shapes = {"crop": crop, "latent": latent, "targets": len(classes), "steps": steps}
    ours_precision = "fp16" if device.type == "cuda" else "fp32"
    warm, reps = (1, 1) if dry else (1, 3)
    rep["mode"] = "dry-run (CPU, LDMConfig.tiny(), tiny crop: proves the code path, not a measurement)" if dry \
        else "full size (LDMConfig(): official widths, seeded random weights)"
    rep["config"] = {"ldm": "LDMConfig.tiny()" if dry else "LDMConfig()", "crop": crop, "latent": latent,
                     "targets": ["t2", "flair"], "source": "t1", "unet_batch": len(classes), "steps": steps,
                     "eta": args.eta, "seed": args.seed, "peer_precision": "fp32 (eager; cuDNN and TF32 as "
                     "PyTorch defaults them)", "ours_precision": ours_precision
                     + ("" if device.type == "cuda" else " (FP16 autocast needs CUDA; the dry run is FP32)")}
    rep["not_run"] = not_run()
    for n in rep["not_run"]:
        say(f"not run: {n['name']}: {n['why']}")
    chk.stage("environment", lambda: rep.__setitem__("env", environment(torch, device)))
    if device.type == "cuda" and not torch.cuda.is_available():
        rep["errors"]["environment"] = "torch sees no CUDA device (run with --dry-run on a CPU)"
        chk.write()
        return 1

    def flops():
        rep["flops"] = count_flops(torch, cfg, shapes)

    chk.stage("flops", flops)

    def peaks():
        n = 256 if dry else 8192
        rep["peak"] = {"datasheet": DATASHEET,
                       "measured_matmul_tflops": {
                           "fp16": matmul_ceiling(torch, device, n, torch.float16 if device.type == "cuda"
                                                  else torch.float32, False, 10),
                           "fp32_tf32_on": matmul_ceiling(torch, device, n, torch.float32, True, 3),
                           "fp32_tf32_off": matmul_ceiling(torch, device, n, torch.float32, False, 3)},
                       "measured_how": f"{n}^3 matrix products, random data, mean of timed calls after 2 warm-ups"
                                       + (" (CPU dry run: fp16 row is fp32)" if device.type != "cuda" else "")}

    chk.stage("peak_ceilings", peaks)

    t = time.perf_counter()
    model = chk.stage("build_model", lambda: build_model(torch, cfg, args.seed))
    if model is None:
        return 1
    timer = Timer(torch, device)

    def inputs():
        model.to(device)
        rep["build_model_s"] = round(time.perf_counter() - t, 2)
        return (S.ddim_schedule(model.alphas_cumprod, steps, args.eta),
                np.random.default_rng(args.seed).uniform(-1, 1, (1, 1) + crop).astype(np.float32),
                make_tensors(torch, shapes, device))

    made = chk.stage("inputs", inputs)
    if made is None:
        return 1
    sched, x_host, tensors = made

    def components(autocast: bool) -> dict:
        res = {}
        for name, fn in component_calls(model, tensors).items():
            def call(fn=fn):
                with torch.inference_mode(), torch.autocast(device.type, torch.float16, enabled=autocast):
                    fn()
            try:
                res[name] = timer.time(call, warmup=warm, repeats=5 if not dry else 1, left=chk.left)
            except Exception as exc:  # noqa: BLE001
                res[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        return res

    # ---- the peer: eager FP32, official structure (cuDNN's defaults: no autotuning)
    torch.backends.cudnn.benchmark = False
    rep["peer"] = {"what": "PyTorch eager FP32, the official DDIMSampler's per-step structure (host reads "
                           "of the coefficients each step), cudnn.benchmark off, TF32 as PyTorch defaults it"}

    def peer_components():
        rep["peer"]["components"] = components(autocast=False)

    def need(factor: float, default: float) -> float:
        """Seconds a stage of `factor` translations needs, from the slowest translation timed so
        far (`default` before any)."""
        seen = [r["e2e"]["mean_s"] for r in (rep.get("peer", {}), rep.get("ours", {})) if "e2e" in r]
        return factor * max(seen) if seen else default

    chk.stage("peer_components", peer_components, need_s=need(2, 5 if dry else 20))

    def peer_e2e():
        r = timer.time(lambda: peer_translate(torch, model, x_host, classes, sched, device, args.seed),
                       warmup=warm, repeats=reps, left=chk.left)
        rep["peer"]["e2e"] = r
        # the loop per step, from one more run with the stages split
        torch.manual_seed(args.seed)
        rep["peer"]["sample_per_step_s"] = peer_loop_per_step(torch, model, classes, sched, device, timer, tensors)

    chk.stage("peer_e2e", peer_e2e, need_s=need(warm + reps + 1, 5 if dry else 30))

    # ---- ours: the torch backend, FP16 autocast, device-resident loop
    runners = chk.stage("ours_runners", lambda: runners_from_model(model, str(device), ours_precision))
    rep["ours"] = {"what": f"aldm torch backend, {ours_precision}"
                   + (" autocast" if ours_precision == "fp16" else "")
                   + ", DDIM loop on the device (TorchStepRunner.ddim_loop, host noise stream), "
                     "host arrays between stages as Pipeline passes them, cudnn.benchmark on"}
    if runners is None:
        return 1
    for r in runners.values():
        r.activate()

    def ours_components():
        rep["ours"]["components"] = components(autocast=ours_precision == "fp16")

    chk.stage("ours_components", ours_components, need_s=need(2, 5 if dry else 20))

    def ours_e2e(loop: str, key: str, **runner_opts):
        def go():
            rs = runners if not runner_opts else runners_from_model(model, str(device), ours_precision, **runner_opts)
            stage_times = []

            def once():
                stage_times.append(ours_translate(rs, x_host, classes, sched, args.seed,
                                                  scale=model.scale_factor, loop=loop)[1])

            r = timer.time(once, warmup=warm, repeats=reps, left=chk.left)
            timed = stage_times[warm:]
            r["stages_s"] = {k: float(np.mean([s[k] for s in timed])) for k in timed[0]}
            r["sample_per_step_s"] = r["stages_s"]["sample"] / steps
            rep.setdefault(key, {})["e2e"] = r
        return go

    chk.stage("ours_e2e", ours_e2e("device", "ours"), need_s=need(warm + reps, 5 if dry else 30))
    rep["ours_numpy_loop"] = {"what": "the same runners without the step runner: ddim_sample (numpy update) "
                                      "around the UNet runner, a host round trip per step"}
    chk.stage("ours_numpy_loop_e2e", ours_e2e("numpy", "ours_numpy_loop"), need_s=need(warm + reps, 60))
    rep["ours_device_noise"] = {"what": "ours with torch.randn on the device (no host draw or upload per step; "
                                        "does not replay the numpy noise stream)"}
    chk.stage("ours_device_noise_e2e", ours_e2e("device", "ours_device_noise", device_noise=True),
              need_s=need(warm + reps, 30))

    chk.stage("ratios", lambda: rep.__setitem__("ratio", ratios(rep)))
    chk.stage("fraction_of_peak", lambda: rep.__setitem__("fraction_of_peak", fractions(rep, steps)))
    rep["total_s"] = round(time.perf_counter() - t0, 1)
    chk.write()
    say(summary(rep))
    return 0 if not rep["errors"] else 1


def peer_loop_per_step(torch, m, classes, sched, device, timer, tensors) -> float:
    """The official loop alone (a UNet forward, the host-read coefficients, the update): seconds per step."""
    dev = device
    alphas = torch.tensor(sched.alphas, dtype=torch.float32, device=dev)
    sigmas = torch.tensor(sched.sigmas, dtype=torch.float32, device=dev)
    s1m = torch.tensor(sched.sqrt_one_minus_alphas, dtype=torch.float32, device=dev)
    alphas_prev = np.asarray(sched.alphas_prev)
    c, y = tensors["c"], tensors["y"]
    b = c.shape[0]

    def loop():
        with torch.inference_mode():
            img = torch.randn((b, 4) + tuple(c.shape[2:]), device=dev)
            total = len(sched.timesteps)
            for i, step in enumerate(np.flip(sched.timesteps)):
                index = total - i - 1
                e_t = m.unet(img, torch.full((b,), int(step), device=dev, dtype=torch.long), c, y)
                a_t = torch.full((b, 1, 1, 1, 1), alphas[index].item(), device=dev)
                a_prev = torch.full((b, 1, 1, 1, 1), float(alphas_prev[index]), device=dev)
                sigma_t = torch.full((b, 1, 1, 1, 1), sigmas[index].item(), device=dev)
                sq = torch.full((b, 1, 1, 1, 1), s1m[index].item(), device=dev)
                pred_x0 = (img - sq * e_t) / a_t.sqrt()
                img = a_prev.sqrt() * pred_x0 + (1.0 - a_prev - sigma_t**2).sqrt() * e_t \
                    + sigma_t * torch.randn(img.shape, device=dev)
        return img

    r = timer.time(loop, warmup=0, repeats=1)
    return r["mean_s"] / len(sched.timesteps)


def ratios(rep: dict) -> dict:
    """peer time / our time (above 1: ours is faster)."""
    out = {}
    peer, ours = rep.get("peer", {}), rep.get("ours", {})
    if "e2e" in peer and "e2e" in ours:
        out["e2e"] = peer["e2e"]["mean_s"] / ours["e2e"]["mean_s"]
    if "sample_per_step_s" in peer and "e2e" in ours:
        out["sample_per_step"] = peer["sample_per_step_s"] / ours["e2e"]["sample_per_step_s"]
    for c, r in (ours.get("components") or {}).items():
        p = (peer.get("components") or {}).get(c, {})
        if "mean_s" in r and "mean_s" in p:
            out[f"component_{c}"] = p["mean_s"] / r["mean_s"]
    if "e2e" in rep.get("ours_numpy_loop", {}) and "e2e" in ours:
        out["device_loop_vs_numpy_loop_sample"] = (rep["ours_numpy_loop"]["e2e"]["stages_s"]["sample"]
                                                   / ours["e2e"]["stages_s"]["sample"])
    out["definition"] = "peer seconds / our seconds (above 1: ours is faster)"
    return out


def fractions(rep: dict, steps: int) -> dict:
    """FLOPs / seconds / peak, per component and end to end; ours against FP16 tensor peaks, the
    peer against TF32 (what cuDNN uses for FP32 convolutions with PyTorch's defaults) and plain FP32."""
    fl, peak = rep.get("flops", {}), rep.get("peak", {})
    gpu = rep.get("env", {}).get("gpu", "")
    sheet = DATASHEET if ("H100" in gpu or "H200" in gpu) else None
    measured = peak.get("measured_matmul_tflops", {})
    refs = {"ours": [("datasheet_fp16", sheet and sheet["fp16_tensor_tflops"]), ("measured_fp16_matmul", measured.get("fp16"))],
            "peer": [("datasheet_tf32", sheet and sheet["tf32_tensor_tflops"]), ("datasheet_fp32", sheet and sheet["fp32_tflops"]),
                     ("measured_fp32_tf32_on_matmul", measured.get("fp32_tf32_on")),
                     ("measured_fp32_tf32_off_matmul", measured.get("fp32_tf32_off"))]}
    out = {"note": "achieved TFLOP/s = FLOPs / mean seconds; fraction = achieved / the named peak"
                   + ("" if sheet else " (no datasheet figure for this device: measured ceilings only)")}
    for who in ("peer", "ours"):
        r = rep.get(who, {})
        timings = {c: v["mean_s"] for c, v in (r.get("components") or {}).items() if "mean_s" in v}
        if "e2e" in r:
            timings["e2e"] = r["e2e"]["mean_s"]
        row = {}
        for c, s in timings.items():
            if c not in fl or s <= 0:
                continue
            tflops = fl[c] / s / 1e12
            row[c] = {"tflops": tflops, **{f"of_{name}": tflops / p for name, p in refs[who] if p}}
        out[who] = row
    return out


def summary(rep: dict) -> str:
    """A readable page of the report."""
    L = [f"aldm gpu_check: {rep.get('mode', '?')}"]
    env = rep.get("env", {})
    L.append(f"device: {env.get('gpu', env.get('device', '?'))}; torch {env.get('torch', '?')}, CUDA {env.get('torch_cuda')}, "
             f"cuDNN {env.get('cudnn')}")
    cfg = rep.get("config", {})
    if cfg:
        L.append(f"translation: {cfg['source']} -> {', '.join(cfg['targets'])}, crop {cfg['crop']}, latent {cfg['latent']}, "
                 f"{cfg['steps']} DDIM steps, eta {cfg['eta']}")
    for n in rep.get("not_run", []):
        L.append(f"NOT RUN: {n['name']}: {n['why']}")

    def ms(v):
        return f"{v * 1e3:10.2f} ms" if isinstance(v, (int, float)) else f"{'-':>13}"

    L.append("")
    L.append(f"{'':28}{'peer (eager fp32)':>17}{'ours (torch backend)':>22}{'ratio':>8}")
    ratio = rep.get("ratio", {})
    peer, ours = rep.get("peer", {}), rep.get("ours", {})
    rows = [("end to end", peer.get("e2e", {}).get("mean_s"), ours.get("e2e", {}).get("mean_s"), ratio.get("e2e")),
            ("sampling loop, per step", peer.get("sample_per_step_s"), ours.get("e2e", {}).get("sample_per_step_s"),
             ratio.get("sample_per_step"))]
    for c in ("encoder", "spade", "unet", "decoder"):
        rows.append((f"{c} (network)", (peer.get("components") or {}).get(c, {}).get("mean_s"),
                     (ours.get("components") or {}).get(c, {}).get("mean_s"), ratio.get(f"component_{c}")))
    for name, p, o, r in rows:
        L.append(f"{name:28}{ms(p):>17}{ms(o):>22}{(f'{r:8.2f}' if r else '       -')}")
    L.append(f"{'peak GPU memory (e2e)':28}{str(peer.get('e2e', {}).get('peak_gpu_gb')) + ' GB':>17}"
             f"{str(ours.get('e2e', {}).get('peak_gpu_gb')) + ' GB':>22}")
    for key in ("ours_numpy_loop", "ours_device_noise"):
        e = rep.get(key, {}).get("e2e")
        if e:
            L.append(f"{key}: end to end {ms(e['mean_s']).strip()}, sampling {ms(e['sample_per_step_s']).strip()} per step")
    st = ours.get("e2e", {}).get("stages_s")
    if st:
        L.append("ours, stages: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in st.items()))
    fl = rep.get("flops", {})
    if fl:
        L.append("FLOPs: " + ", ".join(f"{k} {fl[k] / 1e12:.4g} T" for k in ("encoder", "spade", "unet", "decoder", "e2e")
                                       if k in fl) + f" (e2e = {fl.get('e2e_formula')})")
    fr = rep.get("fraction_of_peak", {})
    for who in ("peer", "ours"):
        for c, v in (fr.get(who) or {}).items():
            L.append(f"{who} {c}: {v['tflops']:.4g} TFLOP/s; "
                     + ", ".join(f"{k[3:]} {x:.2%}" for k, x in v.items() if k.startswith("of_")))
    pk = rep.get("peak", {})
    if pk:
        L.append(f"peaks used: {pk['datasheet']['name']}: fp16 {pk['datasheet']['fp16_tensor_tflops']}, tf32 "
                 f"{pk['datasheet']['tf32_tensor_tflops']}, fp32 {pk['datasheet']['fp32_tflops']} TFLOP/s; measured "
                 f"matmul " + ", ".join(f"{k} {v:.4g}" for k, v in pk.get("measured_matmul_tflops", {}).items()))
    for k, v in rep.get("errors", {}).items():
        L.append(f"ERROR in {k}: {v}")
    for k, v in rep.get("skipped", {}).items():
        L.append(f"skipped {k}: {v}")
    L.append(f"elapsed {rep.get('elapsed_s')} s")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, few steps: the code path in < 1 min")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; dry run 5)")
    ap.add_argument("--eta", type=float, default=1.0, help="DDIM eta (default 1, as the official sampling)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting stages past this many seconds (default 480; dry run 240)")
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 240.0 if args.dry_run else 480.0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
