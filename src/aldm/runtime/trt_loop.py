"""The DDIM loop on the GPU with the sampler-step engine (manifest.STEP_GRAPH): one engine call per
step, x never leaves the device between steps.

Per translation: x_T, c_concat and y are uploaded once, with two small tables (one 256-byte row
per step: the step's t for every batch row, its float32 coefficients from
`sampler.ddim_coefficients`). x ping-pongs between two device buffers. Per step the device copies
the step's t and coef rows into the engine's fixed t/coef inputs (a few bytes, device to device)
instead of re-pointing those inputs at the rows: a captured CUDA graph bakes in every address, so
fixed addresses let two graphs (one per direction of the ping-pong) serve every step. Noise is
copied per step through page-locked memory only when σ > 0; with σ = 0 (eta 0) the noise input
is a buffer zeroed once, and with official_rng the draws are still made (the official RNG
consumption). x comes to the host once, at the end, or each step for a callback that wants it
(`sampler.progress_only` marks one that does not).
"""

from __future__ import annotations

import numpy as np

from aldm.errors import BackendError
from aldm.runtime import sampler as S
from aldm.runtime.cuda import ALIGN, Event, aligned
from aldm.runtime.trt import TrtRunner

# the step graph's tensors (manifest.STEP_GRAPH)
X_IN, X_OUT, T, COND, Y, COEF, NOISE = "x_t", "x_prev", "t", "c_concat", "y", "coef", "noise"


class TrtStepRunner(TrtRunner):
    """The step engine: `infer` runs one step (the runner protocol), `ddim_loop` the whole loop."""

    def ddim_loop(self, x_T: np.ndarray, c_concat: np.ndarray, y: np.ndarray, schedule: S.DDIMSchedule,
                  noise: S.Noise, *, official_rng: bool = True, callback: S.Callback = None) -> np.ndarray:
        """Same noise draws, callbacks and result as sampler.ddim_sample_steps over this engine."""
        x_T = np.asarray(x_T, np.float32)
        shape, batch = x_T.shape, x_T.shape[0]
        self.check_batch(batch)
        self.activate()
        self.check_batch(batch)
        dt = self._dtype
        if dt[X_IN] != dt[X_OUT]:
            raise BackendError(f"{self.spec.name} engine: x_t is {np.dtype(dt[X_IN])} but x_prev "
                               f"{np.dtype(dt[X_OUT])}; x cannot alternate between two buffers")
        coefs = S.ddim_coefficients(schedule)  # (S, 4) float32
        total = len(schedule.timesteps)
        sigma = np.asarray(schedule.sigmas) > 0
        x_nbytes = x_T.size * np.dtype(dt[X_IN]).itemsize
        noise_nbytes = x_T.size * np.dtype(dt[NOISE]).itemsize

        # shapes of this translation
        for name, shp in ((X_IN, shape), (T, (batch,)), (COND, c_concat.shape), (Y, y.shape), (COEF, (4,)),
                          (NOISE, shape)):
            self.set_input(name, shp)
        if self.output_shape(X_OUT) != tuple(shape):
            raise BackendError(f"{self.spec.name} engine: x_prev has shape {self.output_shape(X_OUT)}, "
                               f"x_t {tuple(shape)}")

        # device memory, reused from translation to translation (grown when needed)
        xs = [self._buffer("x0", x_nbytes), self._buffer("x1", x_nbytes)]
        cond, ybuf = self._buffer(COND, _nbytes(c_concat, dt[COND])), self._buffer(Y, _nbytes(y, dt[Y]))
        t_row = aligned(batch * np.dtype(dt[T]).itemsize)
        t_table, t_slot = self._buffer("t_table", total * t_row), self._buffer(T, t_row)
        c_row = aligned(4 * np.dtype(dt[COEF]).itemsize)
        c_table, c_slot = self._buffer("coef_table", total * c_row), self._buffer(COEF, c_row)
        z_slot = self._buffer(NOISE, noise_nbytes)
        host_x = self._pinned("x", x_nbytes).array(shape, dt[X_IN])  # x_T up, x down

        # uploads, once per translation (pageable sources: the copy has read them when it returns)
        keep = [np.ascontiguousarray(c_concat, dt[COND]), np.ascontiguousarray(y, dt[Y]),
                _table(np.repeat(schedule.timesteps[:, None], batch, 1).astype(dt[T]), t_row),
                _table(coefs.astype(dt[COEF]), c_row)]
        np.copyto(host_x, x_T, casting="unsafe")
        self.stream.copy(xs[0].ptr, host_x.ctypes.data, x_nbytes, "htod")
        for buf, arr in zip((cond, ybuf, t_table, c_table), keep):
            self.stream.copy(buf.ptr, arr.ctypes.data, arr.nbytes, "htod")
        if not sigma.all():
            self.stream.memset(z_slot.ptr, 0, noise_nbytes)  # the noise of every σ = 0 step
        for name, buf in ((COND, cond), (Y, ybuf), (T, t_slot), (COEF, c_slot), (NOISE, z_slot)):
            self.bind(name, buf.ptr)

        stage = [self._pinned(f"noise{k}", noise_nbytes) for k in (0, 1)] if sigma.any() else []
        stage_x = [s.array(shape, dt[NOISE]) for s in stage]
        staged = [Event(), Event()] if stage else []
        key = (tuple(shape), tuple(c_concat.shape), tuple(y.shape))
        needs_x = S.wants_x(callback)
        fetched = False
        try:
            for i in range(total):
                j = total - 1 - i
                z = noise(shape) if sigma[j] or official_rng else None  # official RNG consumption
                if sigma[j]:
                    k = i % 2  # two staging buffers: fill one while the other may still be copied
                    staged[k].sync()
                    np.copyto(stage_x[k], z, casting="unsafe")
                    self.stream.copy(z_slot.ptr, stage[k].ptr, noise_nbytes, "htod")
                    staged[k].record(self.stream)
                elif sigma.any():
                    self.stream.memset(z_slot.ptr, 0, noise_nbytes)
                self.stream.copy(t_slot.ptr, t_table.ptr + j * t_row, t_row, "dtod")
                self.stream.copy(c_slot.ptr, c_table.ptr + j * c_row, c_row, "dtod")
                src, dst = xs[i % 2], xs[1 - i % 2]
                self.bind(X_IN, src.ptr)
                self.bind(X_OUT, dst.ptr)
                self.execute(key + (i % 2,))
                fetched = False
                if callback is not None:
                    if needs_x:
                        self.stream.copy(host_x.ctypes.data, dst.ptr, x_nbytes, "dtoh")
                        fetched = True
                    self.stream.sync()  # the step is done when its callback hears of it
                    callback(i, total, int(schedule.timesteps[j]), host_x.astype(np.float32) if needs_x else None)
            if not fetched:
                self.stream.copy(host_x.ctypes.data, xs[total % 2].ptr, x_nbytes, "dtoh")
            self.stream.sync()
        finally:
            try:  # an interrupted loop may still have copies in flight
                self.stream.sync()
            except BackendError:
                pass  # the error being raised says more
            for event in staged:
                event.destroy()
            del keep  # only now: the uploads may read it until the stream has passed them
        return host_x.astype(np.float32)


def _nbytes(arr: np.ndarray, dtype) -> int:
    return arr.size * np.dtype(dtype).itemsize


def _table(rows: np.ndarray, row_bytes: int) -> np.ndarray:
    """(S, n) rows laid out `row_bytes` apart (a multiple of 256: every row is a valid tensor address)."""
    assert row_bytes % ALIGN == 0
    out = np.zeros((rows.shape[0], row_bytes // rows.itemsize), rows.dtype)
    out[:, :rows.shape[1]] = rows
    return out
