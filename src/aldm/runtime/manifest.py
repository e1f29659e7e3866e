"""The exported model folder: ONNX graphs + `manifest.json` (+ `schedule.npz`), read without torch.

The manifest is the single source of truth for everything downstream (run, check, bench,
build, calibrate): component I/O specs, latent shape and scale, modality order,
preprocessing, noise schedule, default sampler settings, sha256 of every file, tool versions.

Every file a manifest names (its `files`, each component's file, the schedule file, every variant
file) must be a plain file name inside the folder, listed with its sha256 in `files`, and not a
symbolic link: checked whenever a ModelDir opens, before anything is hashed or opened.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np

from aldm.atomic import write_text
from aldm.errors import ModelError

FORMAT = "aldm-model"
# 2: decoder_tiling (the decoder cut for slab-wise decoding), spade_per_class
# 3: the decoder cut's graphs take and give slabs as (rows, W, D, C) blocks (TILE_LAYOUT)
# 4: an optional component STEP_GRAPH, one whole DDIM step (UNet + update) per call
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)  # 1 and 2 decode whole volumes (2's cut, channels first, is not used)
TILE_LAYOUT = "HWDC"  # rows outermost, channels innermost
MANIFEST = "manifest.json"
SCHEDULE_FILE = "schedule.npz"
COMPONENTS = ("encoder", "spade", "unet", "decoder")  # every folder has these four
# The sampler-step graph: inputs x_t, t, c_concat, y (the UNet's), coef (4,) float32 (a row of
# aldm.runtime.sampler.ddim_coefficients) and noise (like x_t); output x_prev, the update in FP32.
# Folders before format 4 have none and sample with the numpy loop.
STEP_GRAPH = "unet_step"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # "batch" marks the dynamic axis
    dtype: str  # numpy dtype name: float32, int64

    def check(self, array: np.ndarray, component: str) -> None:
        """Raise InputError unless `array` has this spec's dtype and (static) shape."""
        from aldm.errors import InputError

        if not isinstance(array, np.ndarray):
            raise InputError(f"{component}.{self.name}: expected a numpy array, got {type(array).__name__}")
        if array.dtype != np.dtype(self.dtype):
            raise InputError(f"{component}.{self.name}: dtype {array.dtype}, expected {self.dtype}")
        ok = len(array.shape) == len(self.shape) and all(
            isinstance(s, str) or s == a for s, a in zip(self.shape, array.shape))
        if not ok:
            want = "x".join(str(s) for s in self.shape)
            raise InputError(f"{component}.{self.name}: shape {'x'.join(map(str, array.shape))}, expected {want}")

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if isinstance(s, str) else s for s in self.shape)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class Preprocessing:
    crop_size: tuple[int, int, int] = (144, 192, 144)  # model grid, RAS voxel axes
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # mm
    orientation: str = "RAS"
    percentiles: tuple[float, float] = (0.5, 99.5)  # mapped to intensity_range, unclipped
    intensity_range: tuple[float, float] = (-1.0, 1.0)


@dataclass(frozen=True)
class ScheduleSpec:
    timesteps: int = 1000
    beta_schedule: str = "linear"
    linear_start: float = 0.0015
    linear_end: float = 0.0195
    parameterization: str = "eps"
    file: str = SCHEDULE_FILE  # the twelve float32 buffers, as the checkpoint had them


@dataclass(frozen=True)
class SamplerDefaults:
    name: str = "ddim"
    steps: int = 200
    eta: float = 1.0
    strength: float = 1.0  # < 1: start from the SPADE latent noised to the step round(strength*steps)


@dataclass(frozen=True)
class Manifest:
    components: dict[str, ComponentSpec]
    latent_shape: tuple[int, int, int, int]  # (C, h, w, d)
    files: dict[str, str]  # file name -> sha256 (every file of the folder but the manifest)
    modalities: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
    scale_factor: float = 1.0
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    sampler: SamplerDefaults = field(default_factory=SamplerDefaults)
    config: dict[str, Any] = field(default_factory=dict)  # LDMConfig.to_dict() of the source model
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint path and sha256
    tools: dict[str, str] = field(default_factory=dict)
    variants: dict[str, dict[str, str]] = field(default_factory=dict)  # precision -> component -> file
    # (lows, highs) per latent channel: the codebook's range. When set, the MS-SPADE output is
    # clamped to it (every real target latent is a codebook vector, so clamping cannot move a
    # coordinate away from it); None: unclamped, as the official code runs.
    latent_bounds: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    # The decoder cut for slab-wise decoding (aldm.export.tiled): head file, slab axis and the
    # full-resolution steps (kind, file, input/output buffer names, channels, groups, eps).
    decoder_tiling: dict[str, Any] | None = None
    # MS-SPADE graphs for one class each (index = class), input z only: FP32 CPU backends run the
    # one a target needs. None: only the all-class graph.
    spade_per_class: tuple[str, ...] | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        if d.get("format") != FORMAT:
            raise ModelError(f"not an aldm model manifest (format {d.get('format')!r})")
        version = d.get("format_version")
        if version not in READABLE_VERSIONS:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise ModelError(f"manifest format version {version} is not supported by this aldm (reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))}); "
                             + ("upgrade aldm" if newer else "re-export the model with `aldm export`"))
        def tensors(items):
            return tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in items)
        comps = {k: ComponentSpec(v["name"], v["file"], tensors(v["inputs"]), tensors(v["outputs"]))
                 for k, v in d["components"].items()}
        return cls(
            components=comps, latent_shape=tuple(d["latent_shape"]), files=dict(d["files"]),
            modalities=tuple(d["modalities"]), scale_factor=float(d["scale_factor"]),
            preprocessing=Preprocessing(**_tuples(d["preprocessing"])),
            schedule=ScheduleSpec(**d["schedule"]), sampler=SamplerDefaults(**d["sampler"]),
            config=d.get("config", {}), source=d.get("source", {}), tools=d.get("tools", {}),
            variants={k: dict(v) for k, v in d.get("variants", {}).items()},
            latent_bounds=_bounds(d.get("latent_bounds"), d["latent_shape"][0]),
            decoder_tiling=_tiling(d.get("decoder_tiling")) if version >= 3 else None,
            spade_per_class=_per_class(d.get("spade_per_class"), len(d["modalities"])),
            format_version=version,
        )


def sample_feeds(spec: ComponentSpec, batch: int = 2, seed: int = 0, num_classes: int = 4,
                  timesteps: int = 1000) -> dict[str, np.ndarray]:
    """Seeded inputs that fit a component spec (volumes in [-1, 1], latents ~N(0,1))."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in spec.inputs:
        shape = t.concrete(batch)
        if t.name == "t":
            feeds[t.name] = rng.integers(0, timesteps, shape).astype(np.int64)
        elif t.name == "y":
            feeds[t.name] = ((np.arange(batch) + 2) % num_classes).astype(np.int64)
        elif t.name == "x":
            feeds[t.name] = rng.uniform(-1, 1, shape).astype(np.float32)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _bounds(b: Any, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    if b is None:
        return None
    try:
        lo, hi = (tuple(float(x) for x in row) for row in b)
    except (TypeError, ValueError):
        lo = hi = ()
    if len(lo) != channels or len(hi) != channels or any(a > c for a, c in zip(lo, hi)):
        raise ModelError(f"manifest latent_bounds must be two rows of {channels} numbers, lows <= highs")
    return lo, hi


def _per_class(files: Any, classes: int) -> tuple[str, ...] | None:
    if files is None:
        return None
    if not isinstance(files, list) or len(files) != classes:
        raise ModelError(f"manifest spade_per_class must list one file per class ({classes})")
    return tuple(files)


TILE_KINDS = ("up_stats", "up_conv", "conv", "conv_res", "out")


def _tiling(t: Any) -> dict[str, Any] | None:
    """The decoder_tiling entry, its shape checked (names and file checks come with the folder's)."""
    if t is None:
        return None
    try:
        ok = (isinstance(t["head"], str) and t["axis"] == 0 and t.get("layout") == TILE_LAYOUT
              and isinstance(t["steps"], list) and t["steps"]
              and all(st["kind"] in TILE_KINDS and isinstance(st["file"], str) for st in t["steps"])
              and t["steps"][0]["kind"] == "up_stats" and t["steps"][-1]["kind"] == "out")
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise ModelError(f"manifest decoder_tiling is malformed (head, axis 0, layout {TILE_LAYOUT}, "
                         f"steps from 'up_stats' to 'out')")
    return t


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def unsafe_name(name: Any) -> str | None:
    """Why `name` is not a plain file name inside a folder, or None if it is one."""
    if not isinstance(name, str):
        return f"not a string ({type(name).__name__})"
    if not name:
        return "empty"
    if "/" in name or "\\" in name:
        return "a path, not a file name"
    if ".." in name:
        return "contains '..'"
    if name == "." or "\x00" in name or Path(name).is_absolute() or PureWindowsPath(name).drive:
        return "not a plain file name"
    return None


def named_files(m: Manifest) -> list[tuple[str, Any]]:
    """(where in the manifest, file name) for every file the manifest names."""
    out: list[tuple[str, Any]] = [("files", f) for f in m.files]
    out += [(f"components.{k}.file", c.file) for k, c in m.components.items()]
    out.append(("schedule.file", m.schedule.file))
    out += [(f"variants.{p}.{k}", f) for p, v in m.variants.items() for k, f in v.items()]
    out += [(f"spade_per_class.{k}", f) for k, f in enumerate(m.spade_per_class or ())]
    if m.decoder_tiling:
        out.append(("decoder_tiling.head", m.decoder_tiling["head"]))
        out += [(f"decoder_tiling.steps.{i}.file", st["file"]) for i, st in enumerate(m.decoder_tiling["steps"])]
    return out


def check_names(folder: Path, m: Manifest) -> None:
    """Raise ModelError unless every file the manifest names is a plain file name inside `folder`,
    hashed in `files`, and not a symbolic link. Opens and hashes nothing."""
    mpath = folder / MANIFEST
    for where, name in named_files(m):
        why = unsafe_name(name)
        if why is not None:
            raise ModelError(f"{mpath}: {where} names {name!r}, which is {why}; a model folder lists "
                             f"only plain file names inside it")
        if name not in m.files:
            raise ModelError(f"{mpath}: {where} names {name!r}, which is not hashed in the manifest's files")
    for name in m.files:
        if (folder / name).is_symlink():
            raise ModelError(f"{folder / name}: is a symbolic link; a model folder holds its files "
                             f"itself ({name!r} must be a regular file)")


class ModelDir:
    """An exported model folder, opened and (by default) verified against its manifest hashes."""

    def __init__(self, path: str | Path, *, verify: bool = True):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise ModelError(f"{self.path} is not an aldm model folder (no {MANIFEST})")
        try:
            self.manifest = Manifest.from_dict(json.loads(mpath.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{mpath}: unreadable manifest ({exc})") from None
        missing = [c for c in COMPONENTS if c not in self.manifest.components]
        if missing:
            raise ModelError(f"{mpath}: no component {', '.join(missing)}")
        extra = set(self.manifest.components) - set(COMPONENTS) - (
            {STEP_GRAPH} if self.manifest.format_version >= 4 else set())
        if extra:
            raise ModelError(f"{mpath}: unknown component {', '.join(sorted(extra))} "
                             f"(format {self.manifest.format_version})")
        check_names(self.path, self.manifest)  # before anything is hashed or opened
        if verify:
            self.verify()

    def verify(self) -> None:
        """Raise ModelError if any file is missing or its sha256 differs from the manifest (the names
        were checked when the folder opened)."""
        for name, digest in self.manifest.files.items():
            path = self.path / name
            if not path.is_file():
                raise ModelError(f"{self.path}: missing file {name}")
            if sha256_file(path) != digest:
                raise ModelError(f"{path}: sha256 does not match the manifest (corrupted or replaced)")

    def file(self, name: str) -> Path:
        """The path of a file of the folder; `name` must be a plain file name."""
        why = unsafe_name(name)
        if why is not None:
            raise ModelError(f"{self.path}: {name!r} is {why}; a model folder holds only plain file names")
        return self.path / name

    def component(self, name: str) -> ComponentSpec:
        return self.manifest.components[name]

    @property
    def has_step_graph(self) -> bool:
        """Whether the folder has the sampler-step graph (format 4 and later, optional)."""
        return STEP_GRAPH in self.manifest.components

    @property
    def precisions(self) -> list[str]:
        return ["fp32"] + sorted(self.manifest.variants)

    def component_file(self, name: str, precision: str = "fp32") -> Path:
        """The ONNX file of a component at a precision (fp32: the exported graph)."""
        if precision == "fp32":
            return self.file(self.component(name).file)
        files = self.manifest.variants.get(precision)
        if not files or name not in files:
            hint = {"fp16": " (`aldm build --fp16` writes the FP16 copy)",
                    "int8": " (`aldm calibrate` writes the INT8 copy)"}.get(precision, "")
            raise ModelError(f"{self.path} has no {precision} {name}; available: {', '.join(self.precisions)}{hint}")
        return self.file(files[name])

    def add_variant(self, precision: str, files: dict[str, str]) -> None:
        """Register files written into the folder as a precision variant; rewrite the manifest
        (atomically: a crash leaves the old manifest or the new one)."""
        m = self.manifest
        for name in files.values():  # plain names, no links: refused before anything is hashed
            if self.file(name).is_symlink():
                raise ModelError(f"{self.file(name)}: is a symbolic link; a model folder holds its files itself")
        variants = dict(m.variants) | {precision: dict(files)}
        used = {c.file for c in m.components.values()} | {m.schedule.file}
        used |= {f for v in variants.values() for f in v.values()}
        stale = [f for f in m.variants.get(precision, {}).values() if f not in used]
        hashes = {f: h for f, h in m.files.items() if f not in stale}
        hashes |= {f: sha256_file(self.file(f)) for f in files.values()}
        new = dataclasses.replace(m, files=hashes, variants=variants)
        check_names(self.path, new)
        write_text(self.file(MANIFEST), new.to_json())
        self.manifest = new
        for f in stale:  # a replaced variant's files no longer belong to the model
            self.file(f).unlink(missing_ok=True)

    def schedule(self) -> dict[str, np.ndarray]:
        """The twelve float32 schedule buffers."""
        try:
            with np.load(self.file(self.manifest.schedule.file)) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise ModelError(f"{self.path}: unreadable schedule ({exc})") from None
