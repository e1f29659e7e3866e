"""Which series of a study is the source: by `--source-series` pattern, else by a documented rule.

The rule (README, "DICOM"): only MR image series of 3+ slices that are not localizers, scouts,
field maps, phase images or derived (aldm's own synthetic series included) are candidates. Each
candidate's contrast is read from its SeriesDescription and ProtocolName keywords; when they name
none, from its sequence parameters (TR, TE, TI, EPI). The source is the one candidate whose
keywords name `--source-modality`, else the one whose parameters read as it; none, or several,
is a failure that lists the candidates, never a guess.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from aldm.dicom.index import Series, Study
from aldm.errors import InputError

# keyword -> contrast, checked in this order (other contrasts first, FLAIR before T2, post-contrast
# T1 before T1); "other" (T2*, SWI, diffusion, perfusion, BOLD, PD, angiography) is never a source
KEYWORDS = (
    ("other", r"t2\*|t2.?star|\bswi\b|susc|\bdwi\b|diff|\badc\b|\btrace\b|perf|\bbold\b|fmri|"
              r"\bpd\b|proton|\btof\b|angio"),
    ("flair", r"flair|dark.?fluid|\btirm\b|t2.?fl\b"),
    ("t1ce", r"(t1|mprage|mp.rage|spgr|bravo|vibe|tfl).*(\+c\b|gd|gad|contrast|post|\bce\b|kont)|(\+c\b|gd|gad|post).*t1"),
    ("t1", r"\bt1|t1w|mprage|mp.rage|spgr|bravo|\btfl\b|fspgr|t1_|_t1"),
    ("t2", r"\bt2(?!\*|.?star)|t2w|t2_|_t2|\btse\b.*t2"),
)
EXCLUDE = re.compile(r"localizer|localiser|scout|survey|\bloc\b|3.?plane|calibration|\bcal\b|asset|refscan|"
                     r"field.?map|b0.?map|phase", re.I)


@dataclass
class Choice:
    series: Series
    reason: str  # why this series (sidecar and report)
    candidates: list[str]  # every candidate with its reading, for the record


def contrast(s: Series) -> tuple[str | None, str]:
    """(modality or None, why): keywords first, then sequence parameters."""
    text = f"{s.info.get('SeriesDescription') or ''} {s.info.get('ProtocolName') or ''}".lower()
    for mod, pattern in KEYWORDS:
        if re.search(pattern, text):
            what = "a contrast that is never a source" if mod == "other" else mod.upper()
            return mod, f"description/protocol '{text.strip()}' names {what}"
    seq = s.info.get("ScanningSequence") or ""
    seq = " ".join(seq) if isinstance(seq, list) else str(seq)
    tr, te, ti = (_num(s.info.get(k)) for k in ("RepetitionTime", "EchoTime", "InversionTime"))
    params = f"TR {tr} ms, TE {te} ms, TI {ti} ms, sequence {seq or '?'}"
    if "EP" in seq.split():
        return None, f"EPI ({params}): functional or diffusion, not a structural contrast"
    if tr is None or te is None:
        return None, "no contrast keyword and no TR/TE"
    agent = " with contrast agent" if s.info.get("ContrastBolusAgent") else ""
    if ti and ti >= 1500 and te >= 70:
        return "flair", f"{params}: long TI and TE read as FLAIR"
    if te >= 70 and tr >= 1500:
        return "t2", f"{params}: long TR and TE read as T2-weighted"
    if te <= 30 and (tr <= 1000 or (ti and 300 <= ti <= 1300 and tr <= 3000)):
        return ("t1ce" if agent else "t1"), f"{params}{agent}: short TE and TR (or IR-prepared) read as T1-weighted"
    return None, f"{params}: no clear contrast"


def _num(v) -> float | None:
    try:
        return None if v in (None, "") else float(v[0] if isinstance(v, list) else v)
    except (TypeError, ValueError):
        return None


def candidates(study: Study) -> tuple[list[Series], list[str]]:
    """(candidate series, why each other series was left out)."""
    keep, left = [], []
    for s in study.series:
        image_type = [str(t).upper() for t in (s.info.get("ImageType") or [])]
        text = f"{s.description} {s.info.get('ProtocolName') or ''}"
        if s.info.get("Modality") != "MR":
            left.append(f"{s.label()}: modality {s.info.get('Modality')}, not MR")
        elif "LOCALIZER" in image_type or EXCLUDE.search(text):
            left.append(f"{s.label()}: localizer, calibration or field map")
        elif {"P", "PHASE"} & set(image_type):
            left.append(f"{s.label()}: phase image")
        elif "DERIVED" in image_type:
            left.append(f"{s.label()}: derived image")
        elif len(s.files) < 3 and int(s.info.get("NumberOfFrames") or 1) < 3:
            left.append(f"{s.label()}: fewer than 3 slices")
        else:
            keep.append(s)
    return keep, left


def choose(study: Study, modality: str, pattern: str | None = None) -> Choice:
    """The study's source series; an InputError listing the candidates when none is clear."""
    if not study.series:
        raise InputError(f"study {study.uid} holds no DICOM image series"
                         + (f" ({len(study.nonimage)} non-image object(s))" if study.nonimage else ""))
    if pattern:
        hits = [s for s in study.series if _matches(s, pattern)]
        listing = "; ".join(s.label() for s in study.series)
        if len(hits) != 1:
            what = "no series matches" if not hits else f"{len(hits)} series match"
            raise InputError(f"{what} --source-series {pattern!r} in study {study.uid}: {listing}")
        return Choice(hits[0], f"SeriesDescription matches --source-series {pattern!r}", [listing])
    keep, left = candidates(study)
    readings = [(s, *contrast(s)) for s in keep]
    listing = [f"{s.label()}: {mod or 'unknown'} ({why})" for s, mod, why in readings] + left
    named = [(s, why) for s, mod, why in readings if mod == modality and why.startswith("description")]
    hits = named or [(s, why) for s, mod, why in readings if mod == modality]
    if len(hits) == 1:
        return Choice(hits[0][0], hits[0][1], listing)
    what = f"no clear {modality.upper()} series" if not hits else f"{len(hits)} series read as {modality.upper()}"
    raise InputError(f"{what} in study {study.uid}; pick one with --source-series. "
                     f"Series: {'; '.join(listing) or 'none'}")


def _matches(s: Series, pattern: str) -> bool:
    """Shell-style pattern (case-insensitive) on SeriesDescription; without wildcards, a substring.
    The series UID or number, given exactly, also matches."""
    desc, p = s.description.lower(), pattern.lower()
    if p == s.uid.lower() or p == str(s.info.get("SeriesNumber")):
        return True
    return fnmatch.fnmatchcase(desc, p) if any(c in p for c in "*?[") else p in desc
