#!/usr/bin/env python3
"""Train the MS-SPADE (stage 2) and the UNet (stage 3) on a code pack, in one timed call (issue 16 item 3).

Made for the device machine (one H200, ~10-minute calls, files back: at most 8, 16 MiB each, 64 MiB
in all), and runs as well on a CPU (`--device cpu --minutes 0.2 --size small`: the dry run).
Reads gpu_pack/ (scripts/pack_codes.py: the frozen VQ-GAN's codes of the training cases, never
the held-out ones), trains stage 2 then stage 3 (aldm.training.stages, bf16 autocast on cuda)
for a wall-clock budget, and writes to --out:

- spade-K.ckpt, unet-K.ckpt: the trained weights in the official Lightning layout
  (`first_stage_model.spade.*`; the UNet's EMA as `model_ema.*`, the weights sampling uses),
  stored bf16 and sharded so that every file comes back. The raw (non-EMA) UNet weights and the
  optimiser state stay behind (they would not fit), so a later call restarts the optimiser.
  spade-K are written as soon as stage 2 ends, so a call cut short still returns them;
- summary.json: widths, parameter counts, steps, samples/s per stage, last losses, limits check;
- log.csv: the loss logs of both stages.

Back on the development machine, `merge` assembles them with the pack's frozen VQ-GAN into one
fp32 official checkpoint that `aldm.models.load_official` (and `aldm export`) read:

    python scripts/gpu_train.py merge --files DIR --pack gpu_pack --out runs/gpu/last.ckpt

The default width (`--size auto`) is the widest fraction of the official widths (1, 3/4, 1/2,
1/4 of UNet 128 channels and MS-SPADE nf 128 / hidden 64) whose returned files fit the limits:
3/4 (UNet 96, MS-SPADE 96/48; 29.4 M parameters, 56.5 MiB in bf16).

`--init DIR` continues from the files an earlier call returned (`--stage2-share 0` spends the call
on the UNet): same widths, the SPADE and the UNet's EMA as starting weights, fresh optimisers.
On the device the files must travel in the 64 MiB tree, which has ~3 MiB of room today: see
scripts/gpu_train.sh.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from aldm.models.aldm import ALDM, VQModel  # noqa: E402
from aldm.models.checkpoint import read_checkpoint, save_official  # noqa: E402
from aldm.models.config import LDMConfig, UNetConfig  # noqa: E402
from aldm.training import pack as packs  # noqa: E402
from aldm.training.loop import Compute, load_stage  # noqa: E402
from aldm.training.stages import OFFICIAL, SMALL, Budget, stage_path, train_stage2, train_stage3  # noqa: E402

MiB = 1 << 20
LIMITS = {"files": 8, "file_bytes": 16 * MiB, "total_bytes": 64 * MiB}
SIDE_FILES = ("summary.json", "log.csv", "console.txt")  # besides the weight shards (console: gpu_train.sh)
SIDE_BYTES = 1 * MiB  # room kept for them
SHARD_BYTES = 15 * MiB  # under the per-file limit, with room for the pickle and zip records
TENSOR_OVERHEAD = 1024  # bytes per tensor in a torch.save zip (record headers, alignment, pickle)
FRACTIONS = (1.0, 0.75, 0.5, 0.25)


# ----------------------------------------------------------------------------- sizes

def with_widths(base: LDMConfig, unet: UNetConfig, spade_nf: int, spade_hidden: int) -> LDMConfig:
    """The pack's frozen first stage with a SPADE and a UNet of the given widths."""
    fs = dataclasses.replace(base.first_stage_config, spade_nf=spade_nf, spade_nhidden=spade_hidden)
    return dataclasses.replace(base, unet_config=unet, first_stage_config=fs, scale_factor=1.0)


def returned_bytes(cfg: LDMConfig) -> tuple[int, int, int]:
    """(bytes of the returned bf16 weights, SPADE parameters, UNet parameters), shapes only."""
    with torch.device("meta"):
        m = ALDM(cfg)
    spade = list(m.first_stage_model.spade.state_dict().values())
    unet = list(m.model.diffusion_model.state_dict().values())
    n_s, n_u = sum(t.numel() for t in spade), sum(t.numel() for t in unet)
    return 2 * (n_s + n_u) + TENSOR_OVERHEAD * (len(spade) + len(unet)), n_s, n_u


def fits(cfg: LDMConfig, bytes_per_bf16: int = 1) -> bool:
    b = returned_bytes(cfg)[0] * bytes_per_bf16
    shards = -(-b // SHARD_BYTES) + 1  # one more: the SPADE and the UNet are sharded apart
    return (b + SIDE_BYTES <= LIMITS["total_bytes"]
            and shards + len(SIDE_FILES) <= LIMITS["files"])


def choose(size: str, base: LDMConfig, unet_channels: int | None = None,
           spade_nf: int | None = None) -> LDMConfig:
    """small / official / auto (the widest official fraction that fits), widths overridable."""
    if size == "small":
        cfg = with_widths(base, SMALL.unet_config, SMALL.first_stage_config.spade_nf,
                          SMALL.first_stage_config.spade_nhidden)
    elif size == "official":
        cfg = with_widths(base, OFFICIAL.unet_config, OFFICIAL.first_stage_config.spade_nf,
                          OFFICIAL.first_stage_config.spade_nhidden)
    elif size == "auto":
        o_unet, o_fs = OFFICIAL.unet_config, OFFICIAL.first_stage_config
        for f in FRACTIONS:
            cfg = with_widths(base, dataclasses.replace(o_unet, model_channels=int(o_unet.model_channels * f)),
                              int(o_fs.spade_nf * f), int(o_fs.spade_nhidden * f))
            if fits(cfg):
                break
    else:
        raise SystemExit(f"--size must be small, official or auto, not {size!r}")
    if unet_channels:
        cfg = dataclasses.replace(cfg, unet_config=dataclasses.replace(cfg.unet_config, model_channels=unet_channels))
    if spade_nf:
        cfg = with_widths(cfg, cfg.unet_config, spade_nf, max(1, spade_nf // 2))
    return cfg


# ----------------------------------------------------------------------------- files back

def write_shards(out: Path, prefix: str, sd: dict[str, torch.Tensor], cfg: LDMConfig, info: dict,
                 dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """`sd` in `dtype` (floating tensors), split into official-layout files of <= SHARD_BYTES."""
    groups, cur, size = [], {}, 0
    for k, v in sd.items():
        v = v.detach().cpu()
        v = v.to(dtype) if v.is_floating_point() else v
        b = v.numel() * v.element_size() + TENSOR_OVERHEAD
        if cur and size + b > SHARD_BYTES:
            groups.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + b
    if cur:
        groups.append(cur)
    files = []
    for i, g in enumerate(groups):
        path = out / f"{prefix}-{i}.ckpt"
        save_official(path, g, global_step=info.get("step", 0),
                      extra={"aldm_config": cfg.to_dict(),
                             "aldm_shard": {"part": prefix, "index": i, "count": len(groups), **info}})
        files.append(path)
    return files


def check_limits(out: Path) -> dict:
    files = sorted(p for p in out.rglob("*") if p.is_file())
    sizes = {p.name: p.stat().st_size for p in files}
    ok = (len(files) <= LIMITS["files"] and all(s <= LIMITS["file_bytes"] for s in sizes.values())
          and sum(sizes.values()) <= LIMITS["total_bytes"])
    return {"ok": ok, "files": len(files), "total_bytes": sum(sizes.values()), "bytes": sizes, "limits": LIMITS}


def read_shards(files: Path) -> tuple[dict, LDMConfig | None, dict]:
    """({"spade": official-name weights, "unet": model_ema.* weights}, config, shard info).
    `files` is the folder an earlier call returned, or one official LDM checkpoint (e.g. the
    bundled model's models/default/last.ckpt: its SPADE and EMA UNet, its scale factor)."""
    parts: dict[str, dict] = {"spade": {}, "unet": {}}
    if files.is_file():
        from aldm.models.checkpoint import state_dict_of
        from aldm.models.loader import build_from_state_dict

        ck = read_checkpoint(files)
        sd = state_dict_of(ck, files)
        known = LDMConfig.from_dict(ck["aldm_config"]) if isinstance(ck.get("aldm_config"), dict) else None
        cfg = build_from_state_dict(sd, config=known, device="meta", source=str(files)).config
        parts["spade"] = {k: v for k, v in sd.items() if k.startswith("first_stage_model.spade.")}
        parts["unet"] = {k: v for k, v in sd.items() if k.startswith("model_ema.")
                         and k not in ("model_ema.decay", "model_ema.num_updates")}
        return parts, cfg, {"scale_factor": cfg.scale_factor, "from_checkpoint": str(files)}
    cfg, meta = None, {}
    for p in sorted(files.glob("*-*.ckpt")):
        ck = read_checkpoint(p)
        shard = ck.get("aldm_shard") or {}
        if shard.get("part") in parts:
            parts[shard["part"]].update(ck["state_dict"])
            cfg = LDMConfig.from_dict(ck["aldm_config"])
            meta = shard if shard["part"] == "unet" else meta or shard
    return parts, cfg, meta


def unet_weights(parts: dict, cfg: LDMConfig) -> dict[str, torch.Tensor]:
    """UNet parameter names -> fp32 weights, from the returned EMA."""
    from aldm.models.loader import ema_name

    with torch.device("meta"):
        names = list(ALDM(cfg).model.diffusion_model.state_dict())
    return {k: parts["unet"][ema_name(k)].float() for k in names}


def merge(files: Path, pack_dir: Path, out: Path, model_dir: Path | None = None) -> Path:
    """Shards + the pack's frozen VQ-GAN -> one fp32 official LDM checkpoint (EMA UNet weights,
    also as the raw weights: the raw ones do not come back)."""
    parts, cfg, meta = read_shards(files)
    if cfg is None or not parts["spade"]:
        raise SystemExit(f"{files}: no spade-K.ckpt shards")
    if not parts["unet"]:
        raise SystemExit(f"{files}: no unet-K.ckpt shards (stage 3 did not finish); the SPADE alone is not an LDM")
    _, frozen = packs.first_stage(pack_dir, model_dir)
    scale = float(meta.get("scale_factor", cfg.scale_factor))
    cfg = dataclasses.replace(cfg, scale_factor=scale)
    model = ALDM(cfg)
    fs = {**frozen, **{k.removeprefix("first_stage_model."): v.float() for k, v in parts["spade"].items()}}
    model.first_stage_model.load_state_dict(fs)  # strict: every frozen weight is there
    unet = model.model.diffusion_model
    ema = unet_weights(parts, cfg)
    unet.load_state_dict(ema)
    sd = model.official_state_dict()
    sd["scale_factor"] = torch.tensor(scale)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_official(out, sd, ema, global_step=int(meta.get("step", 0)),
                  extra={"aldm_config": cfg.to_dict(), "aldm_gpu_train": {"from": str(files), **meta}})
    return out


# ----------------------------------------------------------------------------- training

def stage_numbers(run: Path, stage: int, budget: Budget, compute: Compute) -> dict:
    t = load_stage(stage_path(run, stage))["aldm_train"]
    samples = t["step"] * budget.batch * compute.accum
    rows = list(csv.DictReader(open(stage_path(run, stage).parent / "log.csv")))
    return {"steps": t["step"], "elapsed_s": round(t["elapsed_s"], 2), "samples": samples,
            "samples_per_s": round(samples / t["elapsed_s"], 3) if t["elapsed_s"] else None,
            "skipped_steps": t["extra"].get("skipped_steps", 0),  # non-finite gradients
            "batch": budget.batch, "accum": compute.accum, "patch": budget.patch, "lr": budget.lr,
            "last_losses": [float(r["loss"]) for r in rows[-5:]]}


def halving_on_oom(fn, budget: Budget, summary: dict) -> Budget:
    """Run a stage; if the GPU runs out of memory, it has checkpointed (Loop saves on the way
    out): resume it with half the micro-batch, down to 1. Returns the budget that finished."""
    while True:
        try:
            fn(budget)
            return budget
        except torch.cuda.OutOfMemoryError:
            if budget.batch == 1:
                raise
            torch.cuda.empty_cache()
            smaller = dataclasses.replace(budget, batch=budget.batch // 2)
            summary.setdefault("oom_fallbacks", []).append(f"batch {budget.batch} -> {smaller.batch}")
            print(f"out of GPU memory at batch {budget.batch}: resuming with {smaller.batch}", flush=True)
            budget = smaller


def train(args) -> int:
    t_start = time.monotonic()
    deadline = t_start + 60 * args.minutes
    out, run = Path(args.out), Path(args.run)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    compute = Compute(device, args.precision or ("bf16" if cuda else "fp32"), args.accum)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    patch = args.patch or (48 if cuda else 16)  # 48: whole 36x48x36 latents, as inference sees them
    batch = args.batch or (8 if cuda else 2)

    pk = packs.read_pack(args.pack)
    latents = packs.latents(pk)
    base = packs.config_of(args.pack)  # the frozen VQ-GAN's weights are not needed to train 2-3
    cfg = choose(args.size, base, args.unet_channels, args.spade_nf)
    init, init_cfg, init_meta = read_shards(args.init) if args.init else ({}, None, {})
    if args.init:  # continue an earlier call: its widths, its SPADE and its UNet EMA
        if init_cfg is None or not init["spade"]:
            raise SystemExit(f"--init {args.init}: no spade-K.ckpt shards")
        cfg = with_widths(base, init_cfg.unet_config, init_cfg.first_stage_config.spade_nf,
                          init_cfg.first_stage_config.spade_nhidden)
    nbytes, n_spade, n_unet = returned_bytes(cfg)
    shard_dtype = torch.float32 if args.fp32_files else torch.bfloat16
    nbytes *= 2 if args.fp32_files else 1
    if not fits(cfg, 2 if args.fp32_files else 1) and not args.ignore_limits:
        raise SystemExit(f"--size {args.size}: {nbytes / MiB:.1f} MiB of bf16 weights would not come back "
                         f"(limits {LIMITS}); pick a narrower size or --ignore-limits")
    scale = float(init_meta.get("scale_factor", pk["scale_factor"]))  # a continued UNet keeps its scale
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else platform.processor() or 'cpu'}), "
          f"{compute.describe()}; {len(latents)} volumes of {len(set(pk['cases'].tolist()))} cases; "
          f"UNet {cfg.unet_config.model_channels} ch ({n_unet / 1e6:.2f} M), MS-SPADE nf "
          f"{cfg.first_stage_config.spade_nf}/{cfg.first_stage_config.spade_nhidden} ({n_spade / 1e6:.2f} M); "
          f"{nbytes / MiB:.1f} MiB back in {'fp32' if args.fp32_files else 'bf16'}", flush=True)

    torch.manual_seed(args.seed)
    vq = VQModel(cfg.first_stage_config)  # encoder/decoder unused here (merge puts the frozen ones in)
    vq.requires_grad_(False)
    vq.spade.requires_grad_(True)
    if args.init:
        vq.spade.load_state_dict({k.removeprefix("first_stage_model.spade."): v.float() for k, v in init["spade"].items()})
    init_unet = unet_weights(init, cfg) if init.get("unet") else None
    previous = {"from": str(args.init), "stage2_steps": init_meta.get("stage2_steps", 0),
                "stage3_steps": init_meta.get("stage3_steps", 0)} if args.init else None
    reserve = min(0.5, 0.15 * args.minutes) * 60  # seconds kept for the last save and the files
    b2 = Budget(args.max_steps, batch, args.lr2, patch, decay_frac=args.decay_frac)
    b3 = Budget(args.max_steps, batch, args.lr3, patch, decay_frac=args.decay_frac)
    common = dict(checkpoint_minutes=1e9, seed=args.seed, quiet=True, compute=compute, min_steps=args.min_steps)
    summary = {"device": device, "torch": torch.__version__, "precision": compute.precision,
               "config": cfg.to_dict(), "params": {"spade": n_spade, "unet": n_unet},
               "returned_weight_bytes_estimate": nbytes, "pack": pk["meta"], "minutes": args.minutes}
    if cuda:
        summary["gpu"] = torch.cuda.get_device_name(device)

    if previous:
        summary["continued"] = previous
    total2 = previous["stage2_steps"] if previous else 0
    if args.stage2_share > 0:
        stage2_end = time.monotonic() + args.stage2_share * max(0.0, deadline - time.monotonic() - reserve)
        b2 = halving_on_oom(lambda b: train_stage2(run, latents, cfg, vq, budget=b,
                                                   max_minutes=max(0.0, stage2_end - time.monotonic()) / 60,
                                                   **common), b2, summary)
        summary["stage2"] = stage_numbers(run, 2, b2, compute)
        total2 += summary["stage2"]["steps"]
        print(f"stage 2: {summary['stage2']}", flush=True)
    spade_sd = {f"first_stage_model.spade.{k}": v for k, v in vq.spade.state_dict().items()}
    files = write_shards(out, "spade", spade_sd, cfg, {"step": total2, "stage2_steps": total2,
                                                       "scale_factor": scale}, dtype=shard_dtype)

    b3 = halving_on_oom(lambda b: train_stage3(run, latents, cfg, vq, budget=b, say=print, scale=scale,
                                               max_minutes=max(0.0, deadline - time.monotonic() - reserve) / 60,
                                               init_unet=init_unet, **common), b3, summary)
    summary["stage3"] = stage_numbers(run, 3, b3, compute)
    total3 = (previous["stage3_steps"] if previous else 0) + summary["stage3"]["steps"]
    print(f"stage 3: {summary['stage3']}", flush=True)
    sd3 = read_checkpoint(stage_path(run, 3))["state_dict"]
    ema = {k: v for k, v in sd3.items() if k.startswith("model_ema.") and k not in
           ("model_ema.decay", "model_ema.num_updates")}
    files += write_shards(out, "unet", ema, cfg, {"step": total3, "stage2_steps": total2, "stage3_steps": total3,
                                                  "scale_factor": scale, "ema": True},
                          dtype=shard_dtype)
    if cuda:
        summary["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    with open(out / "log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stage", "step", "elapsed_s", "loss"])
        for stage in (2, 3):
            log = stage_path(run, stage).parent / "log.csv"
            for r in csv.DictReader(open(log)) if log.exists() else []:
                w.writerow([stage, r["step"], r["elapsed_s"], r["loss"]])
    summary["wall_s"] = round(time.monotonic() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    limits = check_limits(out)
    summary["limits_check"] = limits
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {', '.join(sorted(limits['bytes']))} ({limits['total_bytes'] / MiB:.1f} MiB) in "
          f"{summary['wall_s']} s; limits {'respected' if limits['ok'] else 'EXCEEDED'}", flush=True)
    return 0 if limits["ok"] else 3


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        ap = argparse.ArgumentParser(prog="gpu_train.py merge", description=merge.__doc__)
        ap.add_argument("--files", type=Path, required=True, help="the folder the device's files came back in")
        ap.add_argument("--pack", type=Path, default=ROOT / "gpu_pack")
        ap.add_argument("--out", type=Path, required=True)
        ap.add_argument("--model", type=Path, default=None,
                        help="model folder whose encoder/decoder graphs hold the frozen VQ-GAN (default: the pack's)")
        a = ap.parse_args(argv[1:])
        print(f"wrote {merge(a.files, a.pack, a.out, a.model)}")
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", type=Path, default=ROOT / "gpu_pack")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_train_out"))
    ap.add_argument("--run", type=Path, default=None,
                    help="working run folder (full checkpoints with optimiser state; not returned). "
                         "Default: a new folder under /tmp")
    ap.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    ap.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                    help="autocast: bf16 on cuda, fp32 on cpu by default")
    ap.add_argument("--minutes", type=float, default=8.5, help="wall-clock budget of the whole script")
    ap.add_argument("--size", default="auto", help="auto (widest that comes back), small or official")
    ap.add_argument("--unet-channels", type=int, default=None)
    ap.add_argument("--spade-nf", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="micro-batch (default 8 on cuda, 2 on cpu)")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--patch", type=int, default=None,
                    help="latent crop edge (default 48 on cuda = whole latents, 16 on cpu)")
    ap.add_argument("--stage2-share", type=float, default=0.35, help="share of the training time for stage 2")
    ap.add_argument("--lr2", type=float, default=3e-4)
    ap.add_argument("--lr3", type=float, default=2e-4)
    ap.add_argument("--decay-frac", type=float, default=0.7,
                    help="cosine lr decay to lr/10 over the last 1-f of the steps the time allows")
    ap.add_argument("--max-steps", type=int, default=10**7)
    ap.add_argument("--min-steps", type=int, default=2, help="steps of each stage even past the time budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ignore-limits", action="store_true")
    ap.add_argument("--fp32-files", action="store_true",
                    help="write the weights back in fp32, not bf16 (CPU runs whose files do not travel)")
    ap.add_argument("--init", type=Path, default=None,
                    help="files an earlier call returned, or an official LDM checkpoint: continue from its "
                         "SPADE and UNet EMA (its widths and scale factor; the optimisers restart). "
                         "With --stage2-share 0 stage 2 is not trained again")
    args = ap.parse_args(argv)
    if args.stage2_share <= 0 and not args.init:
        raise SystemExit("--stage2-share 0 needs --init (a trained SPADE to condition stage 3 on)")
    if args.run is None:  # a fresh one each call: a warm machine keeps /tmp between calls
        import tempfile

        args.run = Path(tempfile.mkdtemp(prefix="aldm_gpu_run_"))
    if args.run.exists() and any(args.run.iterdir()):
        raise SystemExit(f"{args.run} is not empty: give a new --run (this script starts from scratch)")
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
