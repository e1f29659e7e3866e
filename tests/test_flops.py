"""FLOPs counted from ONNX graphs (aldm.runtime.flops). Convention: 1 multiply-accumulate = 2 FLOPs,
only Conv / ConvTranspose / MatMul / Gemm counted, batch 1 — the convention of
../shared/reference/FLOPs.md (torch's FlopCounterMode)."""

from __future__ import annotations

import json
import os
import re
from math import prod

import pytest

from conftest import REPO, SHARED, need

onnx = pytest.importorskip("onnx")

from aldm.runtime.flops import graph_flops  # noqa: E402

COMPONENTS = ("encoder", "spade", "unet", "decoder")
REFERENCE_FLOPS = SHARED / "reference" / "flops"


def _hand_made(path):
    """x (batch,3,8,8,4) -> Conv -> Relu -> grouped strided Conv -> ConvTranspose -> MatMul -> Gemm."""
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    def init(name, *shape):
        return numpy_helper.from_array(np.zeros(shape, np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 6),                     # (1,6,8,8,4)
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], group=2, strides=[2, 2, 2]),             # (1,4,4,4,2)
        helper.make_node("ConvTranspose", ["c2", "w3"], ["c3"], strides=[2, 2, 2]),             # (1,2,8,8,4)
        helper.make_node("Reshape", ["c3", "shape"], ["flat"]),                                   # (1,2,256)
        helper.make_node("MatMul", ["flat", "m"], ["mm"]),                                        # (1,2,7)
        helper.make_node("Flatten", ["mm"], ["f"], axis=1),                                       # (1,14)
        helper.make_node("Gemm", ["f", "g", "gb"], ["out"], transB=1),                            # (1,3)
    ]
    graph = helper.make_graph(
        nodes, "hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])],
        [init("w1", 6, 3, 3, 3, 3), init("b1", 6), init("w2", 4, 3, 2, 2, 2), init("w3", 4, 2, 2, 2, 2),
         numpy_helper.from_array(np.array([1, 2, 256], np.int64), "shape"), init("m", 256, 7),
         init("g", 3, 14), init("gb", 3)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.save(model, str(path))
    return path


def test_hand_made_graph_counts_by_hand(tmp_path):
    r = graph_flops(_hand_made(tmp_path / "hand.onnx"), per_node=True)
    conv1 = (6 * 8 * 8 * 4) * 3 * 27          # output elements x C_in x k^3 (bias not counted)
    conv2 = (4 * 4 * 4 * 2) * (6 // 2) * 8    # stride 2, no pad: 8,8,4 -> 4,4,2; group 2: C_in/group = 3
    # ConvTranspose: every input element meets C_out/group x prod(k) weights; out = (in-1)*2 + k
    convt = (4 * 4 * 4 * 2) * 2 * 8
    matmul = 2 * 7 * 256
    gemm = 3 * 14
    assert r["by_op"]["Conv"] == {"nodes": 2, "macs": conv1 + conv2, "flops": 2 * (conv1 + conv2)}
    assert r["by_op"]["ConvTranspose"]["macs"] == convt
    assert r["by_op"]["MatMul"]["macs"] == matmul
    assert r["by_op"]["Gemm"]["macs"] == gemm
    assert r["macs"] == conv1 + conv2 + convt + matmul + gemm
    assert r["flops"] == 2 * r["macs"]  # 1 MAC = 2 FLOPs
    assert r["batch"] == 1 and "2 x multiply-accumulates" in r["convention"]
    assert r["memory_bound_by_op"] == {"Relu": 6 * 8 * 8 * 4}  # Reshape/Flatten are shape-only
    assert r["unresolved"] == []
    assert [n["macs"] for n in r["nodes"]] == [conv1, conv2, convt, matmul, gemm]
    # the dynamic batch axis, fixed to another size, scales every count
    assert graph_flops(tmp_path / "hand.onnx", batch=2)["by_op"]["Conv"]["macs"] == 2 * (conv1 + conv2)


def test_tiny_export_conv_in_and_quantizer_by_hand(tiny_export):
    from aldm.models import LDMConfig
    from aldm.runtime.manifest import ModelDir

    m = ModelDir(tiny_export).manifest
    vq = LDMConfig.tiny().first_stage_config
    crop = m.preprocessing.crop_size                      # (32, 32, 16)
    r = graph_flops(tiny_export / "encoder.onnx", per_node=True)
    assert r["unresolved"] == []
    [conv_in] = [n for n in r["nodes"] if "encoder.conv_in.weight" in n["inputs"][1]]
    # conv_in: Conv3d(1 -> ch, k3, pad 1) at the full crop: one MAC per output voxel, channel, tap
    assert conv_in["macs"] == prod(crop) * vq.ddconfig.ch * 1 * 27
    # the quantizer's distance matmul: every latent vector against every code
    [dist] = [n for n in r["nodes"] if n["op"] == "MatMul"]
    assert dist["macs"] == prod(s // 4 for s in crop) * vq.n_embed * vq.embed_dim
    assert r["memory_bound_elements"] > 0


def torch_counted_flops(model, crop, device=None) -> dict[str, dict[str, int]]:
    """FLOPs of each exported graph module by torch's FlopCounterMode (the reference's method),
    batch 1; {component: {"total", "conv", "matmul"}} (matmul: mm, bmm and addmm)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from aldm.export.onnx_export import GRAPHS, component_specs

    out = {}
    for name, spec in component_specs(model, crop).items():
        args = [torch.zeros(t.concrete(1), dtype=torch.int64 if t.dtype == "int64" else torch.float32,
                            device=device) for t in spec.inputs]
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            GRAPHS[name](model)(*args)
        counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
        out[name] = {"total": fc.get_total_flops(), "conv": counts.get("aten.convolution", 0),
                     "matmul": sum(counts.get(k, 0) for k in ("aten.mm", "aten.bmm", "aten.addmm"))}
    return out


def _graph_summary(path) -> dict[str, int]:
    r = graph_flops(path)
    assert r["unresolved"] == [], r["unresolved"]
    by = {op: v["flops"] for op, v in r["by_op"].items()}
    return {"total": r["flops"], "conv": by.get("Conv", 0) + by.get("ConvTranspose", 0),
            "matmul": by.get("MatMul", 0) + by.get("Gemm", 0)}


def test_golden_export_matches_the_reference_method(golden_export, golden_model):
    """The official golden checkpoint, exported: every component's graph count equals torch's
    FlopCounterMode over the same modules (the method of ../shared/reference/FLOPs.md), exactly."""
    from aldm.runtime.manifest import ModelDir

    crop = ModelDir(golden_export).manifest.preprocessing.crop_size
    expected = torch_counted_flops(golden_model, crop)
    for c in COMPONENTS:
        assert _graph_summary(golden_export / f"{c}.onnx") == expected[c], c


def reference_graph_flops() -> dict[str, dict[str, int]]:
    """What the four aldm graphs of the official full-size model must count, from
    ../shared/reference/flops (FLOPs.md's figures, exact integers):

    * encoder = Encoder + quant_conv + the quantizer's distance matmul (62,208 x 8,192 x 4);
    * spade: the reference counts one pass with one class (0.8451 T); aldm's graph evaluates
      all 4 class branches of every SPADE norm and keeps each row's own (aldm.models.spade), so it
      adds 3 x the per-class `spades.<k>` convs of the breakdown;
    * unet = one evaluation at batch 1; decoder = post_quant_conv + Decoder.
    """
    raw = json.loads(need(REFERENCE_FLOPS / "flops_raw.json").read_text())
    brk = json.loads(need(REFERENCE_FLOPS / "flops_breakdown.json").read_text())

    def f(key):
        return raw[key]["float32"]["flops_by_op"]

    per_class = sum(v for k, v in brk["spade"].items()
                    if re.fullmatch(r"SPADEGenerator\.block\.\d+\.norm_\d+\.spades\.\d+", k))
    enc, vq, spade, unet, dec = (f("encoder+quant_conv"), f("vector_quantizer"), f("spade_generator(one class)"),
                                 f("unet(batch1)"), f("post_quant_conv+decoder"))
    out = {
        "encoder": {"conv": enc["aten.convolution"], "matmul": vq["aten.bmm"]},
        "spade": {"conv": spade["aten.convolution"] + 3 * per_class, "matmul": 0},
        "unet": {"conv": unet["aten.convolution"], "matmul": unet["aten.bmm"] + unet["aten.addmm"]},
        "decoder": {"conv": dec["aten.convolution"], "matmul": 0},
    }
    for v in out.values():
        v["total"] = v["conv"] + v["matmul"]
    return out


def test_reference_file_figures():
    """The reference file's headline numbers (FLOPs.md) as the expectations above read them."""
    ref = reference_graph_flops()
    assert ref["encoder"]["total"] == 2_314_322_731_008 + 4_076_863_488
    assert ref["unet"]["total"] == 749_014_941_696
    assert ref["decoder"]["total"] == 5_747_551_395_840
    assert ref["spade"]["total"] == 845_133_004_800 + 3 * 503_078_584_320


def test_fullsize_architecture_counts_the_reference_figures():
    """aldm's full-size modules (LDMConfig(), on the meta device: shapes only) count exactly the
    reference's FLOPs, so the golden test above carries over to full size."""
    import torch

    from aldm.models import ALDM, LDMConfig

    ref = reference_graph_flops()
    with torch.device("meta"):
        model = ALDM(LDMConfig()).eval()
    assert torch_counted_flops(model, (144, 192, 144), device="meta") == ref


FULLSIZE = os.environ.get("ALDM_FULLSIZE_MODEL", str(REPO / "runs" / "fullsize"))


def test_fullsize_export_graphs_count_the_reference_figures():
    """The full-size export (scripts/export_random_fullsize.py; ALDM_FULLSIZE_MODEL or
    runs/fullsize): graph_flops of each graph equals the reference file's figures exactly."""
    from pathlib import Path

    folder = Path(FULLSIZE)
    if not (folder / "manifest.json").exists():
        pytest.skip(f"no full-size export at {folder} (make one with scripts/export_random_fullsize.py "
                    "or set ALDM_FULLSIZE_MODEL)")
    ref = reference_graph_flops()
    for c in COMPONENTS:
        assert _graph_summary(folder / f"{c}.onnx") == ref[c], c


def test_without_onnx_graph_flops_raises_import_error(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match="onnx"):
        graph_flops(tmp_path / "x.onnx")
