"""load_official reproduces every golden array produced by the official code (≤ 1e-5 relative)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import GOLDEN, need, rel_err

TOL = 1e-5
t = torch.from_numpy


@pytest.fixture(scope="module")
def fs(golden):
    return golden["first_stage"]


def test_encoder_quantizer(golden_model, fs):
    m = golden_model.first_stage_model
    with torch.no_grad():
        h = m.encoder(t(fs["x_src"]))
        pre = m.quant_conv(h)
        z_q, idx = m.quantize(pre)
    assert rel_err(h, fs["enc_out"]) <= TOL
    assert rel_err(pre, fs["quant_in"]) <= TOL
    assert rel_err(z_q, fs["z_q"]) <= TOL
    np.testing.assert_array_equal(idx.reshape(-1).numpy(), fs["code_indices"])
    with torch.no_grad():
        assert rel_err(golden_model.encode(t(fs["x_src"])), fs["z_q"]) <= TOL


@pytest.mark.parametrize("cls", range(4))
def test_spade_per_class(golden_model, fs, cls):
    with torch.no_grad():
        out = golden_model.spade(t(fs["z_q"]), torch.full((2,), cls))
    assert rel_err(out, fs["spade_per_class"][cls]) <= TOL


def test_spade_mixed_classes_in_one_batch(golden_model, fs):
    with torch.no_grad():
        out = golden_model.spade(t(fs["z_q"]), t(fs["y"]))
    assert rel_err(out, fs["spade_mixed_y"]) <= TOL
    # each row is bit-identical to that row of the batch run with its class everywhere
    with torch.no_grad():
        for row, cls in enumerate(fs["y"]):
            same = golden_model.spade(t(fs["z_q"]), torch.full((2,), int(cls)))
            assert torch.equal(same[row], out[row])


def test_spade_blocks(golden_model, fs):
    z = t(fs["z_q"][0:1])
    with torch.no_grad():
        for i, block in enumerate(golden_model.first_stage_model.spade.block):
            z = block(z, torch.tensor([2]))
            assert rel_err(z[0], fs[f"spade_block{i}_s0_c2"]) <= TOL, i


def test_decoder(golden_model, fs):
    with torch.no_grad():
        out = golden_model.decode(t(fs["z_q"][0:1]))
    assert rel_err(out, fs["dec_recon_row0"]) <= TOL


def test_unet_every_timestep(golden_model, golden):
    u = golden["unet"]
    assert u["t"].shape == (5, 2) and u["t"][4, 0] != u["t"][4, 1]  # last row: t differs per row
    with torch.no_grad():
        for i, ts in enumerate(u["t"]):
            eps = golden_model.unet(t(u["x_t"]), t(ts), t(u["c_concat"]), t(u["y"]))
            assert rel_err(eps, u[f"eps_{i}"]) <= TOL, f"t={ts}"


def test_conditioning_layout(golden_model, golden):
    """c_concat = cat[z_q, spade(z_q, y)] (scale factor 1)."""
    fs, u = golden["first_stage"], golden["unet"]
    with torch.no_grad():
        z = golden_model.encode(t(fs["x_src"]))
        c = torch.cat([z, golden_model.spade(z, t(u["y"]))], 1) * golden_model.scale_factor
    assert rel_err(c, u["c_concat"]) <= TOL


def test_time_and_class_embedding(golden_model, golden):
    from aldm.models.unet import timestep_embedding

    u = golden["unet"]
    unet = golden_model.model.diffusion_model
    temb = timestep_embedding(torch.full((2,), 500), unet.model_channels)
    assert rel_err(temb, u["t_emb_500"]) <= TOL
    with torch.no_grad():
        emb = unet.time_embed(temb) + unet.label_emb(t(u["y"]))
    assert rel_err(emb, u["emb_500"]) <= TOL


def test_ema_versus_raw_weights(golden_config, golden_model, golden):
    from aldm.models import load_official

    u = golden["unet"]
    raw = load_official(need(GOLDEN / "ldm.ckpt"), config=golden_config, ema=False)
    args = (t(u["x_t"]), torch.full((2,), 500), t(u["c_concat"]), t(u["y"]))
    with torch.no_grad():
        eps_raw, eps_ema = raw.unet(*args), golden_model.unet(*args)
    assert rel_err(eps_raw, u["eps_raw_weights_t500"]) <= TOL
    assert rel_err(eps_ema, u["eps_2"]) <= TOL
    assert rel_err(eps_raw, eps_ema) > 1e-3  # the two weight sets really differ


def test_schedule_is_the_checkpoint_schedule(golden_model, golden):
    s = golden["schedule"]
    assert golden_model.alphas_cumprod.dtype == np.float64
    np.testing.assert_array_equal(golden_model.alphas_cumprod, s["alphas_cumprod"].astype(np.float64))
    sched = golden_model.schedule()
    for name in ("betas", "posterior_mean_coef1", "posterior_log_variance_clipped"):
        np.testing.assert_array_equal(sched[name], s[name])


def test_separate_vqgan_file_fills_a_missing_first_stage(golden_config, tmp_path, golden):
    """An LDM file without first_stage_model.* takes the first stage from the VQ-GAN stage-2 file."""
    from aldm.models import load_official
    from aldm.models.checkpoint import read_state_dict

    sd = {k: v for k, v in read_state_dict(GOLDEN / "ldm.ckpt").items()
          if not k.startswith("first_stage_model.")}
    torch.save({"state_dict": sd}, tmp_path / "ldm_only.ckpt")
    model = load_official(tmp_path / "ldm_only.ckpt", need(GOLDEN / "vqgan_stage2.ckpt"),
                          config=golden_config)
    fs = golden["first_stage"]
    with torch.no_grad():
        assert rel_err(model.encode(t(fs["x_src"])), fs["z_q"]) <= TOL
