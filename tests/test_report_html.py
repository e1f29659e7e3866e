"""The batch's HTML report: failures first, labelled thumbnails on one grid, a page a real headless
browser loads with no console error and no network request, small and fast at 1 000 cases, whole
after a `kill -9`, kept by a rerun and rebuilt by `aldm report`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aldm.batch import Record, summarise
from aldm.nifti import load_volume
from aldm.report_html import FILES, HTML, CaseView, thumbnail_name, write_html
from aldm.thumbnails import MARGIN, PX, case_thumbnail, small_volumes
from conftest import DATA, REPO, need, synthetic_volume, write_cases, write_nifti
from test_client import nifti, server  # noqa: F401 - fixtures: the fake `aldm serve`

INFER = [sys.executable, "-m", "aldm.cli.infer"]
ALDM = [sys.executable, "-m", "aldm.cli.main"]
TINY = ["--targets", "t2", "--steps", "5", "--seed", "7", "--quiet"]
CHROMIUM = Path(os.environ.get("ALDM_CHROMIUM", "/usr/bin/chromium"))
# Flags that keep a headless Chromium off the (closed) network: no updater, sync, QUIC probes.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def rows(page: str) -> dict[str, dict]:
    """case id -> {status, thumbnail (or None)} from the report page."""
    out = {}
    for m in re.finditer(r'<tr class="[^"]*" data-status="([^"]+)" data-id="([^"]+)"[^>]*>(.*?)</tr>', page, re.S):
        img = re.search(r'<img src="([^"]+)"', m.group(3))
        out[m.group(2)] = {"status": m.group(1), "thumbnail": img and img.group(1)}
    return out


def failures(page: str) -> str:
    m = re.search(r"<h2 id=failures>.*?(?=<h2>)", page, re.S)
    return m.group(0) if m else ""


# ------------------------------------------------------------------------------ the browser

@pytest.fixture(scope="module")
def browser():
    """Chromium from Debian's packages driven by Playwright over the DevTools protocol: Playwright
    reports console messages, page errors and every request as events (a hand-written CDP client
    would have to re-implement that), and `executable_path` uses the system Chromium, so no
    browser download. `.ci/run` installs both."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found (apt-get install -y chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' (playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, path: Path, screenshot: Path | None = None):
    """(page, console errors, requested URLs, seconds to the load event)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
    page.on("request", lambda r: requests.append(r.url))
    t0 = time.perf_counter()
    page.goto(path.resolve().as_uri(), wait_until="load")
    load_s = time.perf_counter() - t0
    if screenshot is not None:
        page.screenshot(path=str(screenshot), full_page=True)
    return page, errors, requests, load_s


# ------------------------------------------------------------------------------ thumbnails

def test_thumbnail_volumes_are_ras_on_square_pixels_and_one_grid(tmp_path):
    """An LPS-stored source with 2 mm slices: each column is turned to RAS, cropped to the source's
    foreground and sampled on square pixels by the same indices (a marker voxel lands at its RAS
    position in every column); the sheet is a labelled JPEG."""
    src = synthetic_volume(shape=(40, 36, 20)).astype(np.float32)
    i, j, k = 24, 12, 13
    src[i, j, k] = 5000.0
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])  # LPS, 1 x 1 x 2 mm
    small = small_volumes({"source": (src, affine), "t2": (src * 0.5, affine)})
    a, b = small.values()
    np.testing.assert_array_equal(b, a * 0.5)  # one grid: the same samples in every column
    fg = np.argwhere(src > 0)
    lo, hi = fg.min(0), fg.max(0)
    box = np.array([hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]]) + 1 + 2 * MARGIN  # voxels
    mm = box * [1, 1, 2]
    assert max(a.shape) == PX
    np.testing.assert_allclose(np.array(a.shape) / PX, mm / mm.max(), atol=1.5 / PX)  # square pixels
    step = mm.max() / PX
    ras_marker = np.array([39 - i - (39 - hi[0] - MARGIN), 35 - j - (35 - hi[1] - MARGIN), k - (lo[2] - MARGIN)])
    found = (np.array(np.unravel_index(np.argmax(a), a.shape)) + 0.5) * step / [1, 1, 2]
    assert np.abs(found - (ras_marker + 0.5)).max() <= 0.5 + step, (found, ras_marker)
    thumb = case_thumbnail(tmp_path / "t.jpg", {"T1 (source)": (src, affine), "T2": (src * 0.5, affine)})
    with Image.open(thumb) as im:
        assert im.format == "JPEG"
        img = np.asarray(im.convert("L")).astype(int)
    side, gap = PX, 2
    left, top = img.shape[1] - 2 * (side + gap), img.shape[0] - 3 * (side + gap)
    assert (img[:top, left:] > 100).any() and (img[top:, :left] > 100).any()  # column and row labels
    assert not list(tmp_path.glob(".*partial*"))


# ------------------------------------------------------------------------------ real cases

@pytest.fixture(scope="module")
def real_batch(tmp_path_factory):
    """A folder with the bundled IXI example, 3 BraTS T1s from ../shared and 2 bad files, through
    the CLI with the bundled model (strength 0: no diffusion steps, the MS-SPADE translation decoded)."""
    brats = [need(DATA / "brats18" / c / f"{c}_t1.nii.gz")
             for c in ("Brats18_TCIA01_499_1", "Brats18_TCIA02_606_1", "Brats18_TCIA10_639_1")]
    d = tmp_path_factory.mktemp("real") / "scans"
    d.mkdir()
    example = REPO / "examples" / "IXI002-Guys-0828-T1.nii.gz"
    for src in (example, *brats):
        shutil.copy(src, d / src.name)
    (d / "broken.nii.gz").write_bytes(b"this is not a nifti file")
    (d / "truncated.nii.gz").write_bytes(example.read_bytes()[:50_000])
    out = d.parent / "out"
    res = subprocess.run([*INFER, "--batch", str(d), "--out", str(out), "--targets", "t2,flair",
                          "--strength", "0", "--seed", "1", "--quiet"], capture_output=True, text=True)
    assert res.returncode == 3, res.stderr
    return out, [example.name, *(b.name for b in brats)], d


def test_real_batch_lists_failures_first_and_labelled_previews(real_batch):
    out, good, d = real_batch
    page = (out / HTML).read_text()
    fail = failures(page)
    assert "Failures: 2" in fail
    assert re.search(r"<b>broken.nii.gz</b>: [^<]*not a readable NIfTI", fail)
    assert re.search(r"<b>truncated.nii.gz</b>: [^<]*corrupt or truncated", fail)
    assert f"<code>{d / 'broken.nii.gz'}</code>" in fail and f"<code>{d / 'truncated.nii.gz'}</code>" in fail
    assert page.index("id=failures") < page.index("id=cases")
    got = rows(page)
    assert sorted(k for k, r in got.items() if r["status"] == "done") == sorted(good)
    assert sorted(k for k, r in got.items() if r["status"] == "failed") == ["broken.nii.gz", "truncated.nii.gz"]
    for name in good:
        thumb = got[name]["thumbnail"]
        assert thumb and (out / thumb).is_file()
        with Image.open(out / thumb) as im:
            img = np.asarray(im.convert("L")).astype(int)
        side, gap = PX, 2
        left, top = img.shape[1] - 3 * (side + gap), img.shape[0] - 3 * (side + gap)
        assert left > 0 and (img[:top, left:] > 100).any()  # three labelled columns
        cols = [img[top:, left + c * (side + gap):][:, :side] for c in range(3)]
        for c in cols:
            assert (c > 30).mean() > 0.15  # a brain in each of source, T2 and FLAIR
        assert np.corrcoef(cols[0].ravel(), cols[1].ravel())[0, 1] < 0.95  # a new contrast, not a copy
    for f in ("IXI002-Guys-0828-T1_t2.nii.gz", "IXI002-Guys-0828-T1_flair.json"):
        assert f'href="{f}"' in page  # links to the outputs and sidecars, relative
    assert re.search(r"backend</th><td>(ov-cpu|ort-cpu)", page)
    assert "cases per hour" in page and "strength 0.0" in page


def test_real_report_loads_offline_in_chromium(real_batch, browser, tmp_path):
    out, good, _ = real_batch
    shot = tmp_path / "report.png"
    page, errors, requests, _ = open_page(browser, out / HTML, screenshot=shot)
    assert errors == []
    assert requests and all(u.startswith("file://") for u in requests), requests
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # thumbnails load lazily
    page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)", timeout=5000)
    assert page.evaluate("document.images.length") == len(good)
    page.click("button[data-s=failed]")
    assert page.evaluate("[...document.querySelectorAll('#cases tbody tr')].filter(r => !r.hidden).length") == 2
    page.click("button[data-s=all]")
    page.click("th[data-key=status]")
    assert page.evaluate("document.querySelector('#cases tbody tr').dataset.status") == "done"
    with Image.open(shot) as im:
        assert im.size[0] == 1280 and im.size[1] > 900
    if os.environ.get("ALDM_REPORT_SCREENSHOT"):  # how docs/batch-report.png was made
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=os.environ["ALDM_REPORT_SCREENSHOT"], full_page=True)
    page.close()


# ------------------------------------------------------------------------------ scale

def test_a_1000_case_report_is_small_and_opens_fast(browser, tmp_path):
    """Records without volumes; every case has its own thumbnail file (one 3-column sheet of the
    bundled IXI T1, copied), so the size counted is what 1 000 real cases would weigh."""
    out = tmp_path / "big"
    (out / FILES).mkdir(parents=True)
    t1 = load_volume(REPO / "examples" / "IXI002-Guys-0828-T1.nii.gz")
    fg = t1.data > 0
    sample = case_thumbnail(tmp_path / "one.jpg", {  # a real brain; two made-up contrasts of it
        "T1 (source)": (t1.data, t1.affine), "T2": (np.where(fg, t1.data.max() - t1.data, 0), t1.affine),
        "FLAIR": (np.sqrt(t1.data), t1.affine)})
    statuses = ["done"] * 900 + ["skipped"] * 60 + ["failed"] * 30 + ["interrupted"] * 10
    records, views = [], {}
    for i, st in enumerate(statuses):
        rec = Record(f"site{i % 7}/sub-{i:04d}/anat/sub-{i:04d}_T1w.nii.gz", st,
                     "reader error: not a readable NIfTI" if st == "failed" else "", read_s=0.5,
                     compute_s=40.0 + i % 13, write_s=1.2, source=f"/archive/site{i % 7}/sub-{i:04d}_T1w.nii.gz")
        rec.outputs = [f"{out}/site{i % 7}/sub-{i:04d}_T1w_{t}.nii.gz" for t in ("t2", "flair")] if st in ("done", "skipped") else []
        records.append(rec)
        if rec.outputs:
            shutil.copy(sample, out / thumbnail_name(rec.id))
            views[rec.id] = CaseView(thumbnail_name(rec.id), "",
                                     [(t, os.path.relpath(o, out), os.path.relpath(o, out)[:-7] + ".json")
                                      for t, o in zip(("t2", "flair"), rec.outputs)],
                                     ["cropped foreground: 2.1 % of the brain outside the model's grid"] * (i % 50 == 0))
    write_html(out, records, views, summarise(records, 3600.0) | {"finished": True})
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    page, errors, requests, load_s = open_page(browser, out / HTML)
    n_rows = page.evaluate("document.querySelectorAll('#cases tbody tr').length")
    page.close()
    print(f"1000-case report: {size / 2**20:.1f} MiB (page {(out / HTML).stat().st_size / 2**20:.2f} MiB), "
          f"load event after {load_s:.2f} s")
    assert n_rows == 1000 and errors == []
    assert all(u.startswith("file://") for u in requests)
    assert size < 30 * 2**20
    assert load_s < 5.0


# ------------------------------------------------------------------------------ kill -9, rerun, aldm report

@pytest.fixture()
def six_cases(tmp_path):
    return write_cases(tmp_path / "six", 6, seed=40)


def test_kill_9_leaves_a_page_listing_every_finished_case(tiny_export, six_cases, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([*INFER, "--batch", str(six_cases), "--out", str(out), "--model", str(tiny_export),
                             *TINY, "--steps", "20"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.rglob("*_t2.json"))) < 2:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    report = json.loads((out / "aldm_report.json").read_text())
    done = {c["id"] for c in report["cases"] if c["status"] == "done"}
    assert 1 <= len(done) < 6, "the batch was not killed mid-way"
    page = (out / HTML).read_text()
    assert page.endswith("</html>\n")  # whole: pages are only ever renamed into place
    got = rows(page)
    assert done <= {k for k, r in got.items() if r["status"] == "done"}  # the page has what the JSON has
    shown = [got[case]["thumbnail"] for case in done if got[case]["thumbnail"]]
    assert len(shown) >= len(done) - 1  # only the case finishing at the kill may still lack its thumbnail
    for thumb in shown:
        with Image.open(out / thumb) as im:
            im.load()  # whole: written atomically before the page names it


def test_rerun_keeps_previews_and_aldm_report_rebuilds_the_page(tiny_export, six_cases, tmp_path):
    out = tmp_path / "out"
    first = subprocess.run([*INFER, "--batch", str(six_cases), "--out", str(out), "--model", str(tiny_export), *TINY],
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    before = rows((out / HTML).read_text())
    thumbs = {k: (out / r["thumbnail"]).stat().st_mtime_ns for k, r in before.items()}
    assert len(thumbs) == 6
    again = subprocess.run([*INFER, "--batch", str(six_cases), "--out", str(out), "--model", str(tiny_export), *TINY],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    after = rows((out / HTML).read_text())
    assert {r["status"] for r in after.values()} == {"skipped"}
    assert {k: r["thumbnail"] for k, r in after.items()} == {k: r["thumbnail"] for k, r in before.items()}
    assert {k: (out / r["thumbnail"]).stat().st_mtime_ns for k, r in after.items()} == thumbs  # not remade

    (out / HTML).unlink()
    shutil.rmtree(out / FILES)
    res = subprocess.run([*ALDM, "report", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == f"report: {out / HTML} (6 cases, 6 with previews)"
    rebuilt = rows((out / HTML).read_text())
    assert {k: r["thumbnail"] for k, r in rebuilt.items()} == {k: r["thumbnail"] for k, r in before.items()}
    for r in rebuilt.values():
        with Image.open(out / r["thumbnail"]) as im:
            assert im.format == "JPEG" and im.size[0] > 2 * 96
    made = {k: (out / r["thumbnail"]).stat().st_mtime_ns for k, r in rebuilt.items()}
    res = subprocess.run([*ALDM, "report", str(out), "--refresh"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert all((out / r["thumbnail"]).stat().st_mtime_ns > made[k] for k, r in rebuilt.items())  # remade


def test_case_warnings_reach_its_row(tiny_export, tmp_path):
    """Thick slices and the model crop (from the sidecars), and a source that fails the skull check
    (translated with --no-skull-check), are said in the case's row."""
    d = tmp_path / "in"
    d.mkdir()
    write_nifti(d / "thick.nii.gz", synthetic_volume(shape=(40, 36, 12)), affine=np.diag([1.0, 1.0, 5.0, 1.0]))
    write_nifti(d / "skull.nii.gz", 100 + synthetic_volume())  # every voxel non-zero
    out = tmp_path / "out"
    res = subprocess.run([*INFER, "--batch", str(d), "--out", str(out), "--model", str(tiny_export), *TINY,
                          "--no-skull-check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    page = (out / HTML).read_text()

    def row(case):
        return re.search(rf'data-id="{case}".*?</tr>', page, re.S).group(0)

    assert "slices are 5 mm apart (model: 1 mm)" in row("thick.nii.gz")
    assert "model crop cut off" in row("thick.nii.gz")
    assert "skull check: looks like a scan with skull (100 % of the field of view" in row("skull.nii.gz")
    assert "skull check" not in row("thick.nii.gz")


def test_aldm_report_on_a_folder_without_a_report_is_one_line(tmp_path):
    res = subprocess.run([*ALDM, "report", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: {tmp_path / 'aldm_report.json'}: no such file (is {tmp_path} a batch output folder?)"
    (tmp_path / "aldm_report.json").write_text("{not json")
    res = subprocess.run([*ALDM, "report", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and "not an aldm batch report" in res.stderr and "Traceback" not in res.stderr


def test_a_server_batch_has_the_page_and_aldm_report_rebuilds_it(server, tmp_path):
    """`--server` (the fake aldm serve of test_client): the same page, thumbnails from the local
    sources and the downloaded outputs; `aldm report` remakes it from the folder alone."""
    inp = tmp_path / "in"
    inp.mkdir()
    for i, name in enumerate(("a.nii.gz", "b.nii.gz", "c.nii.gz")):
        write_nifti(inp / name, synthetic_volume(seed=i))
    server.failures["c.nii.gz"] = "c.nii.gz: every voxel is 0"
    out = tmp_path / "out"
    res = subprocess.run([*INFER, "--batch", str(inp), "--server", server.url, "--targets", "t2", "--out", str(out),
                          "--seed", "7", "--quiet"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr
    page = (out / HTML).read_text()
    assert "<b>c.nii.gz</b>: c.nii.gz: every voxel is 0" in failures(page)
    got = rows(page)
    assert {k: r["status"] for k, r in got.items()} == {"a.nii.gz": "done", "b.nii.gz": "done", "c.nii.gz": "failed"}
    first = {k: (out / r["thumbnail"]).read_bytes() for k, r in got.items() if r["thumbnail"]}
    assert set(first) == {"a.nii.gz", "b.nii.gz"} and first["a.nii.gz"] != first["b.nii.gz"]  # own sources
    (out / HTML).unlink()
    shutil.rmtree(out / FILES)
    res = subprocess.run([*ALDM, "report", str(out)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr.strip() == f"report: {out / HTML} (3 cases, 2 with previews)"
    again = rows((out / HTML).read_text())
    assert {k: (out / r["thumbnail"]).read_bytes() for k, r in again.items() if r["thumbnail"]} == first
