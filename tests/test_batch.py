"""Batch conversion: bad entries are reported and skipped over, kill -9 loses nothing and leaves
no partial file under a final name, reruns skip complete cases, Ray gives the same outputs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
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
from conftest import synthetic_volume, write_cases, write_nifti

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
    return write_cases(tmp_path / "eight", 8, seed=20)


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
    assert seen and set(seen.values()) == {(48, 44, 24)}  # every final name was whole when seen
    done_before = len(list(out.rglob("*_t2.json")))
    assert 2 <= done_before < 8, "the batch was not killed mid-way"
    res = subprocess.run(_batch_cmd(tiny_export, eight_cases, out), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "aldm_report.json").read_text())
    assert sum(c["status"] == "skipped" for c in report["cases"]) >= done_before - 1
    for p in ref_out.rglob("*_t2.nii.gz"):
        np.testing.assert_array_equal(_data(out / p.relative_to(ref_out)), _data(p))
    assert not list(out.rglob(".*partial*"))


def _started_batch(model, src, out) -> subprocess.Popen:
    """A batch in a subprocess, returned once its first case is written."""
    proc = subprocess.Popen(_batch_cmd(model, src, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.rglob("*_t2.json")):
        time.sleep(0.02)
    return proc


def test_sigint_finishes_the_write_and_stops_cleanly(tiny_export, eight_cases, tmp_path):
    out = tmp_path / "out"
    proc = _started_batch(tiny_export, eight_cases, out)
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
    page = (remote / "aldm_report.html").read_text()  # the report page, with a thumbnail per case
    assert page.count('data-status="done"') == 3 and len(re.findall(r'<img src="aldm_report_files/', page)) == 3


# ------------------------------------------------------------------------------ issue 15: trust

def _report(out: Path) -> dict:
    return json.loads((out / "aldm_report.json").read_text())


def _sha(p: Path) -> str:
    import hashlib

    return hashlib.sha256(p.read_bytes()).hexdigest()


def _degenerate_sform(path: Path) -> Path:
    img = nib.Nifti1Image(synthetic_volume(), np.eye(4))
    aff = np.eye(4)
    aff[:3, 1] = 0  # a zero column, as broken real-world headers have
    img.set_sform(aff, code=1)
    img.set_qform(None, code=0)
    nib.save(img, str(path))
    return path


def test_a_case_that_raises_anything_fails_alone_and_the_batch_does_not_hang(tiny_export, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _degenerate_sform(d / "broken.nii.gz")
    write_nifti(d / "good.nii.gz", synthetic_volume(seed=5))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "aldm.cli.infer", "--batch", str(d), "--out", str(out), "--model",
           str(tiny_export), *ARGS]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # hung forever before
    assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr
    cases = {c["id"]: c for c in _report(out)["cases"]}
    assert cases["good.nii.gz"]["status"] == "done"
    assert cases["broken.nii.gz"]["status"] == "failed" and "degenerate" in cases["broken.nii.gz"]["reason"]


def test_any_exception_type_in_any_stage_is_a_failed_record(tiny_export, folder, tmp_path, monkeypatch):
    """Not only the listed types: a LinAlgError while reading, a RuntimeError while computing and a
    ValueError while writing each fail one case; the others complete."""
    from aldm import translator as I

    real_load, real_compute, real_write = I.Translator.load, I.Translator.compute, I.Translator.write
    source_of = {}  # prepared record -> its source (compute runs after the reader moved on)

    def load(self, path):
        if "sub0" in str(self._current):
            raise np.linalg.LinAlgError("Singular matrix")
        vol, prep = real_load(self, path)
        source_of[id(prep)] = str(self._current)
        return vol, prep

    def compute(self, prep, seed, **kw):
        if "sub1" in source_of[id(prep)]:
            raise RuntimeError("encrypted member, password required")
        return real_compute(self, prep, seed, **kw)

    def write(self, vol, prep, tr, paths, seed, timings):
        if "sub2" in str(next(iter(paths.values()))):
            real_write(self, vol, prep, tr, paths, seed, timings)  # outputs on disk, then a failure:
            raise ValueError("something odd")  # (the real write cleans up its own failures)
        return real_write(self, vol, prep, tr, paths, seed, timings)

    orig_paths = I.Translator.output_paths

    def output_paths(self, source, out_dir=None, name=None):
        self._current = source
        return orig_paths(self, source, out_dir, name)

    monkeypatch.setattr(I.Translator, "output_paths", output_paths)
    monkeypatch.setattr(I.Translator, "load", load)
    monkeypatch.setattr(I.Translator, "compute", compute)
    monkeypatch.setattr(I.Translator, "write", write)
    extra = folder / "site_b" / "sub3.nii.gz"
    write_nifti(extra, synthetic_volume(seed=9))
    out = tmp_path / "out"
    res = run("--batch", folder, "--out", out, "--model", tiny_export, *ARGS)
    assert res.exit_code == 3, res.output
    cases = {c["id"]: c for c in _report(out)["cases"]}
    assert cases["site_a/sub0.nii.gz"]["reason"] == "LinAlgError: Singular matrix"
    assert cases["site_a/sub1.nii.gz"]["reason"] == "RuntimeError: encrypted member, password required"
    assert cases["site_b/sub2.nii.gz"]["reason"] == "ValueError: something odd"
    assert cases["site_b/sub3.nii.gz"]["status"] == "done"
    assert sorted(p.name for p in out.rglob("*.nii.gz")) == ["sub2_t2.nii.gz", "sub3_t2.nii.gz"]
    assert cases["site_b/sub2.nii.gz"]["status"] == "failed"


def test_rerun_with_other_settings_redoes_the_case_and_says_why(tiny_export, folder, tmp_path):
    out = tmp_path / "out"
    base = ["--batch", folder, "--out", out, "--model", tiny_export, "--targets", "t2", "--quiet"]
    assert run(*base, "--steps", "5", "--seed", "1").exit_code == 0
    first = {p: _sha(p) for p in out.rglob("*_t2.nii.gz")}
    assert run(*base, "--steps", "10", "--seed", "2").exit_code == 0
    report = _report(out)
    assert [c["status"] for c in report["cases"]] == ["done"] * 3
    reason = report["cases"][0]["reason"]
    assert reason.startswith("redone: settings changed:") and "seed 1 -> 2" in reason and "steps 5 -> 10" in reason
    assert all(_sha(p) != h for p, h in first.items())  # new outputs, not the old files kept
    assert run(*base, "--steps", "10", "--seed", "2").exit_code == 0
    assert [c["status"] for c in _report(out)["cases"]] == ["skipped"] * 3
    assert run(*base, "--steps", "10", "--seed", "2", "--intensity", "source").exit_code == 0
    assert "intensity" in _report(out)["cases"][0]["reason"]


def test_a_new_precision_variant_in_the_model_keeps_finished_cases(tiny_export, folder, tmp_path):
    """`aldm build --fp16` / `aldm calibrate` rewrite manifest.json; outputs made with unchanged
    components stay complete."""
    import shutil

    from aldm.runtime.manifest import ModelDir

    model = tmp_path / "model"
    shutil.copytree(tiny_export, model)
    out = tmp_path / "out"
    assert run("--batch", folder, "--out", out, "--model", model, *ARGS).exit_code == 0
    md = ModelDir(model)
    copies = {}
    for c, spec in md.manifest.components.items():
        copies[c] = spec.file.replace(".onnx", ".int8.onnx")
        shutil.copy(model / spec.file, model / copies[c])
    before = (model / "manifest.json").read_bytes()
    md.add_variant("int8", copies)
    assert (model / "manifest.json").read_bytes() != before
    assert run("--batch", folder, "--out", out, "--model", model, *ARGS).exit_code == 0
    assert [c["status"] for c in _report(out)["cases"]] == ["skipped"] * 3


def test_kill_9_at_random_points_then_rerun_is_the_uninterrupted_result(golden_export, tmp_path):
    """Six cases on the golden model, killed at five random moments in turn (each restart resumes
    the previous one), then run to the end: outputs bit-identical to an uninterrupted run, every
    case in the report once, the report readable after every kill."""
    src = tmp_path / "six"
    src.mkdir()
    for i in range(6):
        write_nifti(src / f"c{i}.nii.gz", synthetic_volume(shape=(48, 44, 24), seed=60 + i))

    def cmd(out):
        return [sys.executable, "-m", "aldm.cli.infer", "--batch", str(src), "--out", str(out), "--model",
                str(golden_export), "--targets", "t2,flair", "--steps", "10", "--seed", "5", "--quiet"]

    ref, out = tmp_path / "ref", tmp_path / "out"
    t0 = time.time()
    assert subprocess.run(cmd(ref), capture_output=True).returncode == 0
    duration = time.time() - t0
    rng = np.random.default_rng(15)
    killed_with_report = 0
    for k in range(5):
        proc = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(duration * (k + rng.uniform(0.2, 0.9)) / 5 + 0.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if (out / "aldm_report.json").exists():  # a kill -9 leaves a readable report
            killed_with_report += 1
            cases = _report(out)["cases"]
            assert len({c["id"] for c in cases}) == len(cases)
            for c in cases:
                if c["status"] == "done":
                    assert all(Path(p).is_file() for p in c["outputs"])
        for p in out.rglob("*.nii.gz"):
            if not p.name.startswith("."):
                assert _data(p).shape == (48, 44, 24)  # never a partial file under a final name
    assert killed_with_report >= 1
    res = subprocess.run(cmd(out), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    cases = _report(out)["cases"]
    assert sorted(c["id"] for c in cases) == [f"c{i}.nii.gz" for i in range(6)]
    refs = sorted(p.relative_to(ref) for p in ref.rglob("*.nii.gz"))
    assert refs == sorted(p.relative_to(out) for p in out.rglob("*.nii.gz")) and len(refs) == 12
    for rel in refs:
        assert _sha(out / rel) == _sha(ref / rel), rel
    assert not list(out.rglob(".*partial*"))


def test_a_second_ctrl_c_exits_at_once_with_a_report(tiny_export, eight_cases, tmp_path):
    out = tmp_path / "out"
    proc = _started_batch(tiny_export, eight_cases, out)
    proc.send_signal(signal.SIGINT)
    # An impatient user: Ctrl-C again every 20 ms until the process is gone, so some land in the
    # batch, some in the report writing and some in interpreter shutdown (joining threads), where
    # a KeyboardInterrupt would surface as a traceback (CI saw one once).
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    # 130 from aldm, or killed by SIGINT when the last one lands after Python has put the default
    # handler back at the very end of shutdown (what a shell reports as an interrupt, too).
    assert proc.returncode in (130, -signal.SIGINT), err
    assert "Traceback" not in err
    cases = _report(out)["cases"]
    assert any(c["status"] == "done" for c in cases)
    assert not list(out.rglob(".*partial*"))


def test_a_tar_gz_is_read_once_in_order(tiny_export, tmp_path, monkeypatch):
    """Discovery reads the member list once; the reader streams the archive once more, in order,
    however many cases it holds (it reopened it for every case before)."""
    archive = tmp_path / "many.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        for i in range(5):
            data = _nifti_bytes(tmp_path, synthetic_volume(seed=i), name=f"m{i}.nii.gz")
            info = tarfile.TarInfo(f"s{i}/t1.nii.gz")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    opened = []
    real_open = tarfile.open

    def counting_open(*a, **kw):
        opened.append(kw.get("mode", a[1] if len(a) > 1 else "r"))
        return real_open(*a, **kw)

    monkeypatch.setattr(tarfile, "open", counting_open)
    res = run("--batch", archive, "--out", tmp_path / "out", "--model", tiny_export, *ARGS)
    assert res.exit_code == 0, res.output
    assert len(opened) == 2, opened
    assert [c["status"] for c in _report(tmp_path / "out")["cases"]] == ["done"] * 5


class _FakeRay:
    """Just enough of Ray to drive run_ray in-process: actors run at submit time; a case named
    in `crash` raises as a dead worker does."""

    class ActorDied(Exception):
        pass

    def __init__(self, crash=(), stop_after=None, stop=None):
        self.crash, self.stop_after, self.stop, self.results, self.cancelled = set(crash), stop_after, stop, {}, []

    def is_initialized(self):
        return True

    def cluster_resources(self):
        return {"CPU": 2}

    def remote(self, **opts):
        fake = self
        self.opts = opts

        def wrap(cls):
            class Handle:
                def __init__(self, *args):
                    self.obj = cls(*args)
                    outer = self

                    class Method:
                        def remote(self, d, out):
                            ref = object()
                            if d["id"] in fake.crash:
                                fake.results[ref] = fake.ActorDied("The actor died unexpectedly")
                            else:
                                fake.results[ref] = outer.obj.run(d, out)
                            return ref
                    self.run = Method()

            class Factory:
                @staticmethod
                def remote(*args):
                    return Handle(*args)
            return Factory
        return wrap

    def wait(self, refs, num_returns=1, timeout=None):
        return [refs[0]], refs[1:]

    def get(self, ref):
        r = self.results.pop(ref)
        if isinstance(r, Exception):
            raise r
        if self.stop_after is not None:
            self.stop_after -= 1
            if self.stop_after == 0:
                self.stop.set()
        return r

    def cancel(self, ref, force=False):
        self.cancelled.append(ref)


def test_ray_a_dead_worker_fails_its_case_and_ctrl_c_stops_submitting(tiny_export, folder, tmp_path, monkeypatch):
    import threading

    from aldm import batch as B
    from aldm.batch_ray import run_ray
    from aldm.translator import Options

    cases = B.discover(folder)
    opts = dataclasses_asdict(Options(("t2",), steps=5, seed=7))
    fake = _FakeRay(crash={"site_a/sub1.nii.gz"})
    monkeypatch.setitem(sys.modules, "ray", fake)
    recs = run_ray(tiny_export, opts, folder, cases, tmp_path / "o1", workers=2, backend="ort-cpu")
    status = {r.id: (r.status, r.reason) for r in recs}
    assert status["site_a/sub1.nii.gz"] == ("failed", "worker died: ActorDied: The actor died unexpectedly")
    assert status["site_a/sub0.nii.gz"][0] == "done" and status["site_b/sub2.nii.gz"][0] == "done"
    assert fake.opts["max_restarts"] == 3 and fake.opts["max_task_retries"] == 1  # Ray's own retries
    stop = threading.Event()
    fake = _FakeRay(stop_after=1, stop=stop)
    monkeypatch.setitem(sys.modules, "ray", fake)
    recs = run_ray(tiny_export, opts, folder, cases, tmp_path / "o2", workers=1, backend="ort-cpu", stop=stop)
    assert [r.status for r in recs] == ["done", "interrupted", "interrupted"]


def dataclasses_asdict(o):
    import dataclasses

    return dataclasses.asdict(o) | {"out_dir": None}
