"""Translate NIfTI files: load -> preprocess -> pipeline -> invert -> write in the source's space.

`Translator` is the one library object behind `aldm-infer`; the CLI only parses and prints.
Each output gets a JSON sidecar of provenance; outputs are written atomically (a temporary
name, then a rename), so a final name never holds a partial file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

import aldm
from aldm.errors import AldmError, ModelError, UsageError
from aldm.nifti import Volume, load_volume, save_like, stem
from aldm.preprocess import FINER_TOLERANCE, Prepared, invert, preprocess
from aldm.runtime.manifest import MANIFEST, sha256_file
from aldm.runtime.pipeline import Pipeline, Translation
from aldm.runtime.sampler import check_strength

BRASYN = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
_MODALITY_SUFFIX = re.compile(r"[-_.](t1|t1ce|t2|flair|t1n|t1c|t2w|t2f)$", re.IGNORECASE)


def default_model_dir() -> Path:
    """The model bundled inside the package (shipped by the default-model work)."""
    path = Path(__file__).parent / "assets" / "default_model"
    if not (path / MANIFEST).is_file():
        raise ModelError("no default model is bundled with this version of aldm yet; "
                         "pass --model DIR (a folder written by `aldm export`)")
    return path


@dataclass(frozen=True)
class Options:
    targets: tuple[str, ...]
    out_dir: Path | None = None  # None: next to each source
    steps: int | None = None  # None: the manifest's default
    eta: float | None = None
    seed: int | None = None  # None: a fresh seed per case, recorded in the sidecar
    source_modality: str = "t1"
    naming: str = "stem"  # stem: <stem>_<target>.nii.gz; brasyn: <ID>-<t1n|t1c|t2w|t2f>.nii.gz
    intensity: str = "unit"  # unit: [0, 1]; source: the source's 0.5-99.5 percentile range
    overwrite: bool = False
    preview: bool = False
    finer_tolerance: float = FINER_TOLERANCE
    strength: float | None = None  # None: the manifest's default


@dataclass
class CaseResult:
    source: Path
    outputs: dict[str, Path]
    sidecars: dict[str, Path]
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    preview: Path | None = None


class Translator:
    def __init__(self, pipeline: Pipeline, options: Options):
        mods = pipeline.manifest.modalities
        if options.source_modality not in mods:
            raise UsageError(f"unknown source modality {options.source_modality!r}; "
                             f"choose from {', '.join(mods)}")
        if options.source_modality in options.targets:
            raise UsageError(f"target {options.source_modality} is the source modality; "
                             "it is already there")
        if options.naming not in ("stem", "brasyn"):
            raise UsageError(f"--naming must be stem or brasyn, not {options.naming!r}")
        if options.intensity not in ("unit", "source"):
            raise UsageError(f"--intensity must be unit or source, not {options.intensity!r}")
        if options.strength is not None:
            check_strength(options.strength, "--strength")
        pipeline.classes(options.targets)  # validates the names
        self.pipeline, self.options = pipeline, options
        self.manifest_sha256 = sha256_file(pipeline.model.file(MANIFEST))

    # ------------------------------------------------------------------------------ naming
    def output_dir(self, source: Path, out_dir: Path | None = None) -> Path:
        if out_dir is not None:
            return out_dir
        return self.options.out_dir if self.options.out_dir is not None else source.parent

    def output_paths(self, source: Path, out_dir: Path | None = None, name: str | None = None) -> dict[str, Path]:
        """Output file per target; `name` overrides the source's file name (archive members)."""
        d, s = self.output_dir(source, out_dir), stem(Path(name or source.name))
        if self.options.naming == "brasyn":
            case = _MODALITY_SUFFIX.sub("", s)
            return {t: d / f"{case}-{BRASYN[t]}.nii.gz" for t in self.options.targets}
        return {t: d / f"{s}_{t}.nii.gz" for t in self.options.targets}

    @staticmethod
    def sidecar_path(output: Path) -> Path:
        return output.with_name(stem(output) + ".json")

    def check_writable(self, paths: dict[str, Path]) -> None:
        """Fail before any compute if outputs exist (without overwrite) or the folder is unwritable."""
        d = next(iter(paths.values())).parent
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=d, prefix=".aldm-write-test-"):
                pass
        except OSError as exc:
            raise AldmError(f"output folder {d} is not writable ({exc.strerror or exc})") from None
        if not self.options.overwrite:
            existing = [p for p in paths.values() if p.exists()]
            if existing:
                raise AldmError(f"{existing[0]} exists; pass --overwrite to replace it")

    def is_complete(self, paths: dict[str, Path]) -> bool:
        """Every output and sidecar present, the sidecar made by this model, the output's bytes
        the ones the sidecar hashed: a case a rerun can skip."""
        for path in paths.values():
            side = self.sidecar_path(path)
            try:
                doc = json.loads(side.read_text())
                ok = (doc.get("manifest_sha256") == self.manifest_sha256
                      and doc.get("output_sha256") == sha256_file(path))
            except (OSError, ValueError):
                return False
            if not ok:
                return False
        return True

    # ------------------------------------------------------------------------------ the job
    def seed_for(self, case_id: str) -> int:
        """A case's seed depends on --seed and the case alone, not on batch order or size."""
        if self.options.seed is None:
            return int(np.random.SeedSequence().entropy % 2**31)
        return (self.options.seed * 1_000_003 + zlib.crc32(case_id.encode())) % 2**31

    def load(self, source: Path) -> tuple[Volume, Prepared]:
        vol = load_volume(source)
        prep = preprocess(vol.data, vol.affine, self.pipeline.manifest.preprocessing,
                          finer_tolerance=self.options.finer_tolerance)
        return vol, prep

    def compute(self, prep: Prepared, seed: int, *, callback=None, on_stage=None) -> Translation:
        return self.pipeline.translate(prep.x, list(self.options.targets), steps=self.options.steps,
                                       eta=self.options.eta, strength=self.options.strength, seed=seed, callback=callback, on_stage=on_stage)

    def write(self, vol: Volume, prep: Prepared, tr: Translation, paths: dict[str, Path], seed: int,
              timings: dict[str, float]) -> CaseResult:
        t0 = time.perf_counter()
        foreground = vol.data > 0
        outputs = {}
        for target, path in paths.items():
            out = invert(tr.volumes[target][0, 0], prep.record, intensity=self.options.intensity)
            out = np.where(foreground, out, np.float32(0))
            outputs[target] = save_like(vol, out, path, f"aldm {target} from {vol.path.name}")
        timings = dict(timings) | {"write": time.perf_counter() - t0}
        timings["total"] = sum(v for k, v in timings.items() if k != "total")
        sidecars = {t: self._write_sidecar(p, vol, t, seed, tr, prep, timings) for t, p in outputs.items()}
        preview_path = None
        if self.options.preview:
            from aldm.preview import preview

            views = {"source": prep.x[0, 0]} | {t: v[0, 0] for t, v in tr.volumes.items()}
            first = next(iter(outputs.values()))
            preview_path = preview(first.parent / f"{stem(vol.path)}_preview.png", views)
        return CaseResult(vol.path, outputs, sidecars, timings, prep.warnings, preview_path)

    def run(self, source: str | Path, *, callback=None,
            on_stage: Callable[[str], None] | None = None) -> CaseResult:
        """One source, start to finish."""
        source = Path(source)
        paths = self.output_paths(source)
        self.check_writable(paths)
        t0 = time.perf_counter()
        vol, prep = self.load(source)
        t_load = time.perf_counter() - t0
        seed = self.seed_for(source.name)
        tr = self.compute(prep, seed, callback=callback, on_stage=on_stage)
        return self.write(vol, prep, tr, paths, seed, {"load_preprocess": t_load, **tr.timings})

    def _write_sidecar(self, output: Path, vol: Volume, target: str, seed: int, tr, prep, timings) -> Path:
        m = self.pipeline.manifest
        doc = {
            "aldm_version": aldm.__version__,
            "source": str(vol.path.resolve()),
            "source_modality": self.options.source_modality,
            "target": target,
            "output": output.name,
            "output_sha256": sha256_file(output),
            "model": str(self.pipeline.model.path.resolve()),
            "manifest_sha256": self.manifest_sha256,
            "backend": self.pipeline.backend,
            "sampler": m.sampler.name,
            "steps": tr.steps,
            "eta": tr.eta,
            "strength": tr.strength,
            "seed": seed,
            "intensity": self.options.intensity,
            "timings_s": {k: round(v, 4) for k, v in timings.items()},
            "preprocessing": prep.record,
            "warnings": prep.warnings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        path = self.sidecar_path(output)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)
        return path
