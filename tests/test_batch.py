"""Batch conversion: bad entries are reported and skipped over, kill -9 loses nothing and leaves
no partial file under a final name, reruns skip complete cases, Ray gives the same outputs."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from aldm.cli.infer import app
from conftest import synthetic_volume, write_nifti

ARGS = ["--targets", "t2", "--steps", "5", "--seed", "7", "--quiet"]


def run(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    # CliRunner catches exceptions instead of printing a traceback: an escaped one is here
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res


def _nifti_bytes(tmp_path, data, name="x.nii.gz"):
    p = write_nifti(tmp_path / name, data)
    b = p.read_bytes()
    p.unlink()
    return b


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "in"
    (d / "site_a").mkdir(parents=True)
    (d / "site_b").mkdir()
    for i in range(3):
        write_nifti(d / ("site_a" if i < 2 else "site_b") / f"sub{i}.nii.gz", synthetic_volume(seed=i))
    return d


def _data(path):
    return np.asarray(nib.load(str(path)).dataobj)


def test_archive_with_bad_entries_converts_every_good_case(tiny_export, tmp_path):
    good = [_nifti_bytes(tmp_path, synthetic_volume(seed=i)) for i in range(3)]
    corrupt_gzip = good[0][: len(good[0]) // 3]
    four_d = _nifti_bytes(tmp_path, np.ones((20, 20, 10, 3), np.int16))
    archive = tmp_path / "study.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for i, b in enumerate(good):
            add(f"study/sub{i}/t1.nii.gz", b)
        add("study/broken1.nii.gz", corrupt_gzip)
        add("study/broken2.nii.gz", b"this is not a nifti file at all")
        add("study/fourd.nii.gz", four_d)
        add("../../escape.nii.gz", good[0])
    out = tmp_path / "out"
    res = run("--batch", archive, "--out", out, "--model", tiny_export, *ARGS)
    assert res.exit_code == 3, res.output
    report = json.loads((out / "aldm_report.json").read_text())
    status = {c["id"]: c for c in report["cases"]}
    for i in range(3):
        assert status[f"study/sub{i}/t1.nii.gz"]["status"] == "done"
        assert (out / "study" / f"sub{i}" / "t1_t2.nii.gz").exists()
    assert "corrupt or truncated" in status["study/broken1.nii.gz"]["reason"]
    assert "not a readable NIfTI" in status["study/broken2.nii.gz"]["reason"]
    assert "4-D series of 3 volumes" in status["study/fourd.nii.gz"]["reason"]
    assert "escapes the output folder" in status["../../escape.nii.gz"]["reason"]
    assert not (tmp_path / "escape_t2.nii.gz").exists() and not (tmp_path.parent / "escape_t2.nii.gz").exists()
    assert report["summary"]["done"] == 3 and report["summary"]["failed"] == 4
    assert (out / "aldm_report.csv").read_text().count("\n") == 8


def test_zip_links_and_absolute_paths_are_refused(tiny_export, tmp_path):
    archive = tmp_path / "a.zip"
    good = _nifti_bytes(tmp_path, synthetic_volume())
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ok/a.nii.gz", good)
        z.writestr("/abs/b.nii.gz", good)
        link = zipfile.ZipInfo("ok/link.nii.gz")
        link.external_attr = (0o120777 << 16)
        z.writestr(link, "../../etc/passwd")
    res = run("--batch", archive, "--out", tmp_path / "out", "--model", tiny_export, *ARGS)
    assert res.exit_code == 3
    cases = {c["id"]: c for c in json.loads((tmp_path / "out" / "aldm_report.json").read_text())["cases"]}
    assert cases["ok/a.nii.gz"]["status"] == "done"
    assert "refused" in cases["ok/link.nii.gz"]["reason"] and "link" in cases["ok/link.nii.gz"]["reason"]
    assert "refused" in cases["/abs/b.nii.gz"]["reason"]


def test_folder_rerun_skips_complete_cases_and_redoes_partial_ones(tiny_export, folder, tmp_path):
    out = tmp_path / "out"
    assert run("--batch", folder, "--out", out, "--model", tiny_export, *ARGS).exit_code == 0
    first = {p: _data(p) for p in out.rglob("*.nii.gz")}
    assert len(first) == 3 and (out / "site_b" / "sub2_t2.nii.gz") in first
    # damage one case: truncated output under its final name (e.g. a copy gone wrong)
    victim = out / "site_a" / "sub1_t2.nii.gz"
    victim.write_bytes(victim.read_bytes()[:100])
    res = run("--batch", folder, "--out", out, "--model", tiny_export, *ARGS)
    assert res.exit_code == 0
    report = json.loads((out / "aldm_report.json").read_text())
    status = {c["id"]: c["status"] for c in report["cases"]}
    assert status == {"site_a/sub0.nii.gz": "skipped", "site_a/sub1.nii.gz": "done", "site_b/sub2.nii.gz": "skipped"}
    for p, d in first.items():
        np.testing.assert_array_equal(_data(p), d)  # the redone case is identical (per-case seed)


def test_list_and_brats_layout_inputs(tiny_export, tmp_path):
    d = tmp_path / "brats"
    for case in ("BraTS-001", "BraTS-002"):
        (d / case).mkdir(parents=True)
        for mod in ("t1n", "t2w"):
            write_nifti(d / case / f"{case}-{mod}.nii.gz", synthetic_volume(seed=len(mod)))
    res = run("--batch", d, "--out", tmp_path / "o1", "--model", tiny_export, "--source-modality", "t2",
              "--targets", "flair", "--naming", "brasyn", "--steps", "5", "--quiet")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "o1").rglob("*.nii.gz")) == ["BraTS-001-t2f.nii.gz", "BraTS-002-t2f.nii.gz"]
    listing = tmp_path / "list.csv"
    listing.write_text("path,note\nbrats/BraTS-001/BraTS-001-t1n.nii.gz,a\nbrats/BraTS-002/BraTS-002-t1n.nii.gz,b\n")
    res = run("--batch", listing, "--out", tmp_path / "o2", "--model", tiny_export, *ARGS)
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "o2").rglob("*_t2.nii.gz"))) == 2


def _batch_cmd(model, src, out):
    return [sys.executable, "-m", "aldm.cli.infer", "--batch", str(src), "--out", str(out),
            "--model", str(model), *ARGS, "--steps", "20"]


@pytest.fixture()
def eight_cases(tmp_path):
    d = tmp_path / "eight"
    d.mkdir()
    for i in range(8):
        write_nifti(d / f"c{i}.nii.gz", synthetic_volume(shape=(48, 44, 24), seed=20 + i))
    return d


def _watch_final_names(out: Path, seen: dict) -> None:
    """Every file under a final name must be complete whenever it is visible."""
    for p in out.rglob("*_t2.nii.gz"):
        if p not in seen:
            try:
                seen[p] = _data(p).shape
            except FileNotFoundError:
                continue


def test_kill_9_then_rerun_gives_the_uninterrupted_result(tiny_export, eight_cases, tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "out"
    ref = subprocess.run(_batch_cmd(tiny_export, eight_cases, ref_out), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen(_batch_cmd(tiny_export, eight_cases, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    seen: dict = {}
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.rglob("*_t2.json"))) < 2:
        _watch_final_names(out, seen)
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _watch_final_names(out, seen)
    done_before = len(list(out.rglob("*_t2.json")))
    assert 2 <= done_before < 8, "the batch was not killed mid-way"
    res = subprocess.run(_batch_cmd(tiny_export, eight_cases, out), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "aldm_report.json").read_text())
    assert sum(c["status"] == "skipped" for c in report["cases"]) >= done_before - 1
    for p in ref_out.rglob("*_t2.nii.gz"):
        np.testing.assert_array_equal(_data(out / p.relative_to(ref_out)), _data(p))
    assert not list(out.rglob(".*partial*"))


def test_sigint_finishes_the_write_and_stops_cleanly(tiny_export, eight_cases, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(_batch_cmd(tiny_export, eight_cases, out), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.rglob("*_t2.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    report = json.loads((out / "aldm_report.json").read_text())
    statuses = [c["status"] for c in report["cases"]]
    assert "done" in statuses and "interrupted" in statuses
    for c in report["cases"]:
        if c["status"] == "done":
            assert all(_data(p).shape == (48, 44, 24) for p in c["outputs"])
    assert not list(out.rglob(".*partial*"))


def test_ray_local_cluster_with_two_workers_matches_the_local_run(tiny_export, folder, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'aldm[ray]')")
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert run("--batch", folder, "--out", local, "--model", tiny_export, *ARGS).exit_code == 0
    res = run("--batch", folder, "--out", remote, "--model", tiny_export, "--ray", "--workers", "2",
              "--backend", "ort-cpu", *ARGS)
    assert res.exit_code == 0, res.output
    for p in local.rglob("*_t2.nii.gz"):
        np.testing.assert_allclose(_data(remote / p.relative_to(local)), _data(p), atol=1e-5)
