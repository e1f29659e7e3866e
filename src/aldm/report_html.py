"""The batch report people look at: `aldm_report.html`, one self-contained page beside the JSON/CSV.

No network, scripts or fonts from elsewhere (a Content-Security-Policy says so to the browser):
thumbnails are small JPEGs in the sibling folder `aldm_report_files/`, one per case, made once as
the case finishes (a rerun's skipped cases keep theirs) and written atomically like the page.
The page holds the run's summary, the failures first (reason and source), then one row per case
with its thumbnail, warnings, timings and links to the outputs and sidecars; a few lines of
inline script sort the table and filter it by status.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from aldm.atomic import write_bytes, write_text
from aldm.errors import describe
from aldm.nifti import load_volume, sidecar_path, stem
from aldm.preview import label
from aldm.skullcheck import skull_reason
from aldm.thumbnails import thumbnail_bytes

HTML = "aldm_report.html"
FILES = "aldm_report_files"
STATUSES = ("failed", "interrupted", "done", "skipped")
SETTINGS_SHOWN = ("sampler", "steps", "eta", "strength", "seed", "targets", "source_modality",
                  "intensity", "naming", "precision", "skull_strip")


@dataclass
class CaseView:
    """What the page shows of one finished case beyond its Record (read once, when it finishes)."""

    thumbnail: str = ""  # relative to the report's folder; "" when none could be made
    note: str = ""  # why there is no thumbnail or no source column
    files: list[tuple[str, str, str]] = field(default_factory=list)  # (target, output, sidecar), relative
    warnings: list[str] = field(default_factory=list)
    run: dict = field(default_factory=dict)  # backend, model and settings, from its first sidecar


def thumbnail_name(case_id: str) -> str:
    """A stable, safe file name per case (a rerun finds the thumbnail of its first run)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", case_id)[-60:].strip("._-")
    return f"{FILES}/{slug}-{zlib.crc32(case_id.encode()):08x}.jpg"


def _rel(path: Path, out: Path) -> str:
    return os.path.relpath(path, out)


def _sidecar(output: Path) -> dict:
    try:
        doc = json.loads(sidecar_path(output).read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def case_view(out: Path, rec, *, fresh: bool, lock=contextlib.nullcontext(),
              closed: Callable[[], bool] = lambda: False) -> CaseView:
    """The view of a done or skipped case; makes its thumbnail when `fresh` (new outputs) or when
    none exists yet, writing it under `lock` unless `closed()`. Never raises for a thumbnail: the
    reason goes in `note`."""
    view, targets = CaseView(), {}
    for o in map(Path, rec.outputs):
        doc = _sidecar(o)
        if not doc:  # e.g. the --skull-strip brain mask: a file to link, not a translation
            view.files.append((stem(o).rsplit("_", 1)[-1], _rel(o, out), ""))
            continue
        targets[doc.get("target", stem(o))] = o
        view.files.append((doc.get("target", ""), _rel(o, out), _rel(sidecar_path(o), out)))
        view.warnings += [w for w in doc.get("warnings", []) if w not in view.warnings]
        if not view.run:
            view.run = {k: doc.get(k) for k in ("backend", "manifest_sha256", "aldm_version", "model")}
            view.run["settings"] = doc.get("settings") or {}
            view.run["source"] = doc.get("source")
    source = _local_source(getattr(rec, "source", "") or view.run.get("source") or "")
    thumb = out / thumbnail_name(rec.id)
    if thumb.is_file() and not fresh:
        view.thumbnail = _rel(thumb, out)
        return view
    if not targets:
        view.note = "no outputs with sidecars to show"
        return view
    if source is None:
        view.note = "source not shown (inside an archive, or no longer there)"
    try:
        modality = (view.run.get("settings") or {}).get("source_modality") or "t1"
        vols = {}
        if source is not None:
            v = load_volume(source)
            vols[f"{label(modality)} (source)"] = (v.data, v.affine)
            why = skull_reason(v.data)  # only possible with --no-skull-check
            if why:
                view.warnings.append(f"skull check: {why}")
        for t, p in targets.items():
            v = load_volume(p)
            vols[label(t)] = (v.data, v.affine)
        data = thumbnail_bytes(vols)
        with lock:
            if not closed():
                thumb.parent.mkdir(parents=True, exist_ok=True)
                write_bytes(thumb, data)
                view.thumbnail = _rel(thumb, out)
    except Exception as exc:  # a report problem is never the batch's: say it on the page
        view.note = f"no preview: {describe(exc)}"
    return view


def _local_source(s: str) -> Path | None:
    p = Path(s) if s and "!/" not in s else None
    return p if p is not None and p.is_file() else None


# ------------------------------------------------------------------------------ the page

def _h(v) -> str:
    return html.escape(str(v), quote=True)


def _link(rel: str, text: str) -> str:
    return f'<a href="{_h(quote(rel))}">{_h(text)}</a>' if rel else ""


def _summary(summary: dict, run: dict) -> str:
    m = summary.get("mean_s_per_case") or {}
    s = run.get("settings") or {}
    rows = [
        ("cases", f"{summary.get('cases', 0)}: {summary.get('done', 0)} done, {summary.get('skipped', 0)} skipped, "
                  f"{summary.get('failed', 0)} failed, {summary.get('interrupted', 0)} interrupted"),
        ("state", "finished" if summary.get("finished") else "in progress or stopped (rewritten as each case finishes)"),
        ("cases per hour", summary.get("cases_per_hour")),
        ("wall time", f"{summary.get('wall_s')} s ({summary.get('wall_s_per_case')} s per done case)"),
        ("mean per case", f"read {m.get('read')} s, compute {m.get('compute')} s, write {m.get('write')} s"),
        ("backend", run.get("backend") or "-"),
        ("model", f"manifest sha256 {str(run.get('manifest_sha256') or '-')[:16]} ({run.get('model') or '-'})"),
        ("aldm version", run.get("aldm_version") or "-"),
        ("settings", ", ".join(f"{k} {json.dumps(s[k])}" for k in SETTINGS_SHOWN if k in s) or "-"),
    ]
    return "<table class=summary>" + "".join(f"<tr><th>{_h(k)}</th><td>{_h(v)}</td></tr>" for k, v in rows) + "</table>"


def _failures(records, sources: dict) -> str:
    bad = [r for r in records if r.status == "failed"]
    if not bad:
        return "<h2 id=failures>Failures: none</h2>"
    items = "".join(f"<li><b>{_h(r.id)}</b>: {_h(r.reason)}{_source(r.id, sources.get(r.id, ''))}</li>"
                    for r in bad)
    return f"<h2 id=failures>Failures: {len(bad)}</h2><ol class=failures>{items}</ol>"


def _source(case_id: str, source: str) -> str:
    return f"<br><code>{_h(source)}</code>" if source and source != case_id else ""


def _row(r, view: CaseView | None, source: str) -> str:
    view = view or CaseView()
    img = (f'<img src="{_h(quote(view.thumbnail))}" loading=lazy alt="preview of {_h(r.id)}">'
           if view.thumbnail else "")
    files = "<br>".join(f"{_link(o, t or 'output')} {_link(sc, 'sidecar')}" for t, o, sc in view.files)
    warn = "".join(f"<li>{_h(w)}</li>" for w in view.warnings)
    total = r.read_s + r.compute_s + r.write_s
    return (f'<tr class="{_h(r.status)}" data-status="{_h(r.status)}" data-id="{_h(r.id)}" data-total="{total:.3f}">'
            f"<td><b>{_h(r.id)}</b>{_source(r.id, source)}</td>"
            f"<td><span class=st>{_h(r.status)}</span><br>{_h(r.reason)}</td>"
            f"<td>{img}<br>{_h(view.note)}</td><td><ul>{warn}</ul></td>"
            f"<td class=t>read {r.read_s:.1f} s<br>compute {r.compute_s:.1f} s<br>write {r.write_s:.1f} s</td>"
            f"<td>{files}</td></tr>")


STYLE = """body{font:14px sans-serif;margin:1em;background:#fff;color:#111}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px;vertical-align:top;text-align:left}code{font-size:12px;word-break:break-all}
table.summary th{background:#eee}.failed .st,.failures b{color:#b00}.interrupted .st{color:#a60}
.done .st{color:#070}.skipped .st{color:#057}img{display:block;width:262px;height:auto;background:#000}
td.t{white-space:nowrap}th[data-key]{cursor:pointer;background:#eee}ul{margin:0;padding-left:1.2em}button.on{font-weight:bold}"""

# Sort by a column (click its head) and filter by status (buttons): plain DOM, no framework.
SCRIPT = """const tb=document.querySelector('#cases tbody');
function show(s){for(const r of tb.rows)r.hidden=s!=='all'&&r.dataset.status!==s;
for(const b of document.querySelectorAll('button[data-s]'))b.className=b.dataset.s===s?'on':'';}
for(const b of document.querySelectorAll('button[data-s]'))b.onclick=()=>show(b.dataset.s);
for(const th of document.querySelectorAll('th[data-key]'))th.onclick=()=>{const k=th.dataset.key,
num=k==='total',d=th.dataset.dir=th.dataset.dir==='1'?'-1':'1';const rows=[...tb.rows].sort((a,b)=>
(num?a.dataset[k]-b.dataset[k]:a.dataset[k].localeCompare(b.dataset[k]))*d);tb.append(...rows);};"""


def render(title: str, records, views: dict, summary: dict, sources: dict) -> str:
    """The whole page as a string (failures first, then one row per case, in batch order)."""
    run = next((v.run for v in views.values() if v.run), {})
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    buttons = f'<button data-s=all class=on>all {len(records)}</button>' + "".join(
        f"<button data-s={s}>{s} {n}</button>" for s, n in counts.items() if n)
    rows = "".join(_row(r, views.get(r.id), sources.get(r.id, "")) for r in records)
    csp = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><meta http-equiv="Content-Security-Policy" content="{csp}">
<link rel=icon href="data:,"><title>{_h(title)}</title><style>{STYLE}</style></head><body>
<h1>{_h(title)}</h1><p>aldm synthetic images, not for diagnosis. Report files: <a href="aldm_report.json">JSON</a>,
<a href="aldm_report.csv">CSV</a>.</p>
{_summary(summary, run)}
{_failures(records, sources)}
<h2>Cases</h2><p>Show: {buttons} (click a column head to sort)</p>
<table id=cases><thead><tr><th data-key=id>case</th><th data-key=status>status</th><th>preview</th>
<th>warnings</th><th data-key=total>timings</th><th>files</th></tr></thead><tbody>
{rows}
</tbody></table><script>{SCRIPT}</script></body></html>
"""


def write_html(out: Path, records, views: dict, summary: dict) -> Path:
    """Write `out/aldm_report.html` atomically (each record's `source`: where it was read from)."""
    sources = {r.id: getattr(r, "source", "") for r in records}
    page = render(f"aldm batch report: {out.resolve()}", records, views, summary, sources)
    return write_text(out / HTML, page)


def rebuild(out: Path, *, refresh: bool = False) -> tuple[Path, int, int]:
    """(page, cases, thumbnails) from `out/aldm_report.json` and the outputs and sidecars it names
    (a local batch, a Ray or `--server` one): thumbnails a folder already has are kept unless
    `refresh`."""
    from aldm.batch import Record
    from aldm.errors import UsageError

    report = out / "aldm_report.json"
    try:
        doc = json.loads(report.read_text())
        known = set(Record.__dataclass_fields__)
        records = [Record(**{k: v for k, v in c.items() if k in known}) for c in doc["cases"]]
        summary = dict(doc["summary"])
    except FileNotFoundError:
        raise UsageError(f"{report}: no such file (is {out} a batch output folder?)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{report}: not an aldm batch report ({describe(exc)})") from None
    views = {r.id: case_view(out, r, fresh=refresh) for r in records if r.status in ("done", "skipped")}
    page = write_html(out, records, views, summary)
    return page, len(records), sum(bool(v.thumbnail) for v in views.values())
