#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM slice (creating the slice if it does not exist).
#
#   scripts/launch_tpu_pod.sh NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION -- COMMAND...
#
#   scripts/launch_tpu_pod.sh sd-v4 us-central2-b v4-32 tpu-ubuntu2204-base -- \
#       python -m train.pretrain --config configs/models/qwen2.5-7b.yaml --workdir gs://BUCKET/runs/q7 mesh.num_devices=0
#   scripts/launch_tpu_pod.sh sd-v5e europe-west4-b v5litepod-8 v2-alpha-tpuv5-lite -- \
#       python -m eval.benchmark --dry-run --config configs/pairs/diffucoder7b_qwen2.5-7b.yaml mesh.num_devices=0
#   scripts/launch_tpu_pod.sh sd-v5p us-east5-a v5p-16 v2-alpha-tpuv5 -- \
#       python -m eval.benchmark --config configs/bench/MY_PAIR.yaml
#
# Steps: (1) create the TPU VM slice unless `gcloud compute tpus tpu-vm describe NAME` finds it (set SPOT=1 for a
# spot slice); (2) copy this checkout (git ls-files: tracked files only, no runs/ data/ .venv) to ~/specdiff-jax
# on every worker; (3) install it into ~/specdiff-jax/.venv with jax[tpu] (skipped when the installed
# pyproject.toml is unchanged); (4) run COMMAND in ~/specdiff-jax on all workers at once, with
# SPECDIFF_DISTRIBUTED=on when the slice has more than one worker, so the programs call
# jax.distributed.initialize() (no arguments: the TPU runtime names the coordinator). gcloud streams every
# worker's output; the exit status is non-zero if the command failed on any worker.
#
# Environment: PROJECT (gcloud project; default: the configured one), SPOT=1, SKIP_INSTALL=1, JAX_TPU_SPEC
# (default "jax[tpu]"), EXTRA_ENV ("KEY=VALUE ..." exported before the command).
# Not tested on a real slice from this repository's CI (no TPU there); the dry runs it is meant to precede are.
set -euo pipefail

if [[ $# -lt 6 || "$5" != "--" ]]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
NAME=$1 ZONE=$2 TYPE=$3 RUNTIME=$4
shift 5
CMD=$(printf '%q ' "$@")
PROJECT_ARGS=()
[[ -n "${PROJECT:-}" ]] && PROJECT_ARGS=(--project "$PROJECT")
TPU=(gcloud compute tpus tpu-vm "${PROJECT_ARGS[@]}" --zone "$ZONE")
cd "$(dirname "$0")/.."

# (1) create or reuse
if ! "${TPU[@]}" describe "$NAME" >/dev/null 2>&1; then
  echo "creating $TYPE slice $NAME in $ZONE ($RUNTIME)"
  "${TPU[@]}" create "$NAME" --accelerator-type "$TYPE" --version "$RUNTIME" ${SPOT:+--spot}
else
  echo "reusing $NAME"
fi
WORKERS=$("${TPU[@]}" describe "$NAME" --format='value(networkEndpoints.len())' 2>/dev/null || echo 1)
WORKERS=${WORKERS:-1}
echo "$NAME has $WORKERS worker(s)"

# (2) copy the code (tracked files only)
TARBALL=$(mktemp -t specdiff-jax.XXXXXX.tgz)
trap 'rm -f "$TARBALL"' EXIT
git ls-files -z | tar --null -czf "$TARBALL" -T -
"${TPU[@]}" scp "$TARBALL" "$NAME:/tmp/specdiff-jax.tgz" --worker=all
"${TPU[@]}" ssh "$NAME" --worker=all --command \
  "mkdir -p ~/specdiff-jax && tar -xzf /tmp/specdiff-jax.tgz -C ~/specdiff-jax"

# (3) install (once per pyproject.toml)
if [[ -z "${SKIP_INSTALL:-}" ]]; then
  "${TPU[@]}" ssh "$NAME" --worker=all --command "cd ~/specdiff-jax && \
    if ! cmp -s pyproject.toml .venv/.pyproject 2>/dev/null; then \
      (test -x .venv/bin/python || python3 -m venv .venv) && \
      .venv/bin/pip install -q --upgrade pip && \
      .venv/bin/pip install -q '${JAX_TPU_SPEC:-jax[tpu]}' && \
      .venv/bin/pip install -q -e . && cp pyproject.toml .venv/.pyproject; fi"
fi

# (4) the same command on every worker
DIST=off
[[ "$WORKERS" -gt 1 ]] && DIST=on
"${TPU[@]}" ssh "$NAME" --worker=all --command \
  "cd ~/specdiff-jax && export SPECDIFF_DISTRIBUTED=$DIST ${EXTRA_ENV:-} && PATH=\$HOME/specdiff-jax/.venv/bin:\$PATH $CMD"
