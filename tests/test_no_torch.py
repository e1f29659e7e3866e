"""The inference path needs no torch: a translation through aldm.runtime never imports it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_TORCH = """
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _Block())
"""


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    script = BLOCK_TORCH + textwrap.dedent(code) + """
leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
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
