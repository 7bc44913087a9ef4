"""Grow a trained model function-preservingly (specdiff_jax.growth) and write it as a model directory.

    python -m train.grow --from assets/tiny/drafter_streak_t0 --out runs/grown/drafter_4x128 --num-layers 4
    python -m train.grow --from assets/tiny/drafter_streak_t0 --out runs/grown/drafter_2x256 \
        --hidden-size 256 --num-heads 4 --intermediate-size 768

The output computes the same logits as the input (deeper: exactly; wider: up to float rounding) and is an
ordinary model directory: calibrate or pre-train it further with `train.init_from=<out>` (its model section is
taken from there). Depth growth runs first when both are asked for. Exit status 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys

from specdiff_jax.cli import fail, run_program


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.grow", description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="src", required=True, help="model directory to grow")
    p.add_argument("--out", required=True, help="where the grown model directory is written")
    p.add_argument("--num-layers", type=int, default=None, help="layers of the grown model")
    p.add_argument("--hidden-size", type=int, default=None, help="residual width of the grown model")
    p.add_argument("--num-heads", type=int, default=None, help="query heads of the grown model (head size kept)")
    p.add_argument("--intermediate-size", type=int, default=None, help="MLP width of the grown model")
    p.add_argument("--seed", type=int, default=0, help="seed of the new input-direction weights (width growth)")
    return p.parse_args(argv)


def grow(args):
    import numpy as np

    from specdiff_jax import growth
    from specdiff_jax.checkpoint import load_metadata, save_pretrained
    from specdiff_jax.config import ConfigError
    from specdiff_jax.hf_checkpoint import load_pretrained

    model = load_pretrained(args.src)
    cfg = model.cfg
    width = (args.hidden_size, args.num_heads, args.intermediate_size)
    if args.num_layers is None and all(w is None for w in width):
        raise ConfigError("nothing to grow: pass --num-layers and/or --hidden-size / --num-heads / "
                          "--intermediate-size")
    grown = model
    if args.num_layers is not None:
        grown = growth.grow_depth(grown, args.num_layers)
    if any(w is not None for w in width):
        d = args.hidden_size or cfg.hidden_size
        grown = growth.grow_width(grown, d, args.num_heads or cfg.num_heads * d // cfg.hidden_size,
                                  args.intermediate_size or cfg.intermediate_size * d // cfg.hidden_size,
                                  seed=args.seed)
    tokens = np.arange(min(48, cfg.max_seq_len), dtype=np.int32)[None] % cfg.vocab_size
    diff = float(np.max(np.abs(np.asarray(grown(tokens)) - np.asarray(model(tokens)))))
    meta = {"grown_from": str(args.src), "source_metadata": load_metadata(args.src),
            "growth": {k: getattr(grown.cfg, k) for k in ("num_layers", "hidden_size", "num_heads",
                                                           "intermediate_size")},
            "max_abs_logit_change": diff}
    save_pretrained(grown, args.out, metadata=meta)
    print(f"{cfg.num_layers} x {cfg.hidden_size} ({cfg.num_params() / 1e6:.2f}M) -> {grown.cfg.num_layers} x "
          f"{grown.cfg.hidden_size} ({grown.cfg.num_params() / 1e6:.2f}M) written to {args.out}; "
          f"max |logit change| on a probe row {diff:.2e}")
    return grown


def main(argv=None) -> int:
    args = parse_args(argv)
    status, _ = run_program(lambda: grow(args))
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
