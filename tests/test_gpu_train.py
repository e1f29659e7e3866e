"""The one-call GPU training (issue 16 item 3), on a CPU: the code pack, the width that comes back,
the dry run of scripts/gpu_train.sh in a subprocess (as the device machine runs it: no nibabel)
and the merge of its files into a checkpoint that load_official reads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aldm.models import LDMConfig, load_official
from aldm.models.aldm import VQModel
from aldm.models.checkpoint import read_checkpoint
from aldm.training import pack as packs
from conftest import synthetic_volume, write_nifti

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_train  # noqa: E402

MANIFEST = ROOT / "src" / "aldm" / "assets" / "default_model" / "manifest.json"
MiB = 1 << 20


def synthetic_pack(path: Path, shape=(8, 8, 8), volumes: int = 2) -> dict:
    cfg = LDMConfig.tiny()
    torch.manual_seed(0)
    vq = VQModel(cfg.first_stage_config)
    fs = {k: v.numpy() for k, v in vq.state_dict().items() if not k.startswith("spade.")}
    codes = np.random.default_rng(0).integers(0, 64, (volumes, 4, *shape)).astype(np.uint16)
    return packs.write_pack(path, codes=codes, codebook=fs["quantize.embedding.weight"],
                            cases=[f"C{i}" for i in range(volumes)], flipped=[False] * volumes,
                            modalities=["t1", "t1ce", "t2", "flair"], config=cfg.to_dict(),
                            first_stage=fs, meta={"held_out": ["V0"]})


def test_codes_round_trip_exactly_and_refuse_unquantized_latents(tmp_path):
    cb = np.random.default_rng(1).normal(size=(16, 4)).astype(np.float32)
    idx = np.random.default_rng(2).integers(0, 16, (3, 4, 5))
    z_q = cb[idx].transpose(3, 0, 1, 2)  # (C, h, w, d)
    codes = packs.codes_of(z_q, cb)
    assert codes.dtype == np.uint16 and np.array_equal(codes, idx)
    with pytest.raises(Exception, match="not codebook rows"):
        packs.codes_of(z_q + 1e-6, cb)

    info = synthetic_pack(tmp_path / "p", shape=(4, 8, 4), volumes=3)
    pk = packs.read_pack(tmp_path / "p")
    lat = packs.latents(pk)
    assert lat.shape == (3, 4, 4, 4, 8, 4)
    cb = torch.from_numpy(pk["codebook"])
    i = pk["codes"][1, 2, 3, 5, 1]
    assert torch.equal(lat[1, 2, :, 3, 5, 1], cb[int(i)])
    assert info["scale_factor"] == pytest.approx(float(1 / lat.std()), rel=1e-5)  # torch's std
    cfg, frozen = packs.first_stage(tmp_path / "p")
    missing = VQModel(cfg.first_stage_config).load_state_dict(frozen, strict=False).missing_keys
    assert missing and all(k.startswith("spade.") for k in missing)


def test_auto_size_is_the_widest_official_fraction_whose_files_come_back():
    base = LDMConfig.from_dict(json.loads(MANIFEST.read_text())["config"])  # the bundled first stage
    auto = gpu_train.choose("auto", base)
    assert (auto.unet_config.model_channels, auto.first_stage_config.spade_nf,
            auto.first_stage_config.spade_nhidden) == (96, 96, 48)
    assert auto.unet_config.attention_resolutions == (4, 2)  # the official topology
    assert auto.first_stage_config.ddconfig == base.first_stage_config.ddconfig  # frozen VQ-GAN kept
    nbytes = gpu_train.returned_bytes(auto)[0]
    assert gpu_train.fits(auto) and nbytes <= 64 * MiB - gpu_train.SIDE_BYTES
    official = gpu_train.choose("official", base)
    assert not gpu_train.fits(official) and gpu_train.returned_bytes(official)[0] > 64 * MiB
    small = gpu_train.choose("small", base)
    assert small.unet_config.model_channels == 32 and gpu_train.fits(small)


def test_dry_run_on_cpu_returns_files_within_the_limits_that_merge_into_a_loadable_checkpoint(tmp_path):
    synthetic_pack(tmp_path / "pack")
    fake = tmp_path / "fake"  # the device machine has no nibabel: nothing on this path may need it
    (fake / "nibabel").mkdir(parents=True)
    (fake / "nibabel" / "__init__.py").write_text("raise ImportError('no nibabel on the device machine')\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(fake), "OMP_NUM_THREADS": "2"}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_train.sh"), "--device", "cpu", "--minutes", "0.05",
                          "--size", "small", "--pack", str(tmp_path / "pack"), "--run", str(tmp_path / "run"),
                          "--patch", "8", "--min-steps", "2"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(out.iterdir())
    names = {p.name for p in files}
    assert {"summary.json", "log.csv", "console.txt", "spade-0.ckpt", "unet-0.ckpt"} <= names
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
    assert all(p.stat().st_size <= 16 * MiB for p in files) and sum(p.stat().st_size for p in files) <= 64 * MiB
    summary = json.loads((out / "summary.json").read_text())
    assert summary["limits_check"]["ok"]
    assert summary["stage2"]["steps"] >= 2 and summary["stage3"]["steps"] >= 2
    assert summary["stage3"]["samples_per_s"] > 0
    shard = read_checkpoint(out / "unet-0.ckpt")
    assert shard["pytorch-lightning_version"] and shard["aldm_shard"]["part"] == "unet"
    assert all(v.dtype == torch.bfloat16 for v in shard["state_dict"].values() if v.is_floating_point())
    assert all(k.startswith("model_ema.") for k in shard["state_dict"])

    merged = gpu_train.merge(out, tmp_path / "pack", tmp_path / "last.ckpt")
    model = load_official(merged)
    assert model.config.unet_config.model_channels == 32
    assert model.scale_factor == pytest.approx(summary["pack"]["scale_factor"])
    _, frozen = packs.first_stage(tmp_path / "pack")
    fs = model.first_stage_model.state_dict()
    assert all(torch.equal(fs[k], v) for k, v in frozen.items())  # the frozen VQ-GAN, bit for bit
    spade = read_checkpoint(out / "spade-0.ckpt")["state_dict"]
    k = next(iter(spade))
    assert torch.equal(fs[k.removeprefix("first_stage_model.")], spade[k].float())

    # a later call continues from these files: same widths, SPADE kept (stage 2 skipped), UNet from its EMA
    out2 = tmp_path / "out2"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_train.py"), "--device", "cpu", "--minutes", "0.05",
                          "--pack", str(tmp_path / "pack"), "--out", str(out2), "--patch", "8", "--min-steps", "2",
                          "--init", str(out), "--stage2-share", "0", "--run", str(tmp_path / "run2")], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    s2 = json.loads((out2 / "summary.json").read_text())
    assert "stage2" not in s2 and s2["continued"]["stage3_steps"] == summary["stage3"]["steps"]
    assert read_checkpoint(out2 / "spade-0.ckpt")["state_dict"][k].equal(spade[k])
    again = load_official(gpu_train.merge(out2, tmp_path / "pack", tmp_path / "last2.ckpt"))
    assert read_checkpoint(tmp_path / "last2.ckpt")["global_step"] == summary["stage3"]["steps"] + s2["stage3"]["steps"]
    assert again.config.unet_config.model_channels == 32

    # or from one official checkpoint (e.g. the bundled model's): its SPADE, EMA UNet and scale factor;
    # --fp32-files keeps full precision for runs whose files need not travel
    out3 = tmp_path / "out3"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_train.py"), "--device", "cpu", "--minutes", "0.05",
                          "--pack", str(tmp_path / "pack"), "--out", str(out3), "--patch", "8", "--min-steps", "2",
                          "--init", str(tmp_path / "last.ckpt"), "--stage2-share", "0", "--fp32-files",
                          "--run", str(tmp_path / "run3")], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    shard3 = read_checkpoint(out3 / "spade-0.ckpt")["state_dict"]
    assert shard3[k].dtype == torch.float32 and shard3[k].equal(fs[k.removeprefix("first_stage_model.")])
    third = load_official(gpu_train.merge(out3, tmp_path / "pack", tmp_path / "last3.ckpt"))
    assert third.scale_factor == pytest.approx(model.scale_factor)


def test_pack_codes_encodes_training_cases_only(tmp_path):
    data = tmp_path / "data"
    for i, case in enumerate(("CaseA", "CaseHeld")):
        (data / case).mkdir(parents=True)
        for j, mod in enumerate(("t1", "t1ce", "t2", "flair")):
            v = synthetic_volume((100, 120, 90), seed=i).astype(np.float32) * (1 + 0.3 * j)  # >0.5 % of the grid
            write_nifti(data / case / f"{case}_{mod}.nii.gz", v.astype(np.int16))
    import pack_codes

    assert pack_codes.main(["--data", str(data), "--out", str(tmp_path / "p"), "--val-cases", "CaseHeld",
                            "--no-flips", "--threads", "2"]) == 0
    pk = packs.read_pack(tmp_path / "p")
    assert pk["cases"].tolist() == ["CaseA"] and pk["meta"]["held_out"] == ["CaseHeld"]
    assert pk["codes"].shape == (1, 4, 36, 48, 36) and pk["codes"].dtype == np.uint16
    assert pk["modalities"].tolist() == ["t1", "t1ce", "t2", "flair"]
    assert pk["meta"]["encoder_sha256"] == json.loads(MANIFEST.read_text())["files"]["encoder.onnx"]
    assert not (tmp_path / "p" / "first_stage.ckpt").exists()  # rebuilt from the model's graphs
    cfg, frozen = packs.first_stage(tmp_path / "p")
    assert torch.equal(frozen["quantize.embedding.weight"], torch.from_numpy(pk["codebook"]))


def test_a_stage_out_of_gpu_memory_resumes_with_half_the_batch():
    from aldm.training.stages import Budget

    tried = []

    def stage(b):
        tried.append(b.batch)
        if b.batch > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    summary = {}
    done = gpu_train.halving_on_oom(stage, Budget(10, 8, 1e-3, 48), summary)
    assert tried == [8, 4, 2] and done.batch == 2 and summary["oom_fallbacks"] == ["batch 8 -> 4", "batch 4 -> 2"]


def test_pack_rebuilds_the_frozen_vq_gan_from_the_checked_graphs(tmp_path):
    import shutil

    shutil.copytree(ROOT / "gpu_pack", tmp_path / "p")
    cfg, frozen = packs.first_stage(tmp_path / "p")
    vq = VQModel(cfg.first_stage_config)
    missing = vq.load_state_dict(frozen, strict=False).missing_keys
    assert missing and all(k.startswith("spade.") for k in missing)
    assert torch.equal(frozen["quantize.embedding.weight"], torch.from_numpy(packs.read_pack(tmp_path / "p")["codebook"]))
    meta = json.loads((tmp_path / "p" / "pack.json").read_text())
    meta["model_sha256"]["decoder.onnx"] = "0" * 64
    (tmp_path / "p" / "pack.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="not the graph this pack was encoded with"):
        packs.first_stage(tmp_path / "p")


def test_the_committed_pack_holds_training_cases_only():
    """Never the held-out cases: the bundled model's three (docs/model-card.md) and Brats18_TCIA01_499_1."""
    pk = packs.read_pack(ROOT / "gpu_pack")
    held = {"Brats18_2013_20_1", "Brats18_TCIA01_201_1", "Brats18_TCIA03_265_1", "Brats18_TCIA01_499_1"}
    assert set(pk["meta"]["held_out"]) == held
    assert not held & set(pk["cases"].tolist()) and not held & set(pk["meta"]["cases"])
    assert pk["codes"].dtype == np.uint16 and pk["codes"].shape[1:] == (4, 36, 48, 36)
    assert int(pk["codes"].max()) < len(pk["codebook"])
    assert sum(f.stat().st_size for f in (ROOT / "gpu_pack").iterdir()) <= 15 * 10**6
