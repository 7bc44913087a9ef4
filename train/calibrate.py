"""Calibrate (align) a block-causal diffusion drafter to its verifier on verifier-generated data (docs/METHOD.md §6).

    python -m train.calibrate --config configs/calibrate/tiny.yaml --workdir runs/drafter_streak loss=streak
    python -m train.calibrate --config configs/calibrate/tiny.yaml --workdir runs/drafter_kd_window loss=kd_window

`loss=X` is short for `calibrate.loss=X` (streak | ce_streak | kd_first | kd_window | mdlm); every other key of
configs/defaults.yaml may be overridden with its dotted name. The drafter starts from `train.init_from` (its model
config is taken from there), trains on the windows of `calibrate.data_dir` (train/generate_data.py) with the
pre-training loop of specdiff_jax.training (same optimizer, sharding, Orbax checkpoints with exact resume,
progress bar, metrics.jsonl / TensorBoard; rerun the same command to resume), the verifier frozen. Training
metrics include the expected streak and alpha_1 / alpha_mid / alpha_last on the training windows; the validation
loss is on held-out windows (the dataset's validation split). At the end the exported drafter (<workdir>/export)
is evaluated on held-out windows (expected streak, alpha_j) and, with the verifier, by the decode kernel
(greedy; tokens per verifier call, alpha_j) on held-out prompts: <workdir>/calibration_eval.json.
Exit status: 0 done or interrupted-and-saved, 1 training stopped, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specdiff_jax.calibration.run import EVAL_FILE, resolve, run  # noqa: F401  EVAL_FILE: where run() writes
from specdiff_jax.cli import fail, interrupted_message, run_program
from specdiff_jax.config import ConfigError, ModelConfig
from specdiff_jax.config.run import load_config, to_yaml
from specdiff_jax.distributed import initialize
from specdiff_jax.dryrun import COMPILED_HELP, compiled_layers
from specdiff_jax.dryrun import run as dry_run


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML run config (e.g. configs/calibrate/tiny.yaml)")
    p.add_argument("--workdir", default=None, help="output directory (same as workdir=DIR)")
    p.add_argument("--no-eval", action="store_true", help="skip the final held-out / kernel evaluation")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true", help="per-device memory of a calibration step on the config's "
                   "mesh (model section = the drafter), nothing allocated; exit 2 if it does not fit")
    p.add_argument("--compiled", action="store_true", help=COMPILED_HELP)
    p.add_argument("--compiled-layers", default="2,4", metavar="L1,L2", help="the two layer counts compiled")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides; loss=X means calibrate.loss=X")
    return p.parse_intermixed_args(argv)


def _overrides(args) -> list[str]:
    out = [f"calibrate.{o}" if o.split("=", 1)[0] == "loss" else o for o in args.overrides]
    return out + ([f"workdir={args.workdir}"] if args.workdir is not None else [])


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, _overrides(args))
        if args.print_config:
            print(to_yaml(resolve(cfg)[0]), end="")
            return 0
    except (ConfigError, FileNotFoundError) as e:
        return fail(e)
    if args.dry_run:  # shapes only: the drafter's architecture comes from the config, no dataset is read
        mc = Path(cfg.train.init_from or "") / "model_config.json"
        if cfg.train.init_from and mc.is_file():  # the drafter's own config when it exists (as resolve() does)
            cfg = cfg.replace(model=ModelConfig.load(mc))
        try:
            layers = compiled_layers(args.compiled_layers) if args.compiled else None
        except ConfigError as e:
            return fail(e)
        return run_program(lambda: dry_run(cfg, "train", compiled=layers))[0] or 0
    if not cfg.workdir:
        return fail("no work dir: pass --workdir DIR (or workdir=DIR)")

    def body():
        initialize(cfg.mesh)  # multi-process jobs (config keys or JAX_* environment); before any device use
        return run(cfg, evaluate_after=not args.no_eval)

    status, out = run_program(body)
    if status is not None:
        return status
    result, _ = out
    if result.status == "interrupted":
        print(interrupted_message(result))
        return 0
    val = f", held-out {cfg.calibrate.loss} loss {result.val['loss']:.4f}" if result.val else ""
    print(f"done: {result.step} steps{val}; model exported to {result.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
