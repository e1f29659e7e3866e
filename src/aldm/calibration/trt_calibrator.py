"""TensorRT INT8 entropy calibrator over the recorded component inputs, with a calibration cache
(a rebuild on the same data skips calibration, written atomically). Needs tensorrt and
cuda-python."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aldm.atomic import write_bytes
from aldm.calibration.collect import load_samples
from aldm.runtime.manifest import ComponentSpec


def make_calibrator(calib_dir: Path, component: str, spec: ComponentSpec, cache_file: Path,
                    max_samples: int = 256):
    import tensorrt as trt

    from aldm.runtime.cuda import DeviceBuffer, Stream

    samples = load_samples(calib_dir, component)
    if not samples:
        raise ValueError(f"{calib_dir} has no recorded {component} inputs")
    rng = np.random.default_rng(0)
    samples = [samples[i] for i in sorted(rng.choice(len(samples), min(max_samples, len(samples)),
                                                      replace=False))]

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.it = iter(samples)
            self.stream = Stream()
            self.buffers = {t.name: DeviceBuffer(np.prod(t.concrete(1)) * np.dtype(t.dtype).itemsize)
                            for t in spec.inputs}

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            feeds = next(self.it, None)
            if feeds is None:
                return None
            for n in names:
                self.stream.htod(self.buffers[n], feeds[n])
            self.stream.sync()
            return [self.buffers[n].ptr for n in names]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.exists() else None

        def write_calibration_cache(self, cache):
            write_bytes(cache_file, bytes(cache))

    return EntropyCalibrator()
