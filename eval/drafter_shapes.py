"""Drafter shape and calibration budget against predicted speed-up: tau of trained drafters, round cost of their
shapes on this machine, and tau / round cost at each draft length.

    python -m eval.drafter_shapes --drafter control=DIR --drafter grown_3x128=DIR ... [--report REPORT_JSON]
        [--out results/drafter_shapes] [--gammas 2,4,8,16]
    python -m eval.drafter_shapes --tau 4.58          # costs only, for the shapes in SHAPES

Predicted speed-up over AR decoding at draft length g = E[tokens per round | g] / (round cost / AR step cost).
The acceptance side comes from `eval.calibration_report` (greedy verifier, argmax drafts, gamma = the drafters'
block size, its 96 held-out prompts; run by this program unless `--report` names its report.json), with
E[tokens per round | g] = 1 + sum_{j <= g} P(a round accepts >= j drafts), the auto planner's rule for a smaller g
(`decode.planner.expected_tokens`). The cost side is `decode.cost`'s model on this machine: one `cost.measure`
(verifier forwards by query count, the AR step, the part of a round outside the models), then each shape's drafter
forwards timed the same way in the same process (`timing.time_forward`, random weights: cost does not depend on
them), so the shapes differ only by their drafter forwards. A round is one drafter call (gamma block positions,
prefix cached) plus one verifier forward over gamma + 1 positions plus the fixed part.

Writes <out>/drafter_shapes.json, <out>/drafter_shapes.md (the table docs/CALIBRATION.md quotes) and
<out>/drafter_shapes.png. The first --drafter is the control the others are compared with (paired bootstrap over
prompts of their tau ratio).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

SHAPES = ((2, 128), (3, 128), (4, 128), (2, 256), (4, 256))  # (layers, hidden); head_dim 64, MLP 3x hidden
GAMMAS = (2, 4, 8, 16)
# The calibration-budget axis: ce_streak from drafter_base (2 x 128) on greedy verifier completions, argmax drafts,
# gamma 16, the same 96 prompts (docs/CALIBRATION.md). Only tau at gamma 16 is recorded for the first two.
BUDGET_POINTS = (
    {"data": "1,536 greedy completions", "steps": "800 (lr 1e-3)", "tau": 3.293, "tau_ci95": None},
    {"data": "4,096 greedy completions", "steps": "1400 (lr 1e-3)", "tau": 4.428, "tau_ci95": [4.05, 4.87]},
    {"data": "4,096 greedy completions", "steps": "1400 (lr 1e-3) + 500 (lr 5e-4) = drafter_streak_t0",
     "tau": 4.580, "tau_ci95": [4.18, 5.05]},
)


def shape_config(cfg, layers: int, hidden: int):
    return dataclasses.replace(cfg, num_layers=layers, hidden_size=hidden, num_heads=max(1, hidden // 64),
                               num_kv_heads=1, head_dim=64, intermediate_size=3 * hidden)


def shape_costs(verifier, control, cfgs: dict, ctx: int, gammas, log=print) -> tuple[dict, dict]:
    """Round cost in AR steps at each gamma for each named drafter config, from one cost model of `verifier` with
    `control` and each config's own drafter forwards. Returns ({name: {gamma: round / ar}}, {name: draft ms})."""
    from specdiff_jax.decode import cost
    from specdiff_jax.timing import random_model

    cm = cost.measure(verifier, {"block": control}, batch=1, ctx=ctx, use_cache=False, progress=log)
    ar = cm.round_ms("none", 0)
    cap_v = min(verifier.cfg.max_seq_len, cm.ctx + max(cost.VERIFIER_QS))
    length = min(cm.ctx, cap_v - max(cost.VERIFIER_QS))  # the cached length measure() times the drafter at
    rounds, drafts = {}, {}
    for name, cfg in cfgs.items():
        _, ms = cost.drafter_forward_ms(random_model(cfg), "block", batch=1, ctx=cm.ctx, length=length)
        c = dataclasses.replace(cm, drafter_ms={"block": ms})
        rounds[name] = {g: c.round_ms("block", g) / ar for g in gammas}
        drafts[name] = {g: c.draft_ms("block", g) for g in gammas}
        log(f"{name}: round / AR step " + ", ".join(f"g{g} {rounds[name][g]:.2f}" for g in gammas))
    meta = {"ar_ms": ar, "verify_ms": {g: cm.verify_ms(g + 1) for g in gammas}, "ctx": cm.ctx,
            "fixed_ms": cm.fixed_ms, "overhead": cm.overhead, "device": cm.device}
    return rounds, {"draft_ms": drafts, **meta}


def acceptance(report: dict, names) -> dict:
    """The argmax-draft kernel rows of a calibration report, by drafter name."""
    rows = {r["drafter"]: r for r in report["kernel"] if r["draft_temperature"] == 0.0}
    missing = [n for n in names if n not in rows]
    if missing:
        raise ValueError(f"the calibration report has no argmax-draft row for {missing}; rerun it with these "
                         "--drafter names and --draft-temperature 0, or drop --report to have it run here")
    return rows


def drafter_rows(acc: dict, cfgs: dict, rounds: dict, gammas, control: str) -> list[dict]:
    from eval.calibration_report import bootstrap_ratio
    from specdiff_jax.decode.planner import expected_tokens

    c = acc[control]
    out = []
    for name, cfg in cfgs.items():
        r = acc[name]
        tau_g = {g: expected_tokens(r["accept_rate"], g) for g in gammas}
        speed = {g: tau_g[g] / rounds[name][g] for g in gammas}
        best = max(gammas, key=lambda g: speed[g])
        row = {"drafter": name, "path": r.get("path"), "layers": cfg.num_layers, "hidden": cfg.hidden_size,
               "parameters": cfg.num_params(), "tau": r["tokens_per_verifier_call"], "tau_ci95": r["tau_ci95"],
               "tau_by_gamma": tau_g, "round_over_ar": rounds[name], "speedup": speed, "best_gamma": best,
               "best_speedup": speed[best]}
        if name != control:
            row["tau_vs_control_ci95"] = list(bootstrap_ratio(r["row_tokens"], r["row_verifier_calls"],
                                                              c["row_tokens"], c["row_verifier_calls"]))
            row["tau_vs_control"] = row["tau"] / c["tokens_per_verifier_call"]
        out.append(row)
    return out


def render(rows: list[dict], shapes: list[dict], budget: list[dict], meta: dict, gammas, command: str) -> str:
    gs = " | ".join(f"g={g}" for g in gammas)
    lines = [f"Reproduce: `{command}`", "",
             f"Costs on {meta['device']}: AR step {meta['ar_ms']:.2f} ms, context {meta['ctx']}; round cost in AR "
             "steps (draft + verify + fixed part); predicted speed-up = E[tokens per round | g] / round cost.", "",
             f"| drafter | shape | parameters | tau (g=16) [95% CI] | vs control [95% paired CI] | round cost: {gs} | "
             f"predicted speed-up: {gs} | best |",
             "|---|---|---|---|---|" + "---|" * (2 * len(gammas)) + "---|"]
    for r in rows:
        lo, hi = r["tau_ci95"]
        vs = (f"{r['tau_vs_control'] - 1:+.1%} [{r['tau_vs_control_ci95'][0] - 1:+.1%}, "
              f"{r['tau_vs_control_ci95'][1] - 1:+.1%}]" if "tau_vs_control" in r else "(control)")
        lines.append(f"| {r['drafter']} | {r['layers']} x {r['hidden']} | {r['parameters'] / 1e6:.2f}M | "
                     f"{r['tau']:.3f} [{lo:.2f}, {hi:.2f}] | {vs} | "
                     + " | ".join(f"{r['round_over_ar'][g]:.2f}" for g in gammas) + " | "
                     + " | ".join(f"{r['speedup'][g]:.2f}x" for g in gammas)
                     + f" | **{r['best_speedup']:.2f}x** (g={r['best_gamma']}) |")
    lines += ["", "Cost only (random weights; the last column is the tau at the largest g this shape needs for the "
              "control's best predicted speed-up):", "", f"| shape | parameters | round cost: {gs} | tau needed |",
              "|---|---|" + "---|" * (len(gammas) + 1)]
    for s in shapes:
        lines.append(f"| {s['layers']} x {s['hidden']} | {s['parameters'] / 1e6:.2f}M | "
                     + " | ".join(f"{s['round_over_ar'][g]:.2f}" for g in gammas)
                     + f" | {s.get('tau_to_match', float('nan')):.2f} |")
    lines += ["", "Calibration budget (2 x 128, ce_streak from drafter_base, the 2 x 128 round cost above):", "",
              "| data | steps | tau (g=16) [95% CI] | predicted speed-up at g=16 |", "|---|---|---|---|"]
    for b in budget:
        ci = f" [{b['tau_ci95'][0]:.2f}, {b['tau_ci95'][1]:.2f}]" if b["tau_ci95"] else ""
        lines.append(f"| {b['data']} | {b['steps']} | {b['tau']:.3f}{ci} | {b['speedup_g16']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[dict], gammas) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        lab = f"{r['drafter']} ({r['layers']}x{r['hidden']})"
        a.plot(gammas, [r["speedup"][g] for g in gammas], marker="o", label=lab)
        lo, hi = r["tau_ci95"]
        b.errorbar([r["round_over_ar"][16] if 16 in gammas else r["round_over_ar"][gammas[-1]]], [r["tau"]],
                   yerr=[[r["tau"] - lo], [hi - r["tau"]]], marker="o", capsize=3, label=lab)
    a.set(xlabel="draft length g", ylabel="predicted speed-up over AR", xscale="log", xticks=list(gammas),
          xticklabels=[str(g) for g in gammas], title="tau(g) / round cost(g)")
    b.set(xlabel=f"round cost at g={16 if 16 in gammas else gammas[-1]} (AR steps)", ylabel="tau at g=16 (95% CI)",
          title="acceptance against cost")
    a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.drafter_shapes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--verifier", default="assets/tiny/verifier")
    ap.add_argument("--drafter", action="append", default=[], metavar="NAME=DIR",
                    help="a trained drafter (repeatable); the first is the control")
    ap.add_argument("--report", default=None, help="report.json of eval.calibration_report on these drafters "
                    "(default: run it here, into <out>/report)")
    ap.add_argument("--template", default="assets/tiny/drafter_base", help="config template of the SHAPES")
    ap.add_argument("--gammas", default=",".join(map(str, GAMMAS)))
    ap.add_argument("--ctx", type=int, default=192, help="context length the costs are measured at")
    ap.add_argument("--tau", type=float, default=None, help="costs only: the measured tau of the template shape")
    ap.add_argument("--out", default="results/drafter_shapes")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from specdiff_jax import load_pretrained
    from specdiff_jax.cli import fail

    args = parse_args(argv)
    gammas = tuple(int(g) for g in args.gammas.split(",") if g)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        pairs = dict(d.split("=", 1) for d in args.drafter)
    except ValueError:
        return fail(f"--drafter {args.drafter!r}: each must be NAME=DIR")
    v = load_pretrained(args.verifier)
    template = load_pretrained(args.template)
    models = {k: load_pretrained(p) for k, p in pairs.items()}
    cfgs = {k: m.cfg for k, m in models.items()}
    shape_cfgs = {f"{l} x {h}": shape_config(template.cfg, l, h) for l, h in SHAPES}
    control = next(iter(pairs), None)
    report = None
    if pairs:
        if args.report:
            report = json.loads(Path(args.report).read_text())
        else:
            from eval import calibration_report as cr

            report = cr.run(cr.parse_args(sum((["--drafter", f"{k}={p}@0"] for k, p in pairs.items()), [])
                                          + ["--draft-temperature", "0", "--out", str(out / "report")]))
        acc = acceptance(report, pairs)
    rounds, meta = shape_costs(v, models.get(control, template), {**cfgs, **shape_cfgs}, args.ctx, gammas)
    rows = drafter_rows(acc, cfgs, rounds, gammas, control) if pairs else []
    ref = next((r for r in rows if r["drafter"] == control), None)
    shapes = []
    for name, cfg in shape_cfgs.items():
        s = {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "parameters": cfg.num_params(),
             "round_over_ar": rounds[name]}
        # the tau at the largest gamma this shape needs for the control's best speed-up (or --tau's at 2 x 128)
        target = ref["best_speedup"] if ref else (args.tau / rounds["2 x 128"][max(gammas)] if args.tau else None)
        if target:
            s["tau_to_match"] = target * rounds[name][max(gammas)]
        shapes.append(s)
    base_round = rounds["2 x 128"][16] if 16 in gammas else None
    budget = [dict(b, speedup_g16=b["tau"] / base_round if base_round else float("nan")) for b in BUDGET_POINTS]
    command = "python -m eval.drafter_shapes " + " ".join(f"--drafter {k}={p}" for k, p in pairs.items())
    result = {"gammas": list(gammas), "cost": meta, "drafters": rows, "shapes": shapes, "budget": budget,
              "control": control, "command": command}
    (out / "drafter_shapes.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "drafter_shapes.md").write_text(render(rows, shapes, budget, meta, gammas, command))
    if rows:
        plot(out / "drafter_shapes.png", rows, gammas)
    print((out / "drafter_shapes.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
