"""Translate NIfTI files: load -> preprocess -> pipeline -> invert -> write in the source's space.

`Translator` is the one library object behind `aldm-infer`; the CLI only parses and prints.
Each output gets a JSON sidecar of provenance; outputs are written atomically (a temporary
name, then a rename), so a final name never holds a partial file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

import aldm
from aldm.atomic import write_text
from aldm.errors import AldmError, InputError, ModelError, UsageError
from aldm.nifti import MAX_VOXELS, Volume, is_nifti, load_volume, save_like, sidecar_path, stem
from aldm.preprocess import FINER_TOLERANCE, Prepared, invert, preprocess
from aldm.runtime.manifest import MANIFEST, STEP_GRAPH, sha256_file
from aldm.runtime.pipeline import Pipeline, Translation
from aldm.runtime.sampler import check_strength, ddim_timesteps
from aldm.skullcheck import coarse_slice_warning, skull_reason
from aldm.skullstrip import METHOD as SKULL_STRIP_METHOD

BRASYN = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
_MODALITY_SUFFIX = re.compile(r"[-_.](t1|t1ce|t2|flair|t1n|t1c|t2w|t2f)$", re.IGNORECASE)


def default_model_dir() -> Path:
    """The model bundled inside the package (shipped by the default-model work)."""
    path = Path(__file__).parent / "assets" / "default_model"
    if not (path / MANIFEST).is_file():
        raise ModelError("no default model is bundled with this version of aldm yet; "
                         "pass --model DIR (a folder written by `aldm export`)")
    return path


def output_names(source_name: str, targets, naming: str = "stem") -> dict[str, str]:
    """Output file name per target for a source file name (also what `aldm-infer --server`
    expects the server to write, to refuse existing outputs before uploading)."""
    s = stem(Path(source_name))
    if naming == "brasyn":
        case = _MODALITY_SUFFIX.sub("", s)
        return {t: f"{case}-{BRASYN[t]}.nii.gz" for t in targets}
    return {t: f"{s}_{t}.nii.gz" for t in targets}


def check_writable(paths: dict[str, Path], overwrite: bool = False) -> None:
    """Fail if outputs exist (without overwrite) or their folder is unwritable."""
    d = next(iter(paths.values())).parent
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".aldm-write-test-"):
            pass
    except OSError as exc:
        raise AldmError(f"output folder {d} is not writable ({exc.strerror or exc})") from None
    if not overwrite:
        existing = [p for p in paths.values() if p.exists()]
        if existing:
            raise AldmError(f"{existing[0]} exists; pass --overwrite to replace it")


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
    max_voxels: int = MAX_VOXELS  # sources whose header declares more are refused unread
    skull_check: bool = True  # refuse sources that do not look skull-stripped (see aldm.skullcheck)
    skull_strip: bool = False  # extract the brain first (ROBEX, extra `skullstrip`); writes the mask
    source_series: str | None = None  # DICOM: SeriesDescription pattern of the source series
    dicom_out: bool = False  # DICOM sources: also write a derived MR series per target


def check_options(options: Options, modalities=aldm.MODALITIES) -> None:
    """The UsageErrors a translation's options can be refused with before any model is loaded
    (`aldm-infer --server` checks them before uploading anything)."""
    mods = tuple(modalities)
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
    if not options.targets:
        raise UsageError("no target modality given")
    for t in options.targets:  # class indices (ints) are checked by Pipeline.classes
        if isinstance(t, str) and t.lower() not in mods:
            raise UsageError(f"unknown target {t!r}; choose from {', '.join(mods)}")


SEED_RULE = "seed*1000003+crc32(case id) mod 2^31"  # seed_for(); part of the settings digest


@dataclass
class CaseResult:
    source: Path
    outputs: dict[str, Path]
    sidecars: dict[str, Path]
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    preview: Path | None = None
    dicom: str = ""  # a DICOM source: which series, and why


class Translator:
    def __init__(self, pipeline: Pipeline, options: Options):
        check_options(options, pipeline.manifest.modalities)
        pipeline.classes(options.targets)  # validates the names
        if options.steps is not None:  # a count the model's schedule cannot be cut into
            ddim_timesteps(options.steps, pipeline.manifest.schedule.timesteps)
        self.pipeline, self.options = pipeline, options
        self.manifest_sha256 = sha256_file(pipeline.model.file(MANIFEST))
        self.settings = self._settings()
        self.settings_digest = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()

    def _settings(self) -> dict:
        """Everything that determines the output bytes, and nothing else: the component files
        actually run (not the whole manifest, so adding an engine or an INT8 copy to the model
        leaves finished cases finished), the manifest fields that change outputs, the resolved
        sampler settings, the seed rule, and how outputs are named and scaled."""
        m, o, model = self.pipeline.manifest, self.options, self.pipeline.model
        d = m.sampler
        components = {}
        for c, runner in self.pipeline.runners.items():
            if c == STEP_GRAPH and self.pipeline.step is None:  # in the folder, not run
                continue
            path = getattr(runner, "path", None)
            if path is not None and Path(path).name in m.files:
                components[c] = m.files[Path(path).name]
            elif path is not None and Path(path).is_file():
                components[c] = sha256_file(Path(path))
            else:  # a fallback chain: the exported graph it starts from, and its name
                components[c] = f"{m.files[model.component_file(c).name]}:{runner.name}"
        name = self.pipeline.backend
        return {
            "aldm_version": aldm.__version__,
            "components": components,
            "precision": name.split("/", 1)[1] if "/" in name else ("fp16" if name.startswith("trt") else "fp32"),
            "schedule_sha256": m.files.get(m.schedule.file),
            "schedule": dataclasses.asdict(m.schedule),
            "scale_factor": m.scale_factor,
            "latent_bounds": m.latent_bounds,
            "latent_shape": list(m.latent_shape),
            "modalities": list(m.modalities),
            "preprocessing": dataclasses.asdict(m.preprocessing),
            "finer_tolerance": o.finer_tolerance,
            "sampler": d.name,
            "steps": o.steps or d.steps,
            "eta": d.eta if o.eta is None else float(o.eta),
            "strength": d.strength if o.strength is None else float(o.strength),
            "seed": o.seed,  # None: a fresh random seed per case
            "seed_rule": SEED_RULE,
            "intensity": o.intensity,
            "naming": o.naming,
            "targets": list(o.targets),
            "source_modality": o.source_modality,
            "skull_strip": o.skull_strip and SKULL_STRIP_METHOD,
            "source_series": o.source_series,
            "dicom_out": o.dicom_out,
        }

    # ------------------------------------------------------------------------------ naming
    def output_dir(self, source: Path, out_dir: Path | None = None) -> Path:
        if out_dir is not None:
            return out_dir
        return self.options.out_dir if self.options.out_dir is not None else source.parent

    def output_paths(self, source: Path, out_dir: Path | None = None, name: str | None = None) -> dict[str, Path]:
        """Output file per target; `name` overrides the source's file name (archive members)."""
        d = self.output_dir(source, out_dir)
        names = output_names(name or source.name, self.options.targets, self.options.naming)
        return {t: d / n for t, n in names.items()}

    sidecar_path = staticmethod(sidecar_path)

    def check_writable(self, paths: dict[str, Path]) -> None:
        """Fail before any compute if outputs exist (without overwrite) or the folder is unwritable."""
        check_writable(paths, self.options.overwrite)

    def completeness(self, paths: dict[str, Path]) -> tuple[bool, str]:
        """(complete, why; "" when there is nothing yet): a case a rerun can skip has every output and sidecar, each sidecar
        made with this run's settings digest, each output's bytes the ones its sidecar hashed."""
        for path in paths.values():
            side = self.sidecar_path(path)
            if not (path.is_file() and side.is_file()):
                return False, "" if not path.exists() else "previous run unfinished"
            try:
                doc = json.loads(side.read_text())
                digest_ok = doc.get("settings_digest") == self.settings_digest
                bytes_ok = digest_ok and doc.get("output_sha256") == sha256_file(path)
            except (OSError, ValueError, AttributeError):
                return False, f"unreadable sidecar {side.name}"
            if not digest_ok:
                return False, "settings changed: " + self._changed(doc.get("settings"))
            if not bytes_ok:
                return False, f"{path.name} differs from the bytes its sidecar recorded"
            series = (doc.get("dicom_out") or {}).get("folder")
            if series and not (path.parent / series).is_dir():
                return False, f"DICOM series {series} missing"
        return True, "complete outputs with the same settings exist"

    def _changed(self, old) -> str:
        if not isinstance(old, dict):
            return "previous outputs carry no settings digest (older aldm)"
        keys = sorted(set(old) | set(self.settings))
        diff = [k for k in keys if json.dumps(old.get(k), sort_keys=True)
                != json.dumps(self.settings.get(k), sort_keys=True)]
        short = lambda v: json.dumps(v)[:40]  # noqa: E731
        return ", ".join(f"{k} {short(old.get(k))} -> {short(self.settings.get(k))}" for k in diff) or "digest"

    # ------------------------------------------------------------------------------ the job
    def seed_for(self, case_id: str) -> int:
        """A case's seed depends on --seed and the case alone, not on batch order or size."""
        if self.options.seed is None:
            return int(np.random.SeedSequence().entropy % 2**31)
        return (self.options.seed * 1_000_003 + zlib.crc32(case_id.encode())) % 2**31

    def load(self, source: Path) -> tuple[Volume, Prepared]:
        return self.prepare(load_volume(source, max_voxels=self.options.max_voxels))

    def load_dicom(self, chosen, where: Path, archive=None, index=None) -> tuple[Volume, Prepared]:
        """A DICOM series chosen from its study's headers (`aldm.dicom.source`), read and prepared;
        `archive`: the ArchiveReader its files are members of."""
        from aldm.dicom.source import load, local_files

        with local_files(chosen.series.files, archive) as files:
            vol = load(chosen, files, str(where), index, max_voxels=self.options.max_voxels)
        return self.prepare(vol)

    def prepare(self, vol: Volume) -> tuple[Volume, Prepared]:
        """Skull strip (optional), skull check, preprocess."""
        if self.options.skull_strip:
            from aldm.skullstrip import brain_mask

            try:
                vol.brain_mask = brain_mask(vol.data, vol.affine)
            except InputError as exc:
                raise InputError(f"{vol.path}: {exc}") from None
            vol.data = np.where(vol.brain_mask, vol.data, np.float32(0))
        if self.options.skull_check:
            why = skull_reason(vol.data)
            if why is not None:
                raise InputError(f"{vol.path}: {why}")
        pre = self.pipeline.manifest.preprocessing
        prep = preprocess(vol.data, vol.affine, pre, finer_tolerance=self.options.finer_tolerance)
        coarse = coarse_slice_warning(vol.affine, pre.spacing)
        if coarse is not None:
            prep.warnings.append(coarse)
        return vol, prep

    def compute(self, prep: Prepared, seed: int, *, callback=None, on_stage=None) -> Translation:
        return self.pipeline.translate(prep.x, list(self.options.targets), steps=self.options.steps,
                                       eta=self.options.eta, strength=self.options.strength, seed=seed, callback=callback, on_stage=on_stage)

    def write(self, vol: Volume, prep: Prepared, tr: Translation, paths: dict[str, Path], seed: int,
              timings: dict[str, float]) -> CaseResult:
        t0 = time.perf_counter()
        foreground = vol.data > 0
        outputs, sidecars, written_dirs, arrays = {}, {}, [], {}
        try:  # a case is written whole or not at all: a failure removes what this call wrote
            for target, path in paths.items():
                out = invert(tr.volumes[target][0, 0], prep.record, intensity=self.options.intensity)
                out = np.where(foreground, out, np.float32(0))
                arrays[target] = out
                outputs[target] = save_like(vol, out, path, f"aldm {target} from {vol.path.name}")
            series = {}
            if self.options.dicom_out and vol.dicom is not None:  # a derived series per target
                from aldm.dicom.write import write_derived

                for target, path in paths.items():
                    folder, uid = write_derived(arrays[target], vol.dicom, path.parent / f"{stem(path)}_dicom", target=target,
                                                aldm_version=aldm.__version__, model_sha256=self.manifest_sha256,
                                                overwrite=self.options.overwrite)
                    series[target] = {"folder": folder.name, "series_instance_uid": uid}
                    written_dirs.append(folder)
            if vol.brain_mask is not None:  # --skull-strip: the mask the outputs were cut with
                d = next(iter(paths.values())).parent
                outputs["brainmask"] = save_like(vol, vol.brain_mask.astype(np.float32),
                                                 d / f"{stem(Path(vol.path.name))}_brainmask.nii.gz",
                                                 f"aldm brain mask ({SKULL_STRIP_METHOD})")
            timings = dict(timings) | {"write": time.perf_counter() - t0}
            timings["total"] = sum(v for k, v in timings.items() if k != "total")
            for t, p in outputs.items():
                if t != "brainmask":
                    sidecars[t] = self._write_sidecar(p, vol, t, seed, tr, prep, timings, series.get(t))
        except BaseException:
            import shutil

            for p in list(outputs.values()) + list(sidecars.values()):
                p.unlink(missing_ok=True)
            for d in written_dirs:
                shutil.rmtree(d, ignore_errors=True)
            raise
        for t, d in zip(series, written_dirs):
            outputs[f"{t}_dicom"] = d
        preview_path = None
        if self.options.preview:
            from aldm.preview import label, preview

            views = {f"{label(self.options.source_modality)} (source)": prep.x[0, 0]}
            views |= {t: v[0, 0] for t, v in tr.volumes.items()}
            first = next(iter(outputs.values()))
            preview_path = preview(first.parent / f"{stem(vol.path)}_preview.png", views,
                                   title=f"{vol.path.name}: aldm synthetic, not for diagnosis")
        return CaseResult(vol.path, outputs, sidecars, timings, prep.warnings, preview_path,
                          vol.dicom.summary() if vol.dicom is not None else "")

    def run(self, source: str | Path, *, callback=None,
            on_stage: Callable[[str], None] | None = None, case_id: str | None = None) -> CaseResult:
        """One source, start to finish. `case_id` (default: the file name) keys the seed, as a
        batch keys it by the case's path inside its input."""
        source = Path(source)
        if not source.exists():
            raise InputError(f"{source}: no such file")
        dicom = None
        if not is_nifti(source):
            from aldm.dicom.index import looks_dicom

            dicom = looks_dicom(source)
        t0 = time.perf_counter()
        if dicom:  # a series folder, a study, a .dcm file or an archive of them: one series is chosen
            from aldm.batch import ARCHIVES, ArchiveReader
            from aldm.dicom.source import open_input

            index, chosen = open_input(source, self.options.source_modality, self.options.source_series)
            paths = self.output_paths(source, name=chosen.series.name())
            self.check_writable(paths)
            archive = ArchiveReader(source) if source.name.lower().endswith(ARCHIVES) else None
            try:
                vol, prep = self.load_dicom(chosen, source, archive, index)
            finally:
                if archive is not None:
                    archive.close()
        else:
            paths = self.output_paths(source)
            self.check_writable(paths)
            vol, prep = self.load(source)
        t_load = time.perf_counter() - t0
        seed = self.seed_for(case_id or source.name)
        tr = self.compute(prep, seed, callback=callback, on_stage=on_stage)
        return self.write(vol, prep, tr, paths, seed, {"load_preprocess": t_load, **tr.timings})

    def _write_sidecar(self, output: Path, vol: Volume, target: str, seed: int, tr, prep, timings,
                       series: dict | None = None) -> Path:
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
            "settings_digest": self.settings_digest,
            "settings": self.settings,
        }
        if vol.dicom is not None:
            doc["dicom_source"] = vol.dicom.record()
        if series:
            doc["dicom_out"] = series
        return write_text(self.sidecar_path(output), json.dumps(doc, indent=1))
