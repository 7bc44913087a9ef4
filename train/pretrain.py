"""Pre-train a verifier, AR drafter (objective ar) or block-causal diffusion drafter (objective mdlm).

    python -m train.pretrain --config configs/models/tiny_verifier.yaml --workdir runs/verifier [key=value ...]

Overrides use dotted keys (`train.steps=100 model.num_layers=4`); every key is listed in configs/defaults.yaml.
Rerunning the same command on the same work dir resumes from its latest checkpoint. SIGTERM / Ctrl-C finish the
current step, save a checkpoint and exit 0 (rerun to resume). The final model is exported to <workdir>/export.
Exit status: 0 done or interrupted-and-saved, 1 training stopped (diverged, busy work dir), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys

from specdiff_jax.cli import fail, interrupted_message, run_program
from specdiff_jax.config import ConfigError
from specdiff_jax.config.run import load_config, to_yaml
from specdiff_jax.distributed import initialize
from specdiff_jax.dryrun import COMPILED_HELP, compiled_layers
from specdiff_jax.dryrun import run as dry_run
from specdiff_jax.training import train


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML run config (e.g. configs/models/tiny_verifier.yaml)")
    p.add_argument("--workdir", default=None, help="output directory (same as the override workdir=DIR)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true", help="build the mesh (mesh.num_devices > 0: abstract), print "
                   "per-device memory and parameter shardings, allocate nothing; exit 2 if it does not fit")
    p.add_argument("--compiled", action="store_true", help=COMPILED_HELP)
    p.add_argument("--compiled-layers", default="2,4", metavar="L1,L2", help="the two layer counts compiled")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides with dotted keys")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"workdir={args.workdir}"] if args.workdir is not None else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        return fail(e)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if args.dry_run:
        try:
            layers = compiled_layers(args.compiled_layers) if args.compiled else None
        except ConfigError as e:
            return fail(e)
        return run_program(lambda: dry_run(cfg, "train", compiled=layers))[0] or 0
    if not cfg.workdir:
        return fail("no work dir: pass --workdir DIR (or workdir=DIR)")

    def body():
        initialize(cfg.mesh)  # multi-process jobs (config keys or JAX_* environment); before any device use
        return train(cfg, cfg.workdir)

    status, result = run_program(body)
    if status is not None:
        return status
    if result.status == "interrupted":
        print(interrupted_message(result))
        return 0
    val = f", validation loss {result.val['loss']:.4f} ({result.val['bits_per_token']:.4f} bits/token)" \
        if result.val else ""
    print(f"done: {result.step} steps{val}; checkpoint {result.checkpoint}; model exported to {result.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
