#!/usr/bin/env bash
# Accelerator evidence in one command (docs/ACCELERATOR.md): the 7B-scale cost curve, the embedded default end to
# end and one training-throughput figure, written to one folder, in at most 8 minutes on one GPU.
#   scripts/accelerator_bench.sh [OUT_DIR] [--smoke] [--time-budget SECONDS] [--sections cost,e2e,train]
# OUT_DIR defaults to results/accelerator; the output of the run is also kept in OUT_DIR/log.txt. The Python is
# $PY, else .venv/bin/python where it exists, else python3 (a GPU image's own). Exit status: 0 when every section
# finished (a section cut short by its time budget counts as finished), 1 when one failed or was killed (the
# figures measured before that are still written), 2 for bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=results/accelerator
if [[ $# -gt 0 && $1 != -* ]]; then OUT=$1; shift; fi
if [[ -z ${PY:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
"$PY" -m eval.accelerator_bench --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
