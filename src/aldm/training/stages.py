"""The official three training stages, sized for a 2-core CPU.

1. VQ-GAN autoencoder on random 3-D patches (L1 + codebook + commitment loss; unlike the
   shipped configs the codebook is trained: NOTES B22), codebook initialised from encoder
   outputs after a warm-up, dead codes restarted.
2. MS-SPADE on quantized latents: L1(spade(z_src, y), z_tgt) (the official stage-2 objective).
3. The conditional UNet on [x_t, z_src, z_srctgt] with the class embedding and EMA, trained on
   latent crops; latents are scaled by 1/std (recorded as scale_factor, NOTES A19).
Every stage writes checkpoints in the official Lightning layout (stage 3: an LDM `last.ckpt`).
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
from aldm.training.loop import Loop, TrainState, load_stage, restore_rng, save_stage

SMALL = LDMConfig(
    unet_config=UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(4,),
                           num_head_channels=32),
    first_stage_config=VQConfig(n_embed=512, spade_nf=32, spade_nhidden=16,
                                ddconfig=DDConfig(ch=16, ch_mult=(1, 2, 2), num_groups=8)),
)
"""The default model: the official topology at CPU size. VQ-GAN 16/32/32 channels (the decoder
is the largest fixed cost: ~13 s per volume on 2 cores), no attention at 1/2 latent resolution
(7,776 tokens would dominate a CPU step), attention at 1/4 and in the middle block."""


@dataclass(frozen=True)
class Budget:
    steps: int  # total optimisation steps of the stage
    batch: int
    lr: float
    patch: int  # stage 1: voxels; stages 2-3: latent voxels (multiple of 4)
    decay_from: int | None = None  # cosine decay of lr to lr/10 from this step to the last

    def lr_at(self, step: int) -> float:
        if self.decay_from is None or step < self.decay_from:
            return self.lr
        done = (step - self.decay_from) / max(1, self.steps - self.decay_from)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, done))))


BUDGETS = {1: Budget(4500, 2, 3e-4, 48), 2: Budget(3600, 4, 3e-4, 24, decay_from=2000),
           3: Budget(4800, 4, 2e-4, 24, decay_from=3600)}
"""Sized for 2 CPU cores: ~1.2 s/step in stage 1 (48^3 patches), ~1 s in stage 2 (24^3 latent
crops), ~0.9 s in stage 3; about 4 hours in all, in background runs of under two hours. The
default model ran stages 2 and 3 at constant lr first (1500 and 3600 steps, the first budgets),
then was resumed with these, its stage-3 UNet fine-tuned on the better MS-SPADE's conditioning."""


def _set_lr(opt: torch.optim.Optimizer, budget: Budget, step: int) -> None:
    for group in opt.param_groups:
        group["lr"] = budget.lr_at(step)


def stage_path(run: Path, stage: int) -> Path:
    return run / f"stage{stage}" / "last.ckpt"


def _resume(path: Path) -> dict | None:
    return load_stage(path) if path.exists() else None


# ------------------------------------------------------------------------------ stage 1

def train_stage1(run: Path, cases: list[Path], cfg: LDMConfig, *, budget: Budget, max_minutes: float,
                 checkpoint_minutes: float, seed: int, quiet: bool = False, warmup: int = 300) -> bool:
    out = stage_path(run, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vq = VQModel(cfg.first_stage_config)
    params = [p for n, p in vq.named_parameters() if not n.startswith("spade.")]
    opt = torch.optim.Adam(params, lr=budget.lr, betas=(0.5, 0.9))
    rng = np.random.default_rng(seed)
    state = TrainState(1, seed=seed, extra={"codebook_initialised": False})
    ck = _resume(out)
    if ck:
        vq.load_state_dict(ck["state_dict"])
        t = ck["aldm_train"]
        opt.load_state_dict(t["optimizer"])
        restore_rng(t["rng"], rng)
        state = TrainState(1, t["step"], t["elapsed_s"], t["seed"], t["extra"])
    vols = [load_cached(p) for p in cases]
    usage = torch.zeros(cfg.first_stage_config.n_embed)

    def save():
        save_stage(out, vq.state_dict(), state, config=cfg.to_dict(), optimizer=opt, rng=rng)

    loop = Loop(out.parent, state, budget.steps, max_minutes=max_minutes,
                checkpoint_minutes=checkpoint_minutes, save=save, quiet=quiet)
    vq.train()
    for step in loop:
        _set_lr(opt, budget, step)
        x = torch.stack([gamma_jitter(sample_patch(vols[rng.integers(len(vols))], budget.patch, rng,
                                                   channels=[rng.integers(4)]), rng)
                         for _ in range(budget.batch)])  # (B, 1, s, s, s)
        h = vq.quant_conv(vq.encoder(x))
        if not state.extra["codebook_initialised"] and step >= warmup:
            _init_codebook(vq, h, rng)
            state.extra["codebook_initialised"] = True
        if state.extra["codebook_initialised"]:
            idx = vq.quantize.codes(h)  # (B, N)
            e = vq.quantize.embedding(idx).reshape(h.shape[0], *h.shape[2:], h.shape[1]).permute(0, 4, 1, 2, 3)
            codebook = F.mse_loss(e, h.detach())
            commit = 0.25 * F.mse_loss(h, e.detach())
            z = h + (e - h).detach()  # straight-through
            usage += torch.bincount(idx.flatten(), minlength=len(usage)).float()
        else:
            codebook = commit = torch.zeros(())
            z = h
        rec = vq.decode(z)
        l1 = F.l1_loss(rec, x)
        loss = l1 + codebook + commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if state.extra["codebook_initialised"] and step % 200 == 199:
            _restart_dead_codes(vq, h.detach(), usage, rng)
            usage.zero_()
        if step % 10 == 0:
            psnr = 10 * torch.log10(4 / F.mse_loss(rec.detach(), x).clamp(min=1e-10))
            loop.log(loss=loss.item(), l1=l1.item(), codebook=codebook.item(), psnr=psnr.item())
    return loop.done


def _latent_vectors(h: torch.Tensor) -> torch.Tensor:
    return h.detach().permute(0, 2, 3, 4, 1).reshape(-1, h.shape[1])


@torch.no_grad()
def _init_codebook(vq: VQModel, h: torch.Tensor, rng: np.random.Generator) -> None:
    z = _latent_vectors(h)
    k = vq.quantize.embedding.weight.shape[0]
    pick = torch.from_numpy(rng.choice(len(z), k, replace=len(z) < k))
    vq.quantize.embedding.weight.copy_(z[pick] + 1e-3 * torch.randn(k, z.shape[1]))


@torch.no_grad()
def _restart_dead_codes(vq: VQModel, h: torch.Tensor, usage: torch.Tensor, rng) -> None:
    dead = torch.nonzero(usage == 0).flatten()
    if len(dead):
        z = _latent_vectors(h)
        pick = torch.from_numpy(rng.choice(len(z), len(dead), replace=len(z) < len(dead)))
        vq.quantize.embedding.weight[dead] = z[pick] + 1e-3 * torch.randn(len(dead), z.shape[1])


# ------------------------------------------------------------------------------ latents

@torch.no_grad()
def encode_cases(vq: VQModel, cases: list[Path], say: Callable[[str], None]) -> torch.Tensor:
    """Quantized latents (cases x 2 flips, 4 modalities, C, h, w, d) of every training volume."""
    vq.eval()
    out = []
    for p in cases:
        vols = load_cached(p)
        for flip in (False, True):
            v = vols.flip(1) if flip else vols
            say(f"encoding {p.stem}{' (flipped)' if flip else ''}")
            out.append(torch.cat([vq.encode(v[m : m + 1, None])[0] for m in range(4)]))
    return torch.stack(out)


def _latent_crop(z: torch.Tensor, size: int, rng: np.random.Generator) -> tuple[slice, ...]:
    starts = [int(rng.integers(0, n - size + 1)) for n in z.shape[-3:]]
    return tuple(slice(s, s + size) for s in starts)


# ------------------------------------------------------------------------------ stage 2

def train_stage2(run: Path, latents: torch.Tensor, cfg: LDMConfig, vq: VQModel, *, budget: Budget,
                 max_minutes: float, checkpoint_minutes: float, seed: int, quiet: bool = False) -> bool:
    out = stage_path(run, 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.Adam(vq.spade.parameters(), lr=budget.lr, betas=(0.5, 0.9))
    rng = np.random.default_rng(seed + 2)
    state = TrainState(2, seed=seed)
    ck = _resume(out)
    if ck:
        vq.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["aldm_train"]["optimizer"])
        restore_rng(ck["aldm_train"]["rng"], rng)
        t = ck["aldm_train"]
        state = TrainState(2, t["step"], t["elapsed_s"], t["seed"], t["extra"])

    def save():
        save_stage(out, vq.state_dict(), state, config=cfg.to_dict(), optimizer=opt, rng=rng)

    loop = Loop(out.parent, state, budget.steps, max_minutes=max_minutes,
                checkpoint_minutes=checkpoint_minutes, save=save, quiet=quiet)
    vq.spade.train()
    for step in loop:
        _set_lr(opt, budget, step)
        tgt = int(rng.integers(4))
        src_z, tgt_z = [], []
        for _ in range(budget.batch):
            i, src = int(rng.integers(len(latents))), int(rng.choice([m for m in range(4) if m != tgt]))
            sl = _latent_crop(latents[i, src], budget.patch, rng)
            src_z.append(latents[i, src][(slice(None), *sl)])
            tgt_z.append(latents[i, tgt][(slice(None), *sl)])
        pred = vq.spade(torch.stack(src_z), tgt)
        loss = F.l1_loss(pred, torch.stack(tgt_z))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            loop.log(loss=loss.item())
    return loop.done


# ------------------------------------------------------------------------------ stage 3

def train_stage3(run: Path, latents: torch.Tensor, cfg: LDMConfig, vq: VQModel, *, budget: Budget,
                 max_minutes: float, checkpoint_minutes: float, seed: int, quiet: bool = False,
                 say: Callable[[str], None] = print) -> bool:
    out = stage_path(run, 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    scale = float(1.0 / latents.std())
    cfg = dataclasses.replace(cfg, scale_factor=scale)
    model = ALDM(cfg)
    model.first_stage_model.load_state_dict(vq.state_dict())
    model.first_stage_model.requires_grad_(False).eval()
    unet = model.model.diffusion_model
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=budget.lr, weight_decay=0.0)
    rng = np.random.default_rng(seed + 3)
    state = TrainState(3, seed=seed, extra={"scale_factor": scale})
    ck = _resume(out)
    if ck:
        unet.load_state_dict({k.removeprefix("model.diffusion_model."): v for k, v in ck["state_dict"].items()
                              if k.startswith("model.diffusion_model.")})
        from aldm.models.loader import ema_name

        ema = {k: ck["state_dict"][ema_name(k)].clone() for k in ema}
        t = ck["aldm_train"]
        opt.load_state_dict(t["optimizer"])
        restore_rng(t["rng"], rng)
        state = TrainState(3, t["step"], t["elapsed_s"], t["seed"], t["extra"])
        scale = state.extra["scale_factor"]
        model.config = cfg = dataclasses.replace(cfg, scale_factor=scale)

    say("conditioning every training pair through the trained SPADE")
    with torch.no_grad():  # c_concat for every (volume, source, target), target-like latent included
        pairs = {(i, s, t): scale * torch.cat([latents[i, s], vq.spade(latents[i, s][None], t)[0]])
                 for i in range(len(latents)) for s in range(4) for t in range(4) if s != t}
    keys = list(pairs)
    ac = torch.from_numpy(model.schedule()["alphas_cumprod"]).float()

    def save():
        sd = model.official_state_dict()
        sd["scale_factor"] = torch.tensor(scale)
        save_stage(out, sd, state, config=cfg.to_dict(), optimizer=opt, rng=rng, ema=ema)

    loop = Loop(out.parent, state, budget.steps, max_minutes=max_minutes,
                checkpoint_minutes=checkpoint_minutes, save=save, quiet=quiet)
    unet.train()
    for step in loop:
        _set_lr(opt, budget, step)
        x0, c, y = [], [], []
        for _ in range(budget.batch):
            i, s, t = keys[int(rng.integers(len(keys)))]
            sl = _latent_crop(latents[i, t], budget.patch, rng)
            x0.append(scale * latents[i, t][(slice(None), *sl)])
            c.append(pairs[(i, s, t)][(slice(None), *sl)])
            y.append(t)
        x0, c, y = torch.stack(x0), torch.stack(c), torch.tensor(y)
        t_idx = torch.from_numpy(rng.integers(0, len(ac), len(y)))
        noise = torch.randn_like(x0)
        a = ac[t_idx].reshape(-1, 1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(torch.cat([x_t, c], 1), t_idx, y), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))  # LitEma's warm-up rule
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay) if v.dtype.is_floating_point else ema[k].copy_(v)
        if step % 10 == 0:
            loop.log(loss=loss.item())
    return loop.done
