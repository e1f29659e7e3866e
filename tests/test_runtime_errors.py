"""Bad runtime inputs each raise one clear AldmError."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from aldm.errors import InputError, ModelError, UsageError
from aldm.runtime.manifest import ModelDir, sha256_file
from aldm.runtime.pipeline import Pipeline
from conftest import rel_err


@pytest.fixture(scope="module")
def pipe(tiny_export):
    with Pipeline.load(tiny_export) as p:
        yield p


def _x(shape=(1, 1, 32, 32, 16), dtype=np.float32):
    return np.random.default_rng(0).uniform(-1, 1, shape).astype(dtype)


def test_a_translation_runs_and_returns_every_target(pipe):
    tr = pipe.translate(_x(), ["t2", "flair"], steps=5, seed=1)
    assert set(tr.volumes) == {"t2", "flair"}
    assert tr.volumes["t2"].shape == (1, 1, 32, 32, 16) and tr.volumes["t2"].dtype == np.float32
    assert np.isfinite(tr.volumes["flair"]).all()
    again = pipe.translate(_x(), ["t2", "flair"], steps=5, seed=1)
    np.testing.assert_array_equal(again.volumes["t2"], tr.volumes["t2"])  # seeded: reproducible


def test_batched_targets_equal_separate_runs_with_the_same_noise(pipe):
    """One batched UNet call for all targets gives each target what it would get alone."""
    x = _x()
    z = pipe.encode(x)
    rng_shape = (1,) + tuple(pipe.manifest.latent_shape)
    noises = [np.random.default_rng(i).standard_normal((6,) + rng_shape, dtype=np.float32) for i in (1, 2)]
    from aldm.runtime import sampler as S

    both = pipe.sample(pipe.condition(np.concatenate([z, z]), np.array([2, 3])), np.array([2, 3]),
                       S.replay_noise(np.concatenate(noises, axis=1)), steps=5)
    for k, cls in enumerate((2, 3)):
        alone = pipe.sample(pipe.condition(z, np.array([cls])), np.array([cls]),
                            S.replay_noise(noises[k]), steps=5)
        assert rel_err(both[k : k + 1], alone) <= 1e-5


@pytest.mark.parametrize("shape", [(1, 1, 16, 32, 16), (1, 32, 32, 16), (1, 2, 32, 32, 16)])
def test_wrong_shape(pipe, shape):
    with pytest.raises(InputError, match="shape"):
        pipe.encode(_x(shape))


def test_wrong_dtype(pipe):
    with pytest.raises(InputError, match="dtype float64, expected float32"):
        pipe.encode(_x(dtype=np.float64))


def test_nan_input(pipe):
    x = _x()
    x[0, 0, 3, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        pipe.encode(x)


@pytest.mark.parametrize("targets", [["t5"], ["T2", "t2"], []])
def test_unknown_or_repeated_target(pipe, targets):
    with pytest.raises(UsageError):
        pipe.translate(_x(), targets, steps=5)


def test_invalid_step_count(pipe):
    with pytest.raises(UsageError, match="not a valid count"):
        pipe.translate(_x(), ["t2"], steps=7)


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_manifest_hash_mismatch(tiny_export, tmp_path):
    d = _copy(tiny_export, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["spade.onnx"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="spade.onnx: sha256 does not match"):
        ModelDir(d)


def test_corrupted_onnx_is_caught_by_its_hash(tiny_export, tmp_path):
    d = _copy(tiny_export, tmp_path)
    data = bytearray((d / "unet.onnx").read_bytes())
    data[100:200] = b"\xff" * 100
    (d / "unet.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="unet.onnx: sha256 does not match the manifest") as err:
        Pipeline.load(d)
    assert "\n" not in str(err.value) and str(d / "unet.onnx") in str(err.value)


@pytest.mark.parametrize("slabs", [False, True])
def test_corrupted_onnx_with_a_matching_manifest_fails_to_load(tiny_export, tmp_path, slabs):
    """The whole decoder (--tile-rows 0) or a slab graph (the default): one ModelError naming it."""
    d = _copy(tiny_export, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    name = m["decoder_tiling"]["steps"][1]["file"] if slabs else "decoder.onnx"
    (d / name).write_bytes(b"garbage, not a protobuf" * 10)
    m["files"][name] = sha256_file(d / name)
    (d / "manifest.json").write_text(json.dumps(m))
    p = Pipeline.load(d, tile_rows=4 if slabs else 0)
    z = np.zeros((1,) + tuple(p.manifest.latent_shape), np.float32)
    with pytest.raises(ModelError, match=f"cannot load .*{name}"):
        p.decode(z)


def test_missing_file_and_not_a_model_folder(tiny_export, tmp_path):
    d = _copy(tiny_export, tmp_path)
    (d / "schedule.npz").unlink()
    with pytest.raises(ModelError, match="missing file schedule.npz"):
        ModelDir(d)
    with pytest.raises(ModelError, match="not an aldm model folder"):
        ModelDir(tmp_path)


def test_manifest_of_another_format_version(tiny_export, tmp_path):
    d = _copy(tiny_export, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="format version 99"):
        ModelDir(d)
