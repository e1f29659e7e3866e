"""Model configuration in the official yaml vocabulary (brats_vqgan_stage2.yaml, brats-ldm-vq-4.yaml).

Defaults are the full-size official values. `LDMConfig.from_official` reads the official LDM yaml
(a path) or a dict in its vocabulary such as the `ldm` entry of the golden `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from aldm.errors import AldmError


@dataclass(frozen=True)
class DDConfig:
    """VQ-GAN encoder/decoder (`ddconfig`)."""

    ch: int = 64  # base width; level i has ch * ch_mult[i] channels
    ch_mult: tuple[int, ...] = (1, 1, 2)  # one entry per level; all but the last downsample by 2
    num_res_blocks: int = 1  # encoder blocks per level (the decoder has one more)
    z_channels: int = 4  # encoder output / decoder input channels
    in_channels: int = 1
    out_ch: int = 1
    num_groups: int = 32  # GroupNorm groups (eps 1e-6); not visible in tensor shapes
    double_z: bool = False
    attn_resolutions: tuple[int, ...] = ()  # must stay empty: the ALDM VQ-GAN has no attention
    dropout: float = 0.0
    resolution: int = 192  # bookkeeping only in the official code


@dataclass(frozen=True)
class VQConfig:
    """First stage: VQ-GAN plus the MS-SPADE generator (`first_stage_config.params`)."""

    embed_dim: int = 4
    n_embed: int = 8192  # codebook size
    num_classes: int = 4  # SPADE branches, one per target modality
    ddconfig: DDConfig = field(default_factory=DDConfig)
    spade_nf: int = 128  # SPADE generator width (hard-coded officially, inferred from shapes here)
    spade_nhidden: int = 64  # SPADE mlp_shared width (hard-coded officially)


@dataclass(frozen=True)
class UNetConfig:
    """Denoising UNet (`unet_config.params`)."""

    in_channels: int = 12  # [x_t, z_src, z_srctgt]
    out_channels: int = 4
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (4, 2)  # downsampling factors that get attention
    num_head_channels: int = 32  # head width; not visible in tensor shapes
    num_heads: int = -1  # used only when num_head_channels == -1
    num_classes: int | None = 4  # class embedding (target modality)
    norm_groups: int = 32  # GroupNorm32 (eps 1e-5); fixed in the official code


@dataclass(frozen=True)
class LDMConfig:
    """The whole ALDM model (`model.params` of brats-ldm-vq-4.yaml)."""

    timesteps: int = 1000
    linear_start: float = 0.0015
    linear_end: float = 0.0195
    beta_schedule: str = "linear"  # official "linear" = square-root spaced betas
    parameterization: str = "eps"
    scale_factor: float = 1.0  # latents enter the UNet multiplied by this; decode divides by it
    unet_config: UNetConfig = field(default_factory=UNetConfig)
    first_stage_config: VQConfig = field(default_factory=VQConfig)

    @classmethod
    def from_official(cls, source: str | Path | Mapping[str, Any] | None) -> "LDMConfig":
        """Build from the official LDM yaml/json (path) or a dict in its vocabulary; None = defaults."""
        if source is None:
            return cls()
        if isinstance(source, (str, Path)):
            source = _read_config_file(Path(source))
        return _ldm_from_dict(source)

    @classmethod
    def tiny(cls) -> "LDMConfig":
        """A few-hundred-kB model with the official topology, for tests and smoke runs."""
        return cls(
            unet_config=UNetConfig(model_channels=32, channel_mult=(1, 1, 1), num_head_channels=8),
            first_stage_config=VQConfig(n_embed=64, spade_nf=8, spade_nhidden=4,
                                        ddconfig=DDConfig(ch=8, num_groups=4)),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LDMConfig":
        """Inverse of `to_dict` (used by manifests and training checkpoints)."""
        d = dict(d)
        unet = UNetConfig(**_tuples(d.pop("unet_config")))
        fs = dict(d.pop("first_stage_config"))
        dd = DDConfig(**_tuples(fs.pop("ddconfig")))
        return cls(**d, unet_config=unet, first_stage_config=VQConfig(**fs, ddconfig=dd))


def _tuples(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _read_config_file(path: Path) -> Mapping[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise AldmError(f"cannot read config {path}: {exc.strerror}") from None
    if path.suffix == ".json":
        return json.loads(text)
    try:
        import yaml
    except ImportError:
        raise AldmError("reading a yaml config needs pyyaml: pip install 'aldm[export]'") from None
    return yaml.safe_load(text)


def _pick(cls, params: Mapping[str, Any], **extra) -> dict[str, Any]:
    """Keep the keys of `params` that are fields of `cls` (the yaml has many training-only keys)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {k: (tuple(v) if isinstance(v, list) else v) for k, v in params.items() if k in names}
    out.update(extra)
    return out


def _ldm_from_dict(d: Mapping[str, Any]) -> LDMConfig:
    # Accept the whole yaml ({"model": {"params": ...}}), its "model" entry, or the params dict.
    if "model" in d:
        d = d["model"]
    params = d.get("params", d)
    if not isinstance(params, Mapping):
        raise AldmError("config is not an LDM config: expected model.params with unet_config")
    unet_params = dict((params.get("unet_config") or {}).get("params", {}))
    if unet_params.get("use_spatial_transformer"):
        raise AldmError("config uses a spatial transformer UNet, which ALDM does not have")
    unet = UNetConfig(**_pick(UNetConfig, unet_params))
    fs_params = dict((params.get("first_stage_config") or {}).get("params", {}))
    dd = DDConfig(**_pick(DDConfig, fs_params.get("ddconfig", {})))
    vq = VQConfig(**_pick(VQConfig, fs_params, ddconfig=dd))
    return LDMConfig(**_pick(LDMConfig, params, unet_config=unet, first_stage_config=vq))
