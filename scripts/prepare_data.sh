#!/usr/bin/env bash
# One command that reproduces the default data assets from scratch:
#   1. the corpus: this interpreter's stdlib (tests excluded) + pure-Python site-packages (capped), de-duplicated,
#      HumanEval-decontaminated, split train/validation by file hash, written as a TFDS array_record dataset under
#      DATA_DIR/python_source/1.0.0 (DATA_DIR is git-ignored);
#   2. the tokenizer: sentencepiece BPE (vocab 4096) trained on the train split, written to assets/tiny/
#      (tokenizer.model, tokenizer.vocab, tokenizer_config.json).
# Usage: bash scripts/prepare_data.sh [DATA_DIR=data] [extra args for python -m specdiff_jax.data.prepare]
#   e.g. bash scripts/prepare_data.sh data --overwrite --source-dir stdlib --source-dir site-packages --source-dir ~/src
# Takes about a minute on 2 CPU cores. The corpus depends on what is installed in the interpreter running it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA_DIR=${1:-data}
shift || true
exec "$PY" -m specdiff_jax.data.prepare --data-dir "$DATA_DIR" --tokenizer-dir assets/tiny --vocab-size 4096 "$@"
