"""The official three training stages, sized for a 2-core CPU.

1. VQ-GAN autoencoder on random 3-D patches (L1 + codebook + commitment loss; unlike the
   shipped configs the codebook is trained: NOTES B22), codebook initialised from encoder
   outputs after a warm-up, dead codes restarted.
2. MS-SPADE on quantized latents: L1(spade(z_src, y), z_tgt) (the official stage-2 objective).
3. The conditional UNet on [x_t, z_src, z_srctgt] with the class embedding and EMA, trained on
   latent crops; latents are scaled by 1/std (recorded as scale_factor, NOTES A19).
Every stage writes checkpoints in the official Lightning layout (stage 3: an LDM `last.ckpt`).
Each stage runs where `Compute` says (cpu/cuda, fp32/bf16/fp16 autocast, gradient accumulation);
the sizes are `SMALL` (the bundled model) or `OFFICIAL`, or either with other widths (`sized`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from aldm import MODALITIES
from aldm.models.aldm import ALDM, VQModel
from aldm.models.config import DDConfig, LDMConfig, UNetConfig, VQConfig
from aldm.training.data import gamma_jitter, load_cached, sample_patch
from aldm.training.loop import (Compute, Loop, TrainState, all_reduce_sum, backward_step, broadcast_module,
                                dist_info, load_stage, restore_rng, save_stage)

SMALL = LDMConfig(
    unet_config=UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(4,),
                           num_head_channels=32),
    first_stage_config=VQConfig(n_embed=512, spade_nf=32, spade_nhidden=16,
                                ddconfig=DDConfig(ch=16, ch_mult=(1, 2, 2), num_groups=8)),
)
"""The default model: the official topology at CPU size. VQ-GAN 16/32/32 channels (the decoder
is the largest fixed cost: ~13 s per volume on 2 cores), no attention at 1/2 latent resolution
(7,776 tokens would dominate a CPU step), attention at 1/4 and in the middle block."""


OFFICIAL = LDMConfig()
"""The official ALDM widths (brats_vqgan_stage2.yaml, brats-ldm-vq-4.yaml): VQ-GAN ch 64, mult
(1,1,2), 8192 codes; MS-SPADE nf 128, hidden 64; UNet 128 channels, mult (1,1,2), attention at 1/2
and 1/4 + middle. 58.6 M parameters; a GPU's size, not a 2-core CPU's."""

SIZES = {"small": SMALL, "official": OFFICIAL}


def sized(size: str = "small", *, unet_channels: int | None = None, spade_nf: int | None = None,
          spade_hidden: int | None = None, vq_channels: int | None = None,
          n_embed: int | None = None) -> LDMConfig:
    """`SMALL` or `OFFICIAL` with any of its widths replaced (None keeps the size's own).
    spade_hidden defaults to half of spade_nf when only spade_nf is given (the official ratio)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, not {size!r}")
    cfg = SIZES[size]
    unet, vq = cfg.unet_config, cfg.first_stage_config
    if unet_channels is not None:
        if unet_channels % unet.norm_groups or unet_channels % unet.num_head_channels:
            raise ValueError(f"unet_channels must be a multiple of {unet.norm_groups} (GroupNorm "
                             f"groups) and {unet.num_head_channels} (head width), not {unet_channels}")
        unet = dataclasses.replace(unet, model_channels=unet_channels)
    if spade_nf is not None:
        vq = dataclasses.replace(vq, spade_nf=spade_nf,
                                 spade_nhidden=spade_hidden or max(1, spade_nf // 2))
    elif spade_hidden is not None:
        vq = dataclasses.replace(vq, spade_nhidden=spade_hidden)
    if vq_channels is not None:
        if vq_channels % vq.ddconfig.num_groups:
            raise ValueError(f"vq_channels must be a multiple of {vq.ddconfig.num_groups} (GroupNorm groups)")
        vq = dataclasses.replace(vq, ddconfig=dataclasses.replace(vq.ddconfig, ch=vq_channels))
    if n_embed is not None:
        vq = dataclasses.replace(vq, n_embed=n_embed)
    return dataclasses.replace(cfg, unet_config=unet, first_stage_config=vq)


@dataclass(frozen=True)
class Budget:
    steps: int  # total optimisation steps of the stage
    batch: int
    lr: float
    patch: int  # stage 1: voxels; stages 2-3: latent voxels (multiple of 4)
    decay_from: int | None = None  # cosine decay of lr to lr/10 from this step to the last
    decay_frac: float | None = None  # or from this fraction of the steps the run will reach

    def lr_at(self, step: int, planned: int | None = None) -> float:
        """lr at `step`; `planned`: the last step this run will reach (Loop.planned, when the
        wall-clock budget ends before `steps`), used by `decay_frac`."""
        last, start = self.steps, self.decay_from  # a paused run resumes on the same schedule
        if start is None and self.decay_frac is not None:  # a one-shot run sized by its time
            last = self.steps if planned is None else min(self.steps, planned)
            start = int(self.decay_frac * last)
        if start is None or step < start:
            return self.lr
        done = (step - start) / max(1, last - start)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, done))))


BUDGETS = {1: Budget(4500, 2, 3e-4, 48), 2: Budget(3600, 4, 3e-4, 24, decay_from=2000),
           3: Budget(4800, 4, 2e-4, 24, decay_from=3600)}
"""Sized for 2 CPU cores: ~1.2 s/step in stage 1 (48^3 patches), ~1 s in stage 2 (24^3 latent
crops), ~0.9 s in stage 3; about 4 hours in all, in background runs of under two hours. The
default model ran stages 2 and 3 at constant lr first (1500 and 3600 steps, the first budgets),
then was resumed with these, its stage-3 UNet fine-tuned on the better MS-SPADE's conditioning."""


def _set_lr(opt: torch.optim.Optimizer, budget: Budget, step: int, planned: int | None = None) -> None:
    for group in opt.param_groups:
        group["lr"] = budget.lr_at(step, planned)


def _stage_rng(seed: int) -> np.random.Generator:
    """The stage's sampling stream; with several processes each draws its own patches and noise."""
    rank, world = dist_info()
    if world == 1:
        return np.random.default_rng(seed)
    torch.manual_seed(seed * 1000 + rank)
    return np.random.default_rng([seed, rank])


def _resume_common(ck: dict, opt, scaler, rng, compute: Compute) -> TrainState:
    t = ck["aldm_train"]
    opt.load_state_dict(t["optimizer"])  # moves the state to the parameters' device
    if "grad_scaler" in t and scaler.is_enabled():
        scaler.load_state_dict(t["grad_scaler"])
    rank, world = dist_info()
    if world == 1:
        restore_rng(t["rng"], rng, compute.device)
    else:  # the file holds rank 0's streams: every process starts a stream of its own instead
        rng.bit_generator.state = np.random.default_rng([t["seed"], t["stage"], t["step"], rank]).bit_generator.state
        torch.manual_seed(hash((t["seed"], t["stage"], t["step"], rank)) % 2**31)
    return TrainState(t["stage"], t["step"], t["elapsed_s"], t["seed"], t["extra"])


def stage_path(run: Path, stage: int) -> Path:
    return run / f"stage{stage}" / "last.ckpt"


def _resume(path: Path) -> dict | None:
    return load_stage(path) if path.exists() else None


# ------------------------------------------------------------------------------ stage 1

def train_stage1(run: Path, cases: list[Path], cfg: LDMConfig, *, budget: Budget, max_minutes: float,
                 checkpoint_minutes: float, seed: int, quiet: bool = False, warmup: int = 300,
                 compute: Compute = Compute()) -> bool:
    out = stage_path(run, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = compute.device
    torch.manual_seed(seed)
    vq = VQModel(cfg.first_stage_config).to(dev)
    params = [p for n, p in vq.named_parameters() if not n.startswith("spade.")]
    opt = torch.optim.Adam(params, lr=budget.lr, betas=(0.5, 0.9))
    scaler = compute.scaler()
    rng = _stage_rng(seed)
    state = TrainState(1, seed=seed, extra={"codebook_initialised": False})
    ck = _resume(out)
    if ck:
        vq.load_state_dict(ck["state_dict"])
        state = _resume_common(ck, opt, scaler, rng, compute)
    broadcast_module(vq)
    vols = [load_cached(p) for p in cases]
    usage = torch.zeros(cfg.first_stage_config.n_embed, device=dev)

    def save():
        save_stage(out, vq.state_dict(), state, config=cfg.to_dict(), optimizer=opt, rng=rng,
                   compute=compute, scaler=scaler)

    loop = Loop(out.parent, state, budget.steps, max_minutes=max_minutes,
                checkpoint_minutes=checkpoint_minutes, save=save, quiet=quiet)
    vq.train()
    for step in loop:
        _set_lr(opt, budget, step, loop.planned)
        last_h = []

        def micro():
            x = torch.stack([gamma_jitter(sample_patch(vols[rng.integers(len(vols))], budget.patch, rng,
                                                       channels=[rng.integers(4)]), rng)
                             for _ in range(budget.batch)]).to(dev)  # (B, 1, s, s, s)
            h = vq.quant_conv(vq.encoder(x))
            if not state.extra["codebook_initialised"] and step >= warmup:
                _init_codebook(vq, h.float(), rng)
                broadcast_module(vq.quantize)  # several processes: rank 0's codebook
                state.extra["codebook_initialised"] = True
            if state.extra["codebook_initialised"]:
                with torch.autocast(compute.kind, enabled=False):  # nearest codes in fp32
                    idx = vq.quantize.codes(h.float())  # (B, N)
                e = vq.quantize.embedding(idx).reshape(h.shape[0], *h.shape[2:], h.shape[1]).permute(0, 4, 1, 2, 3)
                codebook = F.mse_loss(e, h.detach().float())
                commit = 0.25 * F.mse_loss(h.float(), e.detach())
                z = h + (e - h).detach()  # straight-through
                usage.add_(torch.bincount(idx.flatten(), minlength=len(usage)).float())
            else:
                codebook = commit = torch.zeros((), device=dev)
                z = h
            rec = vq.decode(z)
            l1 = F.l1_loss(rec.float(), x)
            last_h[:] = [h.detach().float()]
            psnr = 10 * torch.log10(4 / F.mse_loss(rec.detach().float(), x).clamp(min=1e-10))
            return {"loss": l1 + codebook + commit, "l1": l1, "codebook": codebook, "psnr": psnr}

        logged = backward_step(opt, scaler, compute, micro)
        if not logged.pop("finite"):
            state.extra["skipped_steps"] = state.extra.get("skipped_steps", 0) + 1
        if state.extra["codebook_initialised"] and step % 200 == 199:
            _restart_dead_codes(vq, last_h[0], all_reduce_sum(usage), rng)
            broadcast_module(vq.quantize)
            usage.zero_()
        if step % 10 == 0:
            loop.log(loss=logged["loss"].item(), l1=logged["l1"].item(),
                     codebook=logged["codebook"].item(), psnr=logged["psnr"].item())
    return loop.done


def _latent_vectors(h: torch.Tensor) -> torch.Tensor:
    return h.detach().permute(0, 2, 3, 4, 1).reshape(-1, h.shape[1])


@torch.no_grad()
def _init_codebook(vq: VQModel, h: torch.Tensor, rng: np.random.Generator) -> None:
    z = _latent_vectors(h)
    k = vq.quantize.embedding.weight.shape[0]
    pick = torch.from_numpy(rng.choice(len(z), k, replace=len(z) < k))
    vq.quantize.embedding.weight.copy_(z[pick.to(z.device)] + 1e-3 * torch.randn(k, z.shape[1]).to(z.device))


@torch.no_grad()
def _restart_dead_codes(vq: VQModel, h: torch.Tensor, usage: torch.Tensor, rng) -> None:
    dead = torch.nonzero(usage == 0).flatten()
    if len(dead):
        z = _latent_vectors(h)
        pick = torch.from_numpy(rng.choice(len(z), len(dead), replace=len(z) < len(dead)))
        vq.quantize.embedding.weight[dead] = (z[pick.to(z.device)]
                                              + 1e-3 * torch.randn(len(dead), z.shape[1]).to(z.device))


# ------------------------------------------------------------------------------ latents

@torch.no_grad()
def encode_cases(vq: VQModel, cases: list[Path], say: Callable[[str], None],
                 device: str = "cpu") -> torch.Tensor:
    """Quantized latents (cases x 2 flips, 4 modalities, C, h, w, d) of every training volume
    (fp32, on the CPU; encoded on `device`)."""
    vq.eval().to(device)
    out = []
    for p in cases:
        vols = load_cached(p).to(device)
        for flip in (False, True):
            v = vols.flip(1) if flip else vols
            say(f"encoding {p.stem}{' (flipped)' if flip else ''}")
            out.append(torch.cat([vq.encode(v[m : m + 1, None])[0] for m in range(4)]).cpu())
    return torch.stack(out)


def _latent_crop(z: torch.Tensor, size: int, rng: np.random.Generator) -> tuple[slice, ...]:
    """A random size^3 crop of the last three axes; an axis shorter than `size` is taken whole
    (so a large `size` trains on whole latents, as inference sees them)."""
    starts = [int(rng.integers(0, n - min(size, n) + 1)) for n in z.shape[-3:]]
    return tuple(slice(s, s + min(size, n)) for s, n in zip(starts, z.shape[-3:]))


# ------------------------------------------------------------------------------ stage 2

def train_stage2(run: Path, latents: torch.Tensor, cfg: LDMConfig, vq: VQModel, *, budget: Budget,
                 max_minutes: float, checkpoint_minutes: float, seed: int, quiet: bool = False,
                 compute: Compute = Compute(), min_steps: int = 0) -> bool:
    out = stage_path(run, 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = compute.device
    vq.to(dev)
    latents = latents.to(dev)
    opt = torch.optim.Adam(vq.spade.parameters(), lr=budget.lr, betas=(0.5, 0.9))
    scaler = compute.scaler()
    rng = _stage_rng(seed + 2)
    state = TrainState(2, seed=seed)
    ck = _resume(out)
    if ck:
        vq.load_state_dict(ck["state_dict"])
        state = _resume_common(ck, opt, scaler, rng, compute)
    broadcast_module(vq.spade)

    def save():
        save_stage(out, vq.state_dict(), state, config=cfg.to_dict(), optimizer=opt, rng=rng,
                   compute=compute, scaler=scaler)

    loop = Loop(out.parent, state, budget.steps, max_minutes=max_minutes,
                checkpoint_minutes=checkpoint_minutes, save=save, quiet=quiet, min_steps=min_steps)
    vq.spade.train()
    for step in loop:
        _set_lr(opt, budget, step, loop.planned)

        def micro():
            tgt = int(rng.integers(4))
            src_z, tgt_z = [], []
            for _ in range(budget.batch):
                i, src = int(rng.integers(len(latents))), int(rng.choice([m for m in range(4) if m != tgt]))
                sl = _latent_crop(latents[i, src], budget.patch, rng)
                src_z.append(latents[i, src][(slice(None), *sl)])
                tgt_z.append(latents[i, tgt][(slice(None), *sl)])
            pred = vq.spade(torch.stack(src_z), tgt)
            return {"loss": F.l1_loss(pred.float(), torch.stack(tgt_z))}

        logged = backward_step(opt, scaler, compute, micro)
        if not logged.pop("finite"):
            state.extra["skipped_steps"] = state.extra.get("skipped_steps", 0) + 1
        if step % 10 == 0:
            loop.log(loss=logged["loss"].item())
    return loop.done


# ------------------------------------------------------------------------------ stage 3

def train_stage3(run: Path, latents: torch.Tensor, cfg: LDMConfig, vq: VQModel, *, budget: Budget,
                 max_minutes: float, checkpoint_minutes: float, seed: int, quiet: bool = False,
                 say: Callable[[str], None] = print, compute: Compute = Compute(),
                 scale: float | None = None, min_steps: int = 0,
                 init_unet: dict[str, torch.Tensor] | None = None) -> bool:
    """`scale`: the latent scale factor (default 1/std of `latents`, fixed at the first run).
    `init_unet`: UNet weights to start from (a fresh run folder only; e.g. an earlier run's EMA)."""
    out = stage_path(run, 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = compute.device
    latents = latents.to(dev)
    scale = float(1.0 / latents.float().std()) if scale is None else float(scale)
    cfg = dataclasses.replace(cfg, scale_factor=scale)
    model = ALDM(cfg)
    model.first_stage_model.load_state_dict(vq.state_dict())
    model.first_stage_model.requires_grad_(False).eval()
    model.to(dev)
    unet = model.model.diffusion_model
    opt = torch.optim.AdamW(unet.parameters(), lr=budget.lr, weight_decay=0.0)
    scaler = compute.scaler()
    rng = _stage_rng(seed + 3)
    state = TrainState(3, seed=seed, extra={"scale_factor": scale})
    ck = _resume(out)
    if ck:
        unet.load_state_dict({k.removeprefix("model.diffusion_model."): v for k, v in ck["state_dict"].items()
                              if k.startswith("model.diffusion_model.")})
        from aldm.models.loader import ema_name

        ema = {k: ck["state_dict"][ema_name(k)].to(dev, copy=True) for k in unet.state_dict()}
        state = _resume_common(ck, opt, scaler, rng, compute)
        scale = state.extra["scale_factor"]
        model.config = cfg = dataclasses.replace(cfg, scale_factor=scale)
    elif init_unet is not None:
        unet.load_state_dict(init_unet)
    if dist_info()[1] > 1:
        broadcast_module(unet)
    if not ck:  # a fresh stage: the EMA starts at the (initial or broadcast) weights
        ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}

    spade = model.first_stage_model.spade
    pairs: dict[tuple[int, int, int], torch.Tensor] = {}

    @torch.no_grad()
    def conditioning(i: int, s: int, t: int) -> torch.Tensor:
        """c_concat of (volume, source, target): the scaled source latent and the trained SPADE's
        target-like latent of the whole volume (fp32, as at inference), computed once, on first use."""
        if (i, s, t) not in pairs:
            with torch.autocast(compute.kind, enabled=False):
                pairs[(i, s, t)] = scale * torch.cat([latents[i, s], spade(latents[i, s][None], t)[0]])
        return pairs[(i, s, t)]

    keys = [(i, s, t) for i in range(len(latents)) for s in range(4) for t in range(4) if s != t]
    say(f"stage 3 on {compute.describe()}: {len(keys)} (volume, source, target) pairs, "
        "conditioned through the trained SPADE on first use")
    ac = torch.from_numpy(model.schedule()["alphas_cumprod"]).float().to(dev)

    def save():
        sd = model.official_state_dict()
        sd["scale_factor"] = torch.tensor(scale)
        save_stage(out, sd, state, config=cfg.to_dict(), optimizer=opt, rng=rng, ema=ema,
                   compute=compute, scaler=scaler)

    loop = Loop(out.parent, state, budget.steps, max_minutes=max_minutes,
                checkpoint_minutes=checkpoint_minutes, save=save, quiet=quiet, min_steps=min_steps)
    unet.train()
    for step in loop:
        _set_lr(opt, budget, step, loop.planned)

        def micro():
            x0, c, y = [], [], []
            for _ in range(budget.batch):
                i, s, t = keys[int(rng.integers(len(keys)))]
                sl = _latent_crop(latents[i, t], budget.patch, rng)
                x0.append(scale * latents[i, t][(slice(None), *sl)])
                c.append(conditioning(i, s, t)[(slice(None), *sl)])
                y.append(t)
            x0, c, y = torch.stack(x0), torch.stack(c), torch.tensor(y, device=dev)
            t_idx = torch.from_numpy(rng.integers(0, len(ac), len(y))).to(dev)
            noise = torch.randn_like(x0)
            a = ac[t_idx].reshape(-1, 1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            return {"loss": F.mse_loss(unet(torch.cat([x_t, c], 1), t_idx, y).float(), noise)}

        logged = backward_step(opt, scaler, compute, micro)
        if not logged.pop("finite"):
            state.extra["skipped_steps"] = state.extra.get("skipped_steps", 0) + 1
        decay = min(0.999, (1 + step) / (10 + step))  # LitEma's warm-up rule
        with torch.no_grad():
            live = unet.state_dict()
            fl = [k for k, v in live.items() if v.dtype.is_floating_point]
            torch._foreach_mul_([ema[k] for k in fl], decay)
            torch._foreach_add_([ema[k] for k in fl], [live[k] for k in fl], alpha=1 - decay)
            for k, v in live.items():
                if not v.dtype.is_floating_point:
                    ema[k].copy_(v)
        if step % 10 == 0:
            loop.log(loss=logged["loss"].item())
    return loop.done
