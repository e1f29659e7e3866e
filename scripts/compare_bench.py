#!/usr/bin/env python3
"""Compare two `aldm bench --json` files: old (A) against new (B).

    python scripts/compare_bench.py A.json B.json

Prints, per component and per end-to-end run, the old and new median seconds, the speed-up
(old seconds / new seconds: above 1 means B is faster), GFLOP/s of both, and the peak RSS
figures side by side (engine path, one translation in a fresh process, torch eager). Figures a
file does not have (older JSON, a run without --torch) show as '-'. Exit 0; 2 when a file
cannot be read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def num(v, spec: str, width: int) -> str:
    return "-".rjust(width) if v is None else format(v, f"{width}{spec}")


def speedup(old, new) -> str:
    return "-".rjust(8) if not old or not new else f"{old / new:7.2f}x"


def describe(r: dict) -> str:
    meta = r.get("meta") or {}
    commit = (meta.get("git_commit") or "")[:10] or "no commit"
    vers = ", ".join(f"{k} {v}" for k, v in (meta.get("backend_versions") or {}).items()
                     if k in ("onnxruntime", "openvino", "tensorrt"))
    resolved = r.get("backend_resolved")
    backend = r.get("backend", "?") + (f" ({resolved})" if resolved and resolved != r.get("backend") else "")
    tiles = r.get("tile_rows")
    parts = [f"backend {backend}" + (f", decoder in slabs of {tiles} rows" if tiles else ""), f"precision {r.get('precision', '?')}",
             f"threads {r.get('threads') or 'default'}", f"crop {r.get('crop_size')}", f"aldm {meta.get('aldm', '?')} ({commit})"]
    if vers:
        parts.append(vers)
    if meta.get("cpu"):
        parts.append(f"{meta['cpu']} x{meta.get('cpu_count')}")
    if meta.get("date"):
        parts.append(meta["date"])
    return ", ".join(parts)


def e2e_label(key: str) -> str:
    return "end to end, " + key.replace("_", " ").replace("1 targets", "1 target")


def fresh_rss(v: dict) -> float | None:
    f = v.get("fresh_process") or {}
    return v.get("peak_rss_mb") if v.get("peak_rss_mb") is not None else f.get("peak_rss_mb")


def compare(a: dict, b: dict) -> str:
    lines = [f"A (old): {describe(a)}", f"B (new): {describe(b)}", ""]
    lines.append(f"{'':<24} {'A s':>9} {'B s':>9} {'speed-up':>8} {'A GFLOP/s':>10} {'B GFLOP/s':>10}")
    for section, seconds, fmt, label in (("components", "median_s", ".3f", str),
                                         ("end_to_end", "seconds_per_volume", ".2f", e2e_label)):
        sa, sb = a.get(section, {}), b.get(section, {})
        for k in list(sa) + [k for k in sb if k not in sa]:
            va, vb = sa.get(k, {}), sb.get(k, {})
            ta, tb = va.get(seconds), vb.get(seconds)
            lines.append(f"{label(k):<24} {num(ta, fmt, 9)} {num(tb, fmt, 9)} {speedup(ta, tb)} "
                         f"{num(va.get('gflop_per_s'), '.4g', 10)} {num(vb.get('gflop_per_s'), '.4g', 10)}")
            if section == "end_to_end" and (va.get("steps") != vb.get("steps")
                                            or va.get("unet_calls") != vb.get("unet_calls")):
                lines.append(f"{'':<24} (steps / UNet calls differ: A {va.get('steps')}/{va.get('unet_calls')}, "
                             f"B {vb.get('steps')}/{vb.get('unet_calls')})")
    ta, tb = a.get("torch_eager") or {}, b.get("torch_eager") or {}
    if ta.get("components") or tb.get("components"):
        lines.append("")
        lines.append(f"{'torch eager (reference)':<24} {'A s':>9} {'B s':>9} {'A ratio':>8} {'B ratio':>10}")
        ra, rb = a.get("ratio_ort_over_torch") or {}, b.get("ratio_ort_over_torch") or {}
        tca, tcb = ta.get("components", {}), tb.get("components", {})
        for c in list(tca) + [c for c in tcb if c not in tca]:
            lines.append(f"{c:<24} {num(tca.get(c, {}).get('median_s'), '.3f', 9)} "
                         f"{num(tcb.get(c, {}).get('median_s'), '.3f', 9)} {num(ra.get(c), '.2f', 8)} "
                         f"{num(rb.get(c), '.2f', 10)}")
    lines.append("")
    lines.append(f"{'peak RSS, MB':<40} {'A':>9} {'B':>9}")
    lines.append(f"{'engine path (bench process)':<40} {num(a.get('peak_rss_mb'), '.0f', 9)} "
                 f"{num(b.get('peak_rss_mb'), '.0f', 9)}")
    ea, eb = a.get("end_to_end", {}), b.get("end_to_end", {})
    for k in list(ea) + [k for k in eb if k not in ea]:
        ra_, rb_ = fresh_rss(ea.get(k, {})), fresh_rss(eb.get(k, {}))
        if ra_ is not None or rb_ is not None:
            label = f"fresh process, {k.replace('_', ' ')}"
            lines.append(f"{label:<40} {num(ra_, '.0f', 9)} {num(rb_, '.0f', 9)}")
    if ta or tb:
        lines.append(f"{'torch eager process':<40} {num(ta.get('peak_rss_mb'), '.0f', 9)} "
                     f"{num(tb.get('peak_rss_mb'), '.0f', 9)}")
    lines.append("")
    lines.append("speed-up = A seconds / B seconds (above 1: B is faster); ratio = engine / torch eager")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        a, b = (json.loads(Path(p).read_text()) for p in argv)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(compare(a, b))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
