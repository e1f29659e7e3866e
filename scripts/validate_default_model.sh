#!/usr/bin/env bash
# Export a trained run's stage-3 checkpoint and measure it: the five translation tasks on the
# held-out cases (with the identity and linear-fit baselines), the IXI example end to end, and
# its T2 against the real IXI T2 resampled onto the T1 grid.
#
#   scripts/validate_default_model.sh RUN_DIR MODEL_OUT [DATA_DIR] [STEPS] [ETA] [STRENGTH]
set -euo pipefail
RUN=$1; MODEL=$2; DATA=${3:-../shared/data/brats18}; STEPS=${4:-25}; ETA=${5:-0}; STRENGTH=${6:-1}
OUT=$RUN/validation
mkdir -p "$OUT"
aldm export --ldm "$RUN/stage3/last.ckpt" --out "$MODEL" --steps "$STEPS" --eta "$ETA" --strength "$STRENGTH" --bound-latents --overwrite
VAL=$(python -c "import json,sys; print(' '.join(json.load(open('$RUN/split.json'))['validation']))")
rm -rf "$OUT/pred"
for case in $VAL; do
  d=$DATA/$case
  aldm-infer "$d/${case}_t1.nii.gz" --model "$MODEL" --targets t2,flair,t1ce --source-modality t1 --out "$OUT/pred" --seed 0 --quiet
  aldm-infer "$d/${case}_t2.nii.gz" --model "$MODEL" --targets flair --source-modality t2 --out "$OUT/pred" --seed 0 --quiet
  aldm-infer "$d/${case}_flair.nii.gz" --model "$MODEL" --targets t2 --source-modality flair --out "$OUT/pred" --seed 0 --quiet
done
aldm eval "$OUT/pred" "$DATA" --baselines --out "$OUT/metrics"
IXI=examples/IXI002-Guys-0828-T1.nii.gz
rm -rf "$OUT/ixi"
/usr/bin/time -f "aldm-infer wall %e s, peak RSS %M kB" aldm-infer "$IXI" --model "$MODEL" --targets t2,flair --out "$OUT/ixi" --seed 0 --preview 2>&1 | tail -3
T2=../shared/data/ixi/IXI002-Guys-0828/IXI002-Guys-0828-T2.nii.gz
aldm eval "$OUT/ixi/IXI002-Guys-0828-T1_t2.nii.gz" "$T2" --out "$OUT/ixi_t2"
aldm eval "$IXI" "$T2" --out "$OUT/ixi_t2_identity"   # baseline: the T1 itself as the "T2"
