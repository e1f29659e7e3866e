"""The inference path needs no torch and no onnx: a translation through aldm.runtime, and
aldm-infer itself, never import them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_TORCH = """
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ("torch", "onnx") or name.startswith(("torch.", "onnx.")):
            raise ImportError(name.split(".")[0] + " is blocked in this test")
sys.meta_path.insert(0, _Block())
"""


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    script = BLOCK_TORCH + textwrap.dedent(code) + """
leaked = sorted(m for m in sys.modules if m in ("torch", "onnx") or m.startswith(("torch.", "onnx.")))
assert not leaked, leaked
print("NO-TORCH-OK")
"""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_translation_never_imports_torch(tiny_export):
    res = run_without_torch(f"""
        import numpy as np
        import aldm
        from aldm.runtime.pipeline import Pipeline
        p = Pipeline.load({str(tiny_export)!r})
        x = np.random.default_rng(0).uniform(-1, 1, (1, 1, 32, 32, 16)).astype(np.float32)
        tr = p.translate(x, ["t2", "flair"], steps=5, seed=0)
        assert set(tr.volumes) == {{"t2", "flair"}}
        assert all(np.isfinite(v).all() for v in tr.volumes.values())
    """)
    assert "NO-TORCH-OK" in res.stdout, res.stderr[-2000:]


def test_the_block_really_blocks():
    res = run_without_torch("import torch")
    assert res.returncode != 0 and "torch is blocked" in res.stderr


def test_aldm_infer_runs_without_torch_and_onnx(tiny_export, tmp_path):
    """The command a user runs, in a process where neither torch nor onnx can be imported."""
    from conftest import synthetic_volume, write_nifti

    src = tmp_path / "s.nii.gz"
    write_nifti(src, synthetic_volume(shape=(40, 36, 20), seed=1))
    res = run_without_torch(f"""
        import sys
        from aldm.cli.infer import app
        try:
            app([{str(src)!r}, "--model", {str(tiny_export)!r}, "--targets", "t2", "--steps", "2",
                 "--out", {str(tmp_path / "o")!r}, "-q"], standalone_mode=False)
        except SystemExit as e:
            assert not e.code, e.code
    """)
    assert "NO-TORCH-OK" in res.stdout, res.stderr[-2000:]
    assert (tmp_path / "o" / "s_t2.nii.gz").is_file()


def test_the_block_also_blocks_onnx_but_not_onnxruntime():
    res = run_without_torch("import onnxruntime\nimport onnx")
    assert res.returncode != 0 and "onnx is blocked" in res.stderr
