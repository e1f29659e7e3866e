"""What an exported graph carries besides the computation."""

from pathlib import Path

import onnx

import aldm
from aldm.export.onnx_export import DEBUG_KEYS


def test_exported_graphs_hold_no_build_paths(tiny_export):
    """No stack traces with the exporting checkout's paths; the name scopes stay for the precision passes."""
    checkout = str(Path(aldm.__file__).resolve().parents[2]).encode()
    for f in sorted(tiny_export.glob("*.onnx")):
        data = f.read_bytes()
        assert checkout not in data and b'File "' not in data, f.name
        keys = {p.key for n in onnx.load(str(f)).graph.node for p in n.metadata_props}
        assert "pkg.torch.onnx.name_scopes" in keys and not keys & set(DEBUG_KEYS), f.name
