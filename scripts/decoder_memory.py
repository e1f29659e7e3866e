"""Time and peak memory of one decoder, whole or in slabs, in this process alone (run it once per
setting: the peak RSS is the process's). The figures of docs/performance.md's memory tables.

    python scripts/decoder_memory.py MODEL_DIR ROWS [BACKEND]     # ROWS 0: whole volume
    python scripts/decoder_memory.py runs/fullsize 16 ov-cpu      # full size (export_random_fullsize.py)
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np


def main(argv: list[str]) -> int:
    from aldm.runtime.backends import single_backend
    from aldm.runtime.manifest import ModelDir
    from aldm.runtime.tiled import tiled_decoder

    if len(argv) not in (2, 3):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    model, rows = ModelDir(argv[0]), int(argv[1])
    backend = argv[2] if len(argv) == 3 else "ort-cpu"
    z = np.random.default_rng(0).standard_normal((1,) + tuple(model.manifest.latent_shape)).astype(np.float32)
    if rows:
        decode = tiled_decoder(model, backend, None, rows)
        if decode is None:
            print(f"{model.path} has no decoder cut, or {backend} does not run it", file=sys.stderr)
            return 2
    else:
        runner = single_backend(model, backend)["decoder"]
        decode = lambda z: runner.infer({"z": z})["x_rec"]  # noqa: E731
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        decode(z)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{backend} {'slabs of %d rows' % rows if rows else 'whole volume'}: "
          f"{', '.join(f'{t:.2f}' for t in times)} s per decode, peak RSS {peak:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
