#!/usr/bin/env bash
# Reproduce the embedded default models in assets/tiny/ from scratch (make assets).
#   1. corpus + tokenizer (scripts/prepare_data.sh)
#   2. pre-training: verifier (ar), base diffusion drafter (mdlm), AR drafter (ar)
#   3. calibration: verifier-sampled data; streak (both forms), kd_first and kd_window drafters from the base one;
#      the ce_streak form ships as assets/tiny/drafter_streak (STREAK_LOSS; see docs/CALIBRATION.md)
#   4. copy the exports into assets/tiny/ and write assets/tiny/MANIFEST.json
# Step counts come from the environment so a short run can reproduce the pipeline quickly; the defaults are the
# counts of the shipped models (see MANIFEST.json for the exact commands each shipped model was made with).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs}
VERIFIER_STEPS=${VERIFIER_STEPS:-2000}
DRAFTER_STEPS=${DRAFTER_STEPS:-1500}
AR_DRAFTER_STEPS=${AR_DRAFTER_STEPS:-800}
CALIB_STEPS=${CALIB_STEPS:-800}
GEN_PROMPTS=${GEN_PROMPTS:-768}
STREAK_LOSS=${STREAK_LOSS:-ce_streak}  # which streak-family run ships as drafter_streak: ce_streak | streak
KD=${KD:-auto}   # the KD drafter shipped beside the streak one: kd_first | kd_window | auto (more tokens per call)

bash scripts/prepare_data.sh data
"$PY" -m train.pretrain --config configs/models/tiny_verifier.yaml --workdir "$RUNS/verifier" \
    train.steps="$VERIFIER_STEPS"
"$PY" -m train.pretrain --config configs/models/tiny_drafter.yaml --workdir "$RUNS/drafter_base" \
    data.seq_len=256 data.batch_size=8 train.steps="$DRAFTER_STEPS" train.warmup_steps=100
"$PY" -m train.pretrain --config configs/models/tiny_ar_drafter.yaml --workdir "$RUNS/drafter_ar" \
    train.steps="$AR_DRAFTER_STEPS" train.warmup_steps=80
"$PY" scripts/write_manifest.py --stage base --runs "$RUNS"
"$PY" -m train.generate_data --config configs/calibrate/generate_tiny.yaml generate.num_prompts="$GEN_PROMPTS"
for loss in streak ce_streak kd_first kd_window; do
  "$PY" -m train.calibrate --config configs/calibrate/tiny.yaml --workdir "$RUNS/drafter_$loss" loss=$loss \
      train.steps="$CALIB_STEPS" calibrate.eval_prompts=0
done
# alpha_j by position and tokens per verifier call of every drafter, in the decode kernel (greedy, held-out prompts)
"$PY" -m eval.calibration_report --out "$RUNS/report" --drafter base="$RUNS/drafter_base/export" \
    --drafter kd_first="$RUNS/drafter_kd_first/export" --drafter kd_window="$RUNS/drafter_kd_window/export" \
    --drafter streak="$RUNS/drafter_streak/export" --drafter ce_streak="$RUNS/drafter_ce_streak/export" \
    --draft-temperature 0 --draft-temperature 1 --windows data/verifier_completions
"$PY" scripts/write_manifest.py --stage calibrated --runs "$RUNS" --kd "$KD" --report "$RUNS/report/report.json" \
    --streak-run "drafter_$STREAK_LOSS"
