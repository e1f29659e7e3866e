"""Official-format checkpoints round-trip; malformed or malicious files give one clear AldmError."""

from __future__ import annotations

import os
import pickle
import sys
import types
import warnings

import pytest
import torch

from aldm.errors import CheckpointError
from aldm.models import LDMConfig, load_official
from aldm.models.checkpoint import read_checkpoint, read_state_dict, save_official

CFG = LDMConfig.tiny()


def _unet_params(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}


@pytest.fixture()
def ckpt(tmp_path, tiny_model):
    """The tiny model in the official layout, with EMA weights that differ from the raw ones."""
    ema = {k: v + 0.01 for k, v in _unet_params(tiny_model).items()}
    path = tmp_path / "last.ckpt"
    save_official(path, tiny_model.official_state_dict(), ema)
    return path


def _eps(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 12, 4, generator=g)
    c = torch.randn(2, 8, 8, 12, 4, generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor([10, 900]), c, torch.tensor([2, 3]))


def test_round_trip_uses_ema_by_default(ckpt, tiny_model):
    ema_model = load_official(ckpt, config=CFG)
    raw_model = load_official(ckpt, config=CFG, ema=False)
    assert torch.equal(_eps(raw_model), _eps(tiny_model))
    assert not torch.allclose(_eps(ema_model), _eps(tiny_model))
    sd = ema_model.model.diffusion_model.state_dict()
    for k, v in _unet_params(tiny_model).items():
        assert torch.equal(sd[k], v + 0.01)


def test_no_ema_falls_back_to_raw_weights_with_a_warning(tmp_path, tiny_model):
    path = tmp_path / "noema.ckpt"
    save_official(path, tiny_model.official_state_dict())
    with pytest.warns(UserWarning, match="no EMA weights"):
        model = load_official(path, config=CFG)
    assert torch.equal(_eps(model), _eps(tiny_model))


def test_shapes_cannot_tell_norm_groups_so_the_error_asks_for_the_config(ckpt):
    with pytest.raises(CheckpointError, match="num_groups"):
        load_official(ckpt)  # official default: 32 groups, but the tiny VQ-GAN has 8 channels


def test_missing_file():
    with pytest.raises(CheckpointError, match="not found"):
        load_official("/nonexistent/last.ckpt")


def test_truncated_file(ckpt, tmp_path):
    data = ckpt.read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_official(bad, config=CFG)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n", b"\x00" * 64])
def test_not_a_checkpoint(tmp_path, content):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match="x.ckpt"):
        load_official(bad, config=CFG)


def test_a_pickled_non_dict(tmp_path):
    bad = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], bad)
    with pytest.raises(CheckpointError, match="list"):
        load_official(bad, config=CFG)


def test_wrong_shape_names_the_key(tmp_path, tiny_model):
    sd = tiny_model.official_state_dict()
    key = "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight"
    sd[key] = torch.zeros(3, 3)
    path = tmp_path / "shape.ckpt"
    save_official(path, sd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="emb_layers.1.weight"):
            load_official(path, config=CFG)


def test_unknown_key_is_named(tmp_path, tiny_model):
    sd = tiny_model.official_state_dict()
    sd["cond_stage_model.proj.weight"] = torch.zeros(2)
    path = tmp_path / "unknown.ckpt"
    save_official(path, sd)
    with pytest.raises(CheckpointError, match="cond_stage_model.proj.weight"):
        load_official(path, config=CFG)


def test_unknown_key_inside_the_unet_is_named(tmp_path, tiny_model):
    sd = tiny_model.official_state_dict()
    sd["model.diffusion_model.extra_head.weight"] = torch.zeros(2)
    path = tmp_path / "unknown.ckpt"
    save_official(path, sd, {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()
                             if k.startswith("model.diffusion_model.")})
    with pytest.raises(CheckpointError, match="extra_head.weight"):
        load_official(path, config=CFG)


def test_missing_first_stage_asks_for_the_vqgan_file(tmp_path, tiny_model):
    sd = {k: v for k, v in tiny_model.official_state_dict().items()
          if not k.startswith("first_stage_model.")}
    path = tmp_path / "ldm_only.ckpt"
    save_official(path, sd)
    with pytest.raises(CheckpointError, match="VQ-GAN"):
        load_official(path, config=CFG)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_reduce_payload_is_refused_and_never_runs(tmp_path, tiny_model):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny_model.official_state_dict(), "callbacks": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt names posix\.system.*refused"):
        load_official(path, config=CFG)
    assert not marker.exists()
    # the same file under plain unpickling WOULD run the payload (proves the test is real)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_lightning_1_2_callbacks_keyed_by_classes(tmp_path, tiny_model, monkeypatch):
    """PL 1.2 pickles callback classes as dict keys; the file loads without pytorch_lightning."""
    fake = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = fake.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    fake.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    path = tmp_path / "pl12.ckpt"
    torch.save({"epoch": 3, "pytorch-lightning_version": "1.2.0",
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1)}},
                "state_dict": tiny_model.official_state_dict()}, path)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", fake.__name__):
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(path)  # torch's weights_only loader refuses it
    ck = read_checkpoint(path)
    (key, state), = ck["callbacks"].items()
    assert isinstance(key, type) and key.__name__ == "ModelCheckpoint"  # an inert placeholder
    assert torch.equal(state["best_model_score"], torch.tensor(0.1))
    sd = tiny_model.official_state_dict()
    assert read_state_dict(path).keys() == sd.keys()
    assert all(torch.equal(read_state_dict(path)[k], v) for k, v in sd.items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_official(path, config=CFG)
    assert torch.equal(_eps(model), _eps(tiny_model))


def test_save_official_is_atomic_and_leaves_no_partial(tmp_path, tiny_model):
    path = tmp_path / "last.ckpt"
    save_official(path, tiny_model.official_state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert read_checkpoint(path)["pytorch-lightning_version"] == "1.6.3"
