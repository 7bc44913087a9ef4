"""What a stronger drafter must buy: measured round cost of drafter shapes (depth x width) against the verifier.

    python -m eval.drafter_shapes [--out results/drafter_shapes.json] [--tau 3.9]

Speed-up over AR decoding = tau / (round cost / AR step cost), where a round is one drafter call (gamma block
positions, prefix cached) plus one verifier forward over gamma + 1 positions. Each shape is timed with the cost
model's own timing (`decode.cost.measure`, batch 1, greedy, argmax drafts; random weights: cost does not depend on
them); `--tau` (the shipped drafter's measured tau) gives the predicted speed-up of the shipped shape and, for every
other shape, the tau it would need to match it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

SHAPES = ((2, 128), (4, 128), (2, 256), (4, 256))  # (layers, hidden); heads keep head_dim 64, MLP 3x hidden


def shape_config(cfg, layers: int, hidden: int):
    return dataclasses.replace(cfg, num_layers=layers, hidden_size=hidden, num_heads=max(1, hidden // 64),
                               num_kv_heads=1, head_dim=64, intermediate_size=3 * hidden)


def main(argv=None) -> int:
    from flax import nnx

    from specdiff_jax import load_pretrained
    from specdiff_jax.decode import cost
    from specdiff_jax.model import Transformer

    ap = argparse.ArgumentParser(prog="python -m eval.drafter_shapes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--verifier", default="assets/tiny/verifier")
    ap.add_argument("--drafter", default="assets/tiny/drafter_base", help="the shipped shape (config template)")
    ap.add_argument("--gamma", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=192, help="context length the costs are measured at")
    ap.add_argument("--tau", type=float, default=None, help="measured tau of the shipped shape")
    ap.add_argument("--out", default="results/drafter_shapes.json")
    args = ap.parse_args(argv)
    v = load_pretrained(args.verifier)
    base = load_pretrained(args.drafter).cfg
    rows = []
    for layers, hidden in SHAPES:
        cfg = shape_config(base, layers, hidden)
        d = Transformer(cfg, rngs=nnx.Rngs(0))
        cm = cost.measure(v, {"block": d}, batch=1, ctx=args.ctx, use_cache=False)
        ar, rnd = cm.round_ms("none", 0), cm.round_ms("block", args.gamma)
        rows.append({"layers": layers, "hidden": hidden, "parameters": cfg.num_params(), "ar_ms": ar,
                     "round_ms": rnd, "draft_ms": cm.draft_ms("block", args.gamma),
                     "verify_ms": cm.verify_ms(args.gamma + 1), "round_over_ar": rnd / ar})
        print(f"{layers} x {hidden} ({cfg.num_params() / 1e6:.2f}M): round {rnd:.2f} ms = {rnd / ar:.2f} AR steps "
              f"(draft {rows[-1]['draft_ms']:.2f} ms, verify {rows[-1]['verify_ms']:.2f} ms)")
    ref = next(r for r in rows if (r["layers"], r["hidden"]) == (base.num_layers, base.hidden_size))
    if args.tau:
        for r in rows:
            r["tau_to_match_shipped"] = args.tau * r["round_over_ar"] / ref["round_over_ar"]
        ref["predicted_speedup"] = args.tau / ref["round_over_ar"]
        print(f"shipped shape: predicted speed-up {ref['predicted_speedup']:.2f}x at tau {args.tau}; to match it: "
              + ", ".join(f"{r['layers']}x{r['hidden']} tau {r['tau_to_match_shipped']:.2f}" for r in rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"gamma": args.gamma, "ctx": args.ctx, "tau": args.tau, "rows": rows},
                                         indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
