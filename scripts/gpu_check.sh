#!/usr/bin/env bash
# One-call GPU check (issue 19 item 4): what a GPU machine can measure of aldm, in one call.
#
# On a session lent the device machine (one H200, PyTorch with CUDA, no TensorRT, no
# onnxruntime-gpu, no network), spend one call on it: the device tool's `run` with
#   command:   bash scripts/gpu_check.sh
#   timeout_s: 600
#   carry:     none (it runs from src/ with the machine's python3 and torch; nothing is installed)
# It writes to $OUT three files (all that comes back; the limit is 8): gpu_check.json (every
# figure, rewritten after each stage, so a call cut short still returns what it measured),
# gpu_check_summary.txt (the same, readable) and console.txt (the log). Back here, with the reply's
# files_at as FILES_AT:
#   cat FILES_AT/gpu_check_summary.txt
#   python -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['ratio'], r['errors'])" FILES_AT/gpu_check.json
# What it measures (scripts/gpu_check.py says how, and why it fits the call): on the full-size model
# (official widths, seeded random weights), PyTorch eager FP32 with the official per-step
# structure (the peer) against the aldm torch backend (FP16 autocast, DDIM loop on the device),
# their ratio, per-component times, peak GPU memory, FLOPs and the fraction of the GPU's peak. It
# lists what it could not run (TensorRT, ONNX Runtime CUDA) under "not_run" instead of failing;
# about 1-2 minutes expected, 480 s budget (GPU_CHECK_BUDGET_S), so a 600 s call leaves margin.
#
# Dry run on a CPU (tiny model, no CUDA, the same code path, well under a minute; tests/test_gpu_check.py):
#   OUT=/tmp/gpu_check_dry bash scripts/gpu_check.sh --dry-run
#
# On a machine that HAS TensorRT (python3 imports tensorrt), or given WHEELS_DIR (wheels for torch
# with CUDA, onnxruntime-gpu, tensorrt, polygraphy, cuda-python, installed with --no-index), it then
# also runs the TensorRT part: export the full-size model, build FP32/FP16 engines, `aldm check`
# and `aldm bench` for trt / ort-cuda, results under $OUT/trt/ (more files than the device tool
# returns: that part is for a machine of your own).
#
#   scripts/gpu_check.sh [--dry-run] [WHEELS_DIR] [extra gpu_check.py options, e.g. --steps 200]
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
WHEELS=""
ARGS=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1; ARGS+=("$a") ;;
    -*) ARGS+=("$a") ;;
    *) if [ -z "$WHEELS" ] && [ -d "$a" ]; then WHEELS=$a; else ARGS+=("$a"); fi ;;
  esac
done
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi"
  budget=()
  [ -n "${GPU_CHECK_BUDGET_S:-}" ] && budget=(--budget-s "$GPU_CHECK_BUDGET_S")
  "$PY" scripts/gpu_check.py --out "$OUT" "${budget[@]}" "${ARGS[@]}"
} 2>&1 | tee "$OUT/console.txt"
rc=${PIPESTATUS[0]}

tensorrt_part() {
  set -e
  local W=$OUT/trt
  mkdir -p "$W"
  python3 -m venv .venv-gpu && . .venv-gpu/bin/activate
  if [ -n "$WHEELS" ]; then
    pip install -q --no-index --find-links "$WHEELS" torch onnxruntime-gpu tensorrt polygraphy cuda-python
    pip install -q --no-index --find-links "$WHEELS" -e '.[export]' || pip install -q --no-deps -e .
  else
    pip install -q -e '.[export,gpu]'
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$W/gpu.txt"
  # The full-size official architecture with random weights, saved in the official checkpoint
  # layout so `aldm check` has a PyTorch reference.
  python - "$W" <<'PY'
import sys, torch
from aldm.models import ALDM, LDMConfig
from aldm.models.checkpoint import save_official
out = sys.argv[1]
torch.manual_seed(0)
m = ALDM(LDMConfig()).eval()
ema = m.model.diffusion_model.state_dict()
save_official(f"{out}/full_random.ckpt", m.official_state_dict(), ema)
PY
  aldm export --ldm "$W/full_random.ckpt" --out "$W/model" --steps 50 --eta 0 --overwrite
  aldm build "$W/model" --fp32 --max-targets 2 --timing-cache "$W/timing.cache"
  aldm build "$W/model" --fp16 --max-targets 2 --timing-cache "$W/timing.cache"
  aldm check "$W/model" --backends trt,ort-cuda --precisions fp32,fp16 --json "$W/check.json" || true
  aldm bench "$W/model" --backend trt --precision fp16 --steps 50 --torch-device cuda --torch-fp16 --json "$W/bench_trt_fp16.json"
  aldm bench "$W/model" --backend trt --precision fp32 --steps 50 --torch-device cuda --json "$W/bench_trt_fp32.json"
  aldm bench "$W/model" --backend ort-cuda --steps 50 --no-torch --json "$W/bench_ort_cuda.json"
  python - "$W" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
report = {"gpu": (out / "gpu.txt").read_text().strip()}
for f in sorted(out.glob("*.json")):
    if f.name != "report.json":
        report[f.stem] = json.loads(f.read_text())
(out / "report.json").write_text(json.dumps(report, indent=1))
print(f"wrote {out / 'report.json'}")
PY
}

if [ "$DRY" = 0 ] && { [ -n "$WHEELS" ] || "$PY" -c "import tensorrt" 2>/dev/null; }; then
  ( tensorrt_part ) 2>&1 | tee "$OUT/trt_console.txt" || rc=1
else
  echo "TensorRT part not run: $([ "$DRY" = 1 ] && echo "dry run" || echo "tensorrt is not installed here and no WHEELS_DIR was given")"
fi
exit "$rc"
