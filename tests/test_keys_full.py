"""Every key and shape of the full-size official checkpoints loads into the full-size model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import KEYS_FULL, need


def meta_state_dict(name: str) -> dict[str, torch.Tensor]:
    entries = json.loads(need(KEYS_FULL / name).read_text())["keys"]
    dtypes = {"float32": torch.float32, "int32": torch.int32, "int64": torch.int64}
    return {e["key"]: torch.empty(e["shape"], dtype=dtypes[e["dtype"]], device="meta") for e in entries}


def _count(model, prefix: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def test_full_size_ldm_checkpoint_loads_with_no_yaml():
    from aldm.models import LDMConfig, build_from_state_dict

    sd = meta_state_dict("latent_diffusion.json")
    assert len(sd) == 713
    model = build_from_state_dict(sd, device="meta")  # strict: raises on any missing/unexpected key
    assert model.config == LDMConfig()  # every inferred hyper-parameter is the official one
    assert _count(model, "model.diffusion_model.") == 33_197_316
    assert _count(model, "first_stage_model.") == 25_434_297
    assert _count(model, "first_stage_model.spade.") == 18_932_428
    loaded = set(model.state_dict())
    expected = {k for k in sd if k.startswith(("first_stage_model.", "model.diffusion_model."))}
    assert loaded == expected


@pytest.mark.parametrize("vq_file", ["vqgan_stage2_taming_VQModel.json", "vqgan_stage1_taming_VQModel.json"])
def test_full_size_vqgan_file_supplies_the_first_stage(vq_file):
    from aldm.models import LDMConfig, build_from_state_dict

    ldm = {k: v for k, v in meta_state_dict("latent_diffusion.json").items()
           if not k.startswith("first_stage_model.")}
    vq = meta_state_dict(vq_file)
    assert any(k.startswith("loss.discriminator.") for k in vq)  # ignored, not an error
    model = build_from_state_dict(ldm, vq, device="meta")
    assert model.config.first_stage_config == LDMConfig().first_stage_config


def test_ldm_first_stage_key_list_matches_the_model():
    from aldm.models import LDMConfig
    from aldm.models.aldm import VQModel

    with torch.device("meta"):
        vq = VQModel(LDMConfig().first_stage_config)
    sd = meta_state_dict("ldm_first_stage_VQModel.json")
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        k: tuple(v.shape) for k, v in vq.state_dict().items()}


def test_ema_name_map_is_the_official_one():
    from aldm.models.loader import ema_name

    mapping = json.loads(need(KEYS_FULL / "ema_name_map.json").read_text())
    assert len(mapping) == 185
    for raw, ema in mapping.items():
        assert ema_name(raw.removeprefix("model.diffusion_model.")) == ema
