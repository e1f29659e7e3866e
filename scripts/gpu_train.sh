#!/usr/bin/env bash
# One-call GPU training of the MS-SPADE and the UNet on gpu_pack/ (issue 16 item 3).
#
# On a session lent the device machine, spend the call on this at once: the device tool's `run` with
#   command:   bash scripts/gpu_train.sh
#   timeout_s: 600
#   carry:     none (gpu_pack/ is committed and travels with the working tree; were it not, carry ["gpu_pack"])
# It needs nothing installed there (python3 with torch; aldm runs from src/), trains for
# GPU_TRAIN_MINUTES (default 8.5: stage 2 then stage 3, bf16 autocast, the widest size whose files
# come back) and writes to $OUT: spade-K.ckpt and unet-K.ckpt (official layout, bf16, sharded),
# summary.json (widths, steps, samples/s, losses, limits check), log.csv, console.txt: 8 files at
# most, each under 16 MiB, under 64 MiB in all. Extra arguments go to scripts/gpu_train.py, e.g.
#   bash scripts/gpu_train.sh --batch 16 --stage2-share 0.3
# Back here, with the files under FILES_AT (the reply's files_at):
#   python scripts/gpu_train.py merge --files FILES_AT --pack gpu_pack --out runs/gpu/last.ckpt
#   aldm export --ldm runs/gpu/last.ckpt --out runs/gpu/model
# If the call is cut short after stage 2, spade-K.ckpt came back alone (no LDM to merge yet).
# Continuing an earlier call (--init DIR --stage2-share 0: its SPADE and UNet EMA as starting
# weights) works (tests/test_gpu_train.py) but does not fit a device call today: the returned
# files are ~57 MiB at the default width and the tree that travels is ~57 MiB of the 64 MiB
# (git ls-files -z | xargs -0 du -cb; tests/test_default_model.py keeps it under 60 MiB); it needs
# the tree slimmed further (models/default/last.ckpt 19 MB) or a narrower --size. Until then: one
# call from scratch.
#
# Before the call: the tree that travels (tracked + untracked files git does not ignore) must stay
# under 64 MiB; a local gpu_train_out/ (the default OUT off the device) would travel too.
#
# Dry run on a CPU (a handful of steps, tests/test_gpu_train.py does the same on a synthetic pack):
#   OUT=/tmp/gpu_dry bash scripts/gpu_train.sh --device cpu --minutes 0.2 --size small --run /tmp/gpu_dry_run
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_train_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 scripts/gpu_train.py --out "$OUT" --minutes "${GPU_TRAIN_MINUTES:-8.5}" "$@"
} 2>&1 | tee "$OUT/console.txt"
exit "${PIPESTATUS[0]}"
