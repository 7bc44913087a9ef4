#!/usr/bin/env bash
# Reproduce the embedded default models in assets/tiny/ from scratch (make assets).
#   1. corpus + tokenizer (scripts/prepare_data.sh)
#   2. pre-training: verifier (ar), base diffusion drafter (mdlm), AR drafter (ar)
#   3. calibration data sampled from the verifier: at T=0.5 (the KD drafters), greedy (T=0) and at T=1
#   4. calibration from the base drafter: kd_first and kd_window on the T=0.5 data (one ships, --kd auto); one
#      ce_streak SpecDiff-2 drafter per decoding temperature: drafter_streak_t0 on the greedy completions,
#      drafter_streak_t1 on the T=1 samples (MANIFEST.json records the temperature each serves)
#   5. the calibration report (96 held-out prompts, greedy verifier, gamma 16: tau with 95% bootstrap intervals),
#      then copy the exports into assets/tiny/ and write assets/tiny/MANIFEST.json
# Step counts come from the environment so a short run can reproduce the pipeline quickly; the defaults are the
# counts of the shipped models (see MANIFEST.json for the exact commands each shipped model was made with).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs}
VERIFIER_STEPS=${VERIFIER_STEPS:-2000}
DRAFTER_STEPS=${DRAFTER_STEPS:-1500}
AR_DRAFTER_STEPS=${AR_DRAFTER_STEPS:-800}
CALIB_STEPS=${CALIB_STEPS:-800}        # kd_first / kd_window
T0_STEPS=${T0_STEPS:-1400}             # drafter_streak_t0: lr 1e-3 ...
T0_MORE_STEPS=${T0_MORE_STEPS:-500}    # ... then these at lr 5e-4 from that export
T1_STEPS=${T1_STEPS:-400}              # drafter_streak_t1
GEN_PROMPTS=${GEN_PROMPTS:-768}        # x 2 samples at T=0.5 (KD drafters)
GEN_T0_PROMPTS=${GEN_T0_PROMPTS:-4096} # x 1 greedy completion
GEN_T1_PROMPTS=${GEN_T1_PROMPTS:-768}  # x 2 samples at T=1
KD=${KD:-auto}   # the KD drafter shipped beside the streak ones: kd_first | kd_window | auto (more tokens per call)

bash scripts/prepare_data.sh data
"$PY" -m train.pretrain --config configs/models/tiny_verifier.yaml --workdir "$RUNS/verifier" \
    train.steps="$VERIFIER_STEPS"
"$PY" -m train.pretrain --config configs/models/tiny_drafter.yaml --workdir "$RUNS/drafter_base" \
    data.seq_len=256 data.batch_size=8 train.steps="$DRAFTER_STEPS" train.warmup_steps=100
"$PY" -m train.pretrain --config configs/models/tiny_ar_drafter.yaml --workdir "$RUNS/drafter_ar" \
    train.steps="$AR_DRAFTER_STEPS" train.warmup_steps=80
"$PY" scripts/write_manifest.py --stage base --runs "$RUNS"
GEN=(-m train.generate_data --config configs/calibrate/generate_tiny.yaml)
"$PY" "${GEN[@]}" generate.num_prompts="$GEN_PROMPTS"
"$PY" "${GEN[@]}" generate.temperature=0.0 generate.samples_per_prompt=1 generate.num_prompts="$GEN_T0_PROMPTS" \
    generate.out_dir=data/verifier_completions_t0
"$PY" "${GEN[@]}" generate.temperature=1.0 generate.top_p=1.0 generate.samples_per_prompt=2 generate.seed=1 \
    generate.num_prompts="$GEN_T1_PROMPTS" generate.out_dir=data/verifier_completions_t1
CAL=(-m train.calibrate --config configs/calibrate/tiny.yaml calibrate.eval_prompts=0)
for loss in kd_first kd_window; do
  "$PY" "${CAL[@]}" --workdir "$RUNS/drafter_$loss" loss=$loss train.steps="$CALIB_STEPS"
done
"$PY" "${CAL[@]}" --workdir "$RUNS/drafter_streak_t0_stage1" loss=ce_streak \
    calibrate.data_dir=data/verifier_completions_t0 train.steps="$T0_STEPS" train.eval_every=400
"$PY" "${CAL[@]}" --workdir "$RUNS/drafter_streak_t0" loss=ce_streak calibrate.data_dir=data/verifier_completions_t0 \
    train.init_from="$RUNS/drafter_streak_t0_stage1/export" train.steps="$T0_MORE_STEPS" train.lr=5e-4 \
    train.warmup_steps=20 train.eval_every=250
"$PY" "${CAL[@]}" --workdir "$RUNS/drafter_streak_t1" loss=ce_streak calibrate.data_dir=data/verifier_completions_t1 \
    train.steps="$T1_STEPS" train.eval_every=200
# tau (tokens per verifier call) with its 95% bootstrap interval and alpha_j of every drafter in the decode kernel
# (greedy verifier, gamma 16, 96 held-out prompts); each drafter at the draft temperature it serves, base at both
"$PY" -m eval.calibration_report --out "$RUNS/report" --drafter base="$RUNS/drafter_base/export" \
    --drafter kd_first="$RUNS/drafter_kd_first/export@0" --drafter kd_window="$RUNS/drafter_kd_window/export@0" \
    --drafter streak_t0="$RUNS/drafter_streak_t0/export@0" --drafter streak_t1="$RUNS/drafter_streak_t1/export@1" \
    --draft-temperature 0 --draft-temperature 1
# the T=1 drafter where it serves: the verifier sampling at T=1 (each drafter judged on its own lossless samples)
"$PY" -m eval.calibration_report --out "$RUNS/report_served_t1" --verifier-temperature 1 --draft-temperature 1 \
    --drafter base="$RUNS/drafter_base/export" --drafter streak_t1="$RUNS/drafter_streak_t1/export"
"$PY" scripts/write_manifest.py --stage calibrated --runs "$RUNS" --kd "$KD" --report "$RUNS/report/report.json" \
    --served-report "$RUNS/report_served_t1/report.json" --serve 0=drafter_streak_t0 --serve 1=drafter_streak_t1
# the paper's findings on the shipped models (docs/REPRODUCTION.md and its plots)
"$PY" -m eval.reproduction
