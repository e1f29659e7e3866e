#!/usr/bin/env bash
# One-call GPU check: on a machine with an NVIDIA GPU (and, offline, a folder of wheels), build
# TensorRT engines for the full-size configuration, then run `aldm check` and `aldm bench` for
# trt / ort-cuda / torch-cuda fp16 / torch-cuda fp32 and merge everything into one JSON report.
#
#   scripts/gpu_check.sh [WHEELS_DIR] [OUT_DIR]
#
# WHEELS_DIR (optional): wheels for torch (CUDA build), onnxruntime-gpu, tensorrt, polygraphy,
# cuda-python; installed with --no-index when given. OUT_DIR defaults to gpu_check_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-}
OUT=${2:-gpu_check_out}
mkdir -p "$OUT"
python3 -m venv .venv-gpu && . .venv-gpu/bin/activate
if [ -n "$WHEELS" ]; then
  pip install -q --no-index --find-links "$WHEELS" torch onnxruntime-gpu tensorrt polygraphy cuda-python
  pip install -q --no-index --find-links "$WHEELS" -e '.[export]' || pip install -q --no-deps -e .
else
  pip install -q -e '.[export,gpu]'
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"

# The full-size official architecture with random weights (speed does not depend on the values),
# saved in the official checkpoint layout so `aldm check` has a PyTorch reference.
python - "$OUT" <<'PY'
import sys, torch
from aldm.models import ALDM, LDMConfig
from aldm.models.checkpoint import save_official
out = sys.argv[1]
torch.manual_seed(0)
m = ALDM(LDMConfig()).eval()
ema = m.model.diffusion_model.state_dict()
save_official(f"{out}/full_random.ckpt", m.official_state_dict(), ema)
PY
aldm export --ldm "$OUT/full_random.ckpt" --out "$OUT/model" --steps 50 --eta 0 --overwrite
aldm build "$OUT/model" --fp32 --max-targets 2 --timing-cache "$OUT/timing.cache"
aldm build "$OUT/model" --fp16 --max-targets 2 --timing-cache "$OUT/timing.cache"
aldm check "$OUT/model" --backends trt,ort-cuda --precisions fp32,fp16 --json "$OUT/check.json" || true
aldm bench "$OUT/model" --backend trt --precision fp16 --steps 50 --torch-device cuda --torch-fp16 --json "$OUT/bench_trt_fp16.json"
aldm bench "$OUT/model" --backend trt --precision fp32 --steps 50 --torch-device cuda --json "$OUT/bench_trt_fp32.json"
aldm bench "$OUT/model" --backend ort-cuda --steps 50 --no-torch --json "$OUT/bench_ort_cuda.json"

python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
report = {"gpu": (out / "gpu.txt").read_text().strip()}
for f in sorted(out.glob("*.json")):
    if f.name != "report.json":
        report[f.stem] = json.loads(f.read_text())
(out / "report.json").write_text(json.dumps(report, indent=1))
print(f"wrote {out / 'report.json'}")
PY
