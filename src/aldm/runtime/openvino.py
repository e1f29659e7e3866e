"""OpenVINO on the CPU (`ov-cpu`): the exported ONNX graphs read directly (no IR conversion step).

Compiled for the CPU plugin at FP32 (INFERENCE_PRECISION_HINT f32, so a CPU with bf16 units does not
silently run bf16: the precision plan is FP32 on CPU, and the encoder's vector-quantizer argmin
must see FP32 distances), latency mode, one stream. OpenVINO's CPU plugin runs fastest on static
shapes, so the graph is reshaped to the shapes it is called with (batch size; a slab graph's rows)
and compiled once per set of input shapes, lazily, and kept. Past MAX_COMPILED sets, one compile
with the graph's dynamic axes serves every further shape (bounded memory, no recompiling on a
cycle of shapes). `openvino` is imported only when a runner activates.

Staged normalisation statistics are kept staged. aldm exports every GroupNorm/InstanceNorm with
its means taken one axis at a time (aldm.export.stable_norm: ONNX Runtime's one-pass statistics
over 16 M-value groups were ~1e-3 off). OpenVINO's ReduceMerge pass folds such a chain of
ReduceMeans back into one reduction over all the axes (OpenVINO 2026.4: ~1e-6 off on one group
instead of ~1e-8). Measured on the bundled model at 144x192x144 with the chains merged: the
decoder 1.03e-4 off PyTorch (over `aldm check`'s 1e-4; 1.0e-6 kept staged) and 6 encoder codes
that are not ties differed (99.995 % agreement; 100 % kept staged). `keep_staged` puts a scale
between the stages (mean = sum * 1/n), which the pass does not merge across.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Mapping

import numpy as np

from aldm.errors import BackendError, ModelError
from aldm.runtime.manifest import ComponentSpec
from aldm.runtime.runners import check_feeds, check_out

INSTALL_HINT = "pip install 'aldm[cpu]', or choose --backend ort-cpu"
MAX_COMPILED = 4  # static compiles kept per component (each holds its own repacked weights)

# OpenVINO's messages are several lines: where it was thrown ("Exception from src/...:84:"), the
# failed check, then what went wrong. The one line kept is the last that says what went wrong.
_WHERE = re.compile(r"^(Exception from |Check '.*' failed at |FrontEnd API failed with )")


def ov_message(exc: BaseException) -> str:
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    said = [s for s in lines if not _WHERE.match(s)]
    return (said or lines or [type(exc).__name__])[-1]


def import_openvino():
    """The openvino module, or a one-line BackendError saying how to get it."""
    try:
        import openvino
    except ImportError:
        raise BackendError(f"the ov-cpu backend needs OpenVINO, which is not installed ({INSTALL_HINT})") from None
    except Exception as exc:  # a broken install (a missing shared library, say)
        raise BackendError(f"the ov-cpu backend cannot import OpenVINO: {ov_message(exc)} ({INSTALL_HINT})") from None
    return openvino


def keep_staged(model) -> int:
    """Rewrite every ReduceMean that feeds another ReduceMean as ReduceSum * (1/n), so that
    OpenVINO keeps the stages apart (see the module docstring). Only where the reduced dims are
    static (n must be known); changes `model` in place; returns the number rewritten."""
    import openvino.opset13 as ops

    done = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "ReduceMean":
            continue
        top = op.input_value(0).get_node()
        if top.get_type_name() != "ReduceMean" or top.input_value(1).get_node().get_type_name() != "Constant":
            continue
        shape = top.get_input_partial_shape(0)
        axes = [int(a) % shape.rank.get_length() for a in np.atleast_1d(top.input_value(1).get_node().get_data())]
        if any(shape[a].is_dynamic for a in axes):
            continue
        n = int(np.prod([shape[a].get_length() for a in axes]))
        total = ops.reduce_sum(top.input_value(0), top.input_value(1), keep_dims=top.get_attributes()["keep_dims"])
        dtype = top.get_output_element_type(0).to_dtype()
        mean = ops.multiply(total, ops.constant(np.array(1.0 / n, dtype)))
        top.output(0).replace(mean.output(0))
        done += 1
    return done


class OvRunner:
    """One component on OpenVINO's CPU plugin, behind the runner protocol."""

    def __init__(self, path: str | Path, spec: ComponentSpec, *, threads: int | None = None,
                 precision: str = "fp32"):
        self.path, self.spec, self.threads, self.precision = Path(path), spec, threads, precision
        # A reduced-precision variant is its own ONNX file (FP16 weights with the plan's FP32 nodes,
        # or INT8 QDQ); it is compiled with the same FP32 hint, never bf16.
        self.name = "ov-cpu" + ("" if precision == "fp32" else f"/{precision}")
        self.core = None
        self.model = None  # the ov.Model as read (dynamic axes); reshaped copies are compiled
        # input shapes -> (compiled model, infer request); None: the dynamic compile past MAX_COMPILED
        self.compiled: dict[tuple | None, tuple] = {}
        self._lock = threading.Lock()  # an infer request runs one inference at a time

    def config(self) -> dict[str, str]:
        cfg = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = str(int(self.threads))
        return cfg

    def activate(self) -> None:
        if self.model is not None:
            return
        ov = import_openvino()
        where = f"cannot load {self.path} in OpenVINO"
        if not self.path.is_file():
            raise ModelError(f"{where}: no such file")
        try:
            from openvino.frontend import FrontEndManager

            # read_model tries every frontend on a file the ONNX one refuses (TensorFlow's prints
            # parse errors to stderr): ask the ONNX frontend first
            if not FrontEndManager().load_by_framework("onnx").supported(os.fspath(self.path)):
                raise ModelError(f"{where}: not an ONNX model")
            core = ov.Core()
            model = core.read_model(os.fspath(self.path))
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"{where}: {ov_message(exc)}") from None
        have = {p.get_any_name() for p in model.inputs}, {n for p in model.outputs for n in p.get_names()}
        want = {t.name for t in self.spec.inputs}, {t.name for t in self.spec.outputs}
        if not (want[0] == have[0] and want[1] <= have[1]):
            raise ModelError(f"{self.path}: graph inputs {sorted(have[0])} / outputs {sorted(have[1])} "
                             f"do not match the manifest's {sorted(want[0])} / {sorted(want[1])}")
        self.core, self.model = core, model

    def _compiled(self, inputs: Mapping[str, np.ndarray], bound: bool = False) -> tuple:
        """The compiled model and an infer request for these input shapes (compiled on first use).
        bound: the request whose outputs are set to caller-owned arrays (kept apart, so a plain
        inference never writes into a caller's array)."""
        key = tuple(inputs[t.name].shape for t in self.spec.inputs)
        if key not in self.compiled and len([k for k in self.compiled if k is not None]) >= MAX_COMPILED:
            key = None  # the dynamic compile
        if key not in self.compiled:
            model = self.model.clone()
            if key is not None:
                model.reshape({t.name: list(shape) for t, shape in zip(self.spec.inputs, key)})
            keep_staged(model)
            compiled = self.core.compile_model(model, "CPU", self.config())
            self.compiled[key] = [compiled, None, None]
        entry = self.compiled[key]
        if entry[1 + bound] is None:  # first call for these shapes
            entry[1 + bound] = entry[0].create_infer_request()
        return entry[0], entry[1 + bound]

    def infer(self, feeds: Mapping[str, np.ndarray],
              out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """out: arrays the named outputs are written into (BindingRunner); inputs are then read
        in place too."""
        check_feeds(self.spec, feeds)
        if out:
            check_out(self.spec, out)
        self.activate()
        inputs = {t.name: np.ascontiguousarray(feeds[t.name]) for t in self.spec.inputs}
        try:
            with self._lock:
                compiled, request = self._compiled(inputs, bound=bool(out))
                if out:
                    ov = import_openvino()
                    for name, arr in out.items():
                        want = tuple(compiled.output(name).get_partial_shape().to_shape()) \
                            if compiled.output(name).get_partial_shape().is_static else arr.shape
                        if tuple(arr.shape) != want:
                            raise BackendError(f"{self.name}: {self.spec.name} output {name!r} is {want}, "
                                               f"the array given for it {tuple(arr.shape)}")
                        request.set_tensor(compiled.output(name), ov.Tensor(arr, shared_memory=True))
                # share_outputs: views of OpenVINO's buffers, copied out below (one copy, and the
                # caller owns the arrays: the next inference cannot overwrite them)
                result = request.infer(inputs, share_inputs=bool(out), share_outputs=True)
                return {t.name: out[t.name] if out and t.name in out
                        else np.array(result[compiled.output(t.name)], dtype=t.dtype, copy=True)
                        for t in self.spec.outputs}
        except BackendError:
            raise
        except MemoryError:
            raise BackendError(f"{self.name} out of memory in {self.spec.name}") from None
        except Exception as exc:  # OpenVINO raises RuntimeError and its own types
            msg = ov_message(exc)
            if "memory" in msg.lower() or "alloc" in msg.lower():
                raise BackendError(f"{self.name} out of memory in {self.spec.name}: {msg}") from None
            raise BackendError(f"{self.name} failed in {self.spec.name}: {msg}") from None

    def trim(self) -> None:
        """Free the compiled graphs' working memory (OpenVINO keeps it for as long as a graph is
        loaded); the graphs stay compiled and allocate it again on their next inference. The
        requests bound to caller-owned arrays go too: they would keep those arrays alive."""
        with self._lock:
            for entry in self.compiled.values():
                entry[2] = None
                entry[0].release_memory()

    def deactivate(self) -> None:
        with self._lock:
            self._free()

    def _free(self) -> None:
        # Compiled graphs and requests first, the Core last: freed the other way round (an
        # attribute dict is freed in insertion order, Core first), the CPU plugin could be gone
        # before a CompiledModel's destructor runs in it, which crashed the process (SIGSEGV in
        # ov::CompiledModel::~CompiledModel) when an interrupted batch exited.
        self.compiled.clear()
        self.model = None
        self.core = None

    def __del__(self) -> None:
        try:
            self._free()
        except Exception:  # interpreter shutdown: nothing left to free in order
            pass
