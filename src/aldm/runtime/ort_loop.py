"""The DDIM loop on ONNX Runtime's CUDA provider with the sampler-step graph (manifest.STEP_GRAPH).

Everything lives in OrtValues on the GPU: c_concat and y uploaded once per translation and bound
once; one (4,) coefficient and one (B,) t value per step, uploaded together before the loop; x
alternating between two device OrtValues (each step binds one as x_t and the other as x_prev).
Noise goes up per step only when σ > 0 (`OrtValue.update_inplace` into one device value); with
σ = 0 the noise input is a device zero bound once. x is copied to the host once, at the end, or
each step for a callback that wants it (`sampler.progress_only` marks one that does not).
"""

from __future__ import annotations

import numpy as np

from aldm.errors import BackendError
from aldm.runtime import sampler as S
from aldm.runtime.runners import OrtRunner

X_IN, X_OUT, T, COND, Y, COEF, NOISE = "x_t", "x_prev", "t", "c_concat", "y", "coef", "noise"
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}


class OrtStepRunner(OrtRunner):
    """The step graph on ONNX Runtime's CUDA provider: `infer` runs one step, `ddim_loop` the whole
    loop (on the CPU the step graph's plain OrtRunner serves: runners.step_graph_loop)."""

    def ddim_loop(self, x_T: np.ndarray, c_concat: np.ndarray, y: np.ndarray, schedule: S.DDIMSchedule,
                  noise: S.Noise, *, official_rng: bool = True, callback: S.Callback = None) -> np.ndarray:
        """Same noise draws, callbacks and result as sampler.ddim_sample_steps over this graph."""
        import onnxruntime as ort

        self.activate()
        types = {i.name: _ORT_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        types |= {o.name: _ORT_TYPES.get(o.type, np.float32) for o in self.session.get_outputs()}
        if types[X_IN] != types[X_OUT]:
            raise BackendError(f"{self.name}: {self.spec.name} takes x_t as {np.dtype(types[X_IN])} but gives "
                               f"x_prev as {np.dtype(types[X_OUT])}; x cannot alternate between two values")
        x_T = np.asarray(x_T, np.float32)
        shape, batch = x_T.shape, x_T.shape[0]
        total = len(schedule.timesteps)
        sigma = np.asarray(schedule.sigmas) > 0
        coefs = S.ddim_coefficients(schedule)

        def device(arr, name):
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr, types[name]), "cuda", 0)

        try:
            xs = [device(x_T, X_IN), ort.OrtValue.ortvalue_from_shape_and_type(shape, types[X_OUT], "cuda", 0)]
            ts = [device(np.full((batch,), t, np.int64), T) for t in schedule.timesteps]
            cs = [device(c, COEF) for c in coefs]
            z = device(np.zeros(shape, np.float32), NOISE)  # σ = 0: stays zero
            binding = self.session.io_binding()
            binding.bind_ortvalue_input(COND, device(c_concat, COND))
            binding.bind_ortvalue_input(Y, device(y, Y))
            binding.bind_ortvalue_input(NOISE, z)
            needs_x = S.wants_x(callback)
            zeros = np.zeros(shape, types[NOISE]) if sigma.any() and not sigma.all() else None
            for i in range(total):
                j = total - 1 - i
                draw = noise(shape) if sigma[j] or official_rng else None  # official RNG consumption
                if sigma[j]:
                    z.update_inplace(np.ascontiguousarray(draw, types[NOISE]))
                elif sigma.any():
                    z.update_inplace(zeros)
                binding.bind_ortvalue_input(X_IN, xs[i % 2])
                binding.bind_ortvalue_output(X_OUT, xs[1 - i % 2])
                binding.bind_ortvalue_input(T, ts[j])
                binding.bind_ortvalue_input(COEF, cs[j])
                self.session.run_with_iobinding(binding)
                if callback is not None:
                    x = xs[1 - i % 2].numpy().astype(np.float32, copy=False) if needs_x else None
                    callback(i, total, int(schedule.timesteps[j]), x)
            return xs[total % 2].numpy().astype(np.float32, copy=False)
        except BackendError:
            raise
        except Exception as exc:  # onnxruntime raises its own types; a callback's own exceptions pass
            if type(exc).__module__.split(".")[0] != "onnxruntime":
                raise
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            kind = "out of memory" if "memory" in msg.lower() or "alloc" in msg.lower() else "failed"
            raise BackendError(f"{self.name} {kind} in {self.spec.name}: {msg}") from None
