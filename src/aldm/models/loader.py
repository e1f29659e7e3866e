"""Load official ALDM checkpoints unchanged: no yaml, no conversion (SPEC §9, NOTES A3/A4/A20).

Architecture hyper-parameters are read off tensor shapes; only what shapes cannot tell
(GroupNorm groups, attention head width) comes from `config` or the official defaults.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from aldm.errors import CheckpointError
from aldm.models.aldm import ALDM
from aldm.models.checkpoint import _names, read_checkpoint, read_state_dict, state_dict_of
from aldm.models.config import DDConfig, LDMConfig, UNetConfig, VQConfig
from aldm.runtime.schedule import BUFFER_NAMES, make_schedule

log = logging.getLogger(__name__)

UNET = "model.diffusion_model."
EMA = "model_ema."
FIRST_STAGE = "first_stage_model."
EMA_BOOKKEEPING = {"model_ema.decay", "model_ema.num_updates"}


def ema_name(param: str) -> str:
    """`diffusion_model.input_blocks.1.0...` -> `model_ema.diffusion_modelinput_blocks10...`."""
    return EMA + ("diffusion_model." + param).replace(".", "")


def load_official(ldm_ckpt: str | Path, vqgan_ckpt: str | Path | None = None, *,
                  config: str | Path | Mapping[str, Any] | LDMConfig | None = None,
                  ema: bool = True) -> ALDM:
    """Build an `ALDM` from an official LDM checkpoint (and a VQ-GAN stage-2 one if needed).

    The LDM's `first_stage_model.*` wins over `vqgan_ckpt`; EMA UNet weights are used unless
    `ema=False` (or the file has none: then raw weights, with a warning). Checkpoints written by
    `aldm train` carry their config (`aldm_config`), used when `config` is not given.
    """
    ckpt = read_checkpoint(ldm_ckpt)
    ldm_sd = state_dict_of(ckpt, ldm_ckpt)
    if config is None and isinstance(ckpt.get("aldm_config"), dict):
        config = LDMConfig.from_dict(ckpt["aldm_config"])  # written by `aldm train`
    vq_sd = None
    if not any(k.startswith(FIRST_STAGE) for k in ldm_sd):
        if vqgan_ckpt is None:
            raise CheckpointError(
                f"{ldm_ckpt} has no first_stage_model.* weights; pass the VQ-GAN stage-2 checkpoint too")
        vq_sd = read_state_dict(vqgan_ckpt)
    elif vqgan_ckpt is not None:
        log.info("%s carries the first stage; %s is not used", ldm_ckpt, vqgan_ckpt)
    return build_from_state_dict(ldm_sd, vq_sd, config=config, ema=ema, source=str(ldm_ckpt))


def build_from_state_dict(ldm_sd: Mapping[str, torch.Tensor],
                          vq_sd: Mapping[str, torch.Tensor] | None = None, *,
                          config: str | Path | Mapping[str, Any] | LDMConfig | None = None,
                          ema: bool = True, device: str | torch.device = "cpu",
                          source: str = "checkpoint") -> ALDM:
    """Same as `load_official` on in-memory state_dicts (`device="meta"` builds shapes only)."""
    base = config if isinstance(config, LDMConfig) else LDMConfig.from_official(config)
    groups = _split_ldm_keys(ldm_sd, source)
    if vq_sd is not None and not groups["first_stage"]:
        groups["first_stage"] = {k: v for k, v in vq_sd.items() if not k.startswith("loss.")}
    if not groups["first_stage"]:
        raise CheckpointError(f"{source}: no first-stage (VQ-GAN) weights")
    unet_sd = _pick_unet_weights(groups, ema, source)

    cfg = dataclasses.replace(
        base,
        timesteps=int(groups["schedule"]["alphas_cumprod"].shape[0])
        if "alphas_cumprod" in groups["schedule"] else base.timesteps,
        scale_factor=float(groups["scale_factor"]) if groups["scale_factor"] is not None
        else base.scale_factor,
        unet_config=infer_unet_config(unet_sd, base.unet_config, source),
        first_stage_config=infer_vq_config(groups["first_stage"], base.first_stage_config, source),
    )
    schedule = make_schedule(cfg.timesteps, cfg.linear_start, cfg.linear_end, cfg.beta_schedule)
    schedule.update({k: v.float().numpy() for k, v in groups["schedule"].items()
                     if v.device.type != "meta"})  # the checkpoint's buffers are authoritative

    with torch.device(device):
        try:
            model = ALDM(cfg, schedule)
        except ValueError as exc:  # e.g. widths that the configured head width does not divide
            raise CheckpointError(f"{source}: {exc}; pass the official config") from None
    full = {FIRST_STAGE + k: v for k, v in groups["first_stage"].items()}
    full.update({UNET + k: v for k, v in unet_sd.items()})
    _check_and_load(model, full, source)
    return model.eval()


def _split_ldm_keys(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    groups: dict[str, Any] = {"first_stage": {}, "unet": {}, "ema": {}, "schedule": {},
                              "scale_factor": None}
    unexpected = []
    for key, value in sd.items():
        if key.startswith(FIRST_STAGE):
            sub = key[len(FIRST_STAGE):]
            if not sub.startswith("loss."):
                groups["first_stage"][sub] = value
        elif key.startswith(UNET):
            groups["unet"][key[len(UNET):]] = value
        elif key in EMA_BOOKKEEPING:
            pass
        elif key.startswith(EMA):
            groups["ema"][key] = value
        elif key in BUFFER_NAMES:
            groups["schedule"][key] = value
        elif key == "scale_factor":
            groups["scale_factor"] = value
        elif key.startswith("loss."):
            pass
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys: {_names(unexpected)}")
    return groups


def _pick_unet_weights(groups: dict[str, Any], ema: bool, source: str) -> dict[str, torch.Tensor]:
    raw, ema_sd = groups["unet"], groups["ema"]
    if not raw:
        raise CheckpointError(f"{source}: no UNet weights ({UNET}*)")
    if not ema:
        return raw
    if not ema_sd:
        warnings.warn(f"{source} has no EMA weights ({EMA}*); using the raw UNet weights",
                      stacklevel=3)
        return raw
    mapping = {ema_name(k): k for k in raw}
    if len(mapping) != len(raw):
        raise CheckpointError(f"{source}: the EMA name map is ambiguous for this UNet")
    missing = [m for m in mapping if m not in ema_sd]
    extra = [k for k in ema_sd if k not in mapping]
    if missing or extra:
        raise CheckpointError(f"{source}: EMA weights do not match the UNet: missing "
                              f"{_names(missing) or 'none'}; unexpected {_names(extra) or 'none'}")
    return {mapping[k]: v for k, v in ema_sd.items()}


def _shape(sd: Mapping[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"{source}: missing key {key}")
    return tuple(sd[key].shape)


def _indices(sd: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def infer_vq_config(sd: Mapping[str, torch.Tensor], base: VQConfig, source: str = "checkpoint") -> VQConfig:
    """VQ-GAN + SPADE hyper-parameters from first-stage tensor shapes (num_groups from `base`)."""
    ch, in_channels = _shape(sd, "encoder.conv_in.weight", source)[:2]
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    nrb = len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight"))
    if not levels or not nrb:
        raise CheckpointError(f"{source}: no encoder.down.* blocks")
    ch_mult = []
    for level in levels:
        width = _shape(sd, f"encoder.down.{level}.block.{nrb - 1}.conv2.weight", source)[0]
        if width % ch:
            raise CheckpointError(f"{source}: encoder level {level} width {width} is not a multiple of {ch}")
        ch_mult.append(width // ch)
    z_channels = _shape(sd, "decoder.conv_in.weight", source)[1]
    enc_out = _shape(sd, "encoder.conv_out.weight", source)[0]
    dd = dataclasses.replace(
        base.ddconfig, ch=ch, in_channels=in_channels, ch_mult=tuple(ch_mult), num_res_blocks=nrb,
        z_channels=z_channels, double_z=enc_out == 2 * z_channels,
        out_ch=_shape(sd, "decoder.conv_out.weight", source)[0], attn_resolutions=(),
    )
    for width in {ch * m for m in ch_mult}:
        if width % dd.num_groups:
            raise CheckpointError(f"{source}: GroupNorm with {dd.num_groups} groups cannot normalise "
                                  f"{width} channels; pass the config with the right num_groups")
    spade = "spade.block.0.norm_0.spades.{}.mlp_shared.0.weight"
    classes = _indices(sd, r"spade\.block\.0\.norm_0\.spades\.(\d+)\.")
    n_embed, embed_dim = _shape(sd, "quantize.embedding.weight", source)
    return dataclasses.replace(
        base, ddconfig=dd, n_embed=n_embed, embed_dim=embed_dim, num_classes=len(classes),
        spade_nf=_shape(sd, "spade.block.0.conv_1.weight", source)[0],
        spade_nhidden=_shape(sd, spade.format(0), source)[0],
    )


def infer_unet_config(sd: Mapping[str, torch.Tensor], base: UNetConfig,
                      source: str = "checkpoint") -> UNetConfig:
    """UNet hyper-parameters from tensor shapes (head width and norm groups from `base`)."""
    mc, in_channels = _shape(sd, "input_blocks.0.0.weight", source)[:2]
    level_widths: list[list[int]] = [[]]
    attention: set[int] = set()
    for i in _indices(sd, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in sd:
            level_widths.append([])
            continue
        level_widths[-1].append(_shape(sd, f"input_blocks.{i}.0.in_layers.2.weight", source)[0])
        if f"input_blocks.{i}.1.qkv.weight" in sd:
            attention.add(2 ** (len(level_widths) - 1))
    nrb = len(level_widths[0])
    if nrb == 0 or any(len(w) != nrb for w in level_widths):
        raise CheckpointError(f"{source}: UNet levels have different numbers of res-blocks")
    mult = []
    for widths in level_widths:
        if widths[-1] % mc:
            raise CheckpointError(f"{source}: UNet width {widths[-1]} is not a multiple of {mc}")
        mult.append(widths[-1] // mc)
    num_classes = _shape(sd, "label_emb.weight", source)[0] if "label_emb.weight" in sd else None
    return dataclasses.replace(
        base, in_channels=in_channels, model_channels=mc, channel_mult=tuple(mult),
        num_res_blocks=nrb, attention_resolutions=tuple(sorted(attention, reverse=True)),
        out_channels=_shape(sd, "out.2.weight", source)[0], num_classes=num_classes,
    )


def _check_and_load(model: ALDM, sd: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{source}: the weights do not fit the inferred architecture: missing "
                              f"{_names(missing) or 'none'}; unexpected {_names(unexpected) or 'none'}")
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{source}: wrong shapes: {_names(wrong, 3)}")
    meta = next(iter(expected.values())).device.type == "meta"
    model.load_state_dict({k: v if meta else v.float() for k, v in sd.items()},
                          strict=True, assign=True)
