"""The cost model of a verifier-drafter pair on a device: what a decode round costs, measured or predicted.

A speculative round costs one verifier forward over Q = K * (gamma + 1) query tokens against the KV cache (the
kernel verifies K chains as ONE sequence with a block-diagonal causal mask, so this is the verifier's cost at that
Q), the drafter's forwards, and a part outside the models (sampling, selection, acceptance, cache and sequence
writes, bookkeeping):

    t_round = t_verify(K * (gamma + 1)) + t_draft(kind, gamma, K, T) + t_rest(kind, gamma, K, temperatures)
    t_rest  = a + b * (gamma + 1) + c * (K - 1) * (gamma + 1)        [+ sampling terms at temperature > 0]

The rest is not proportional to Q: the K chains share one drafter forward and one set of step-1 marginals, so a
chain beyond the first costs c (its drafts' sampling, its verified positions' probabilities, selection), measured
on a K > 1 decode, not b. A decode call adds a fixed `call_ms` (starting the loop, its output buffers, the final statistics), which
short decodes feel: a call of R rounds costs call_ms + R * t_round.

`measure` times the real forwards on this device (bare `Transformer.forward` calls inside a jitted loop, so
dispatch is excluded), and the part of a round outside the forwards from short real decodes (`OVERHEAD_POINTS`,
all compiled first and then timed in turn, so that a change in the machine's load hits every setting alike):
`ar` at two decode lengths (the difference is the per-step cost, the rest the per-call cost), each speculative
drafter kind at two draft lengths and the block drafter once with K > 1 drafts, and `ar` and the AR drafter at
temperature 1 once (sampling's extra cost). One more decode per kind that no fit used (`VALIDATION_POINTS`) measures the model's own
prediction error, `error`, which the planner takes as its margin. The result is cached on disk under a key of the
device kind, the models' fingerprints, the batch and the context bucket, so another device or another model never
reuses it. `analytic` predicts the same curves from FLOPs and bytes for a named accelerator (peak FLOP/s and memory
bandwidth in `ACCELERATORS`), to ask what a pair would do on hardware one does not have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from specdiff_jax.decode.core import Decoder
from specdiff_jax.timing import time_forward

VERIFIER_QS = (1, 2, 3, 5, 9, 17, 33, 65)
DRAFTER_QS = (2, 3, 5, 9, 17, 33)
BIDIR_WINDOW = 512  # committed tokens a bidirectional drafter re-encodes per round (Decoder's draft_window)
AR_DRAFTER_QS = (1, 2)  # an AR drafter only ever runs the 1-2 pending tokens, then one-token steps
CACHE_VERSION = "v4"  # bump whenever what `measure` records changes
# per drafter kind: (method, gamma, K) of the greedy decodes the rest of a round is fitted on
# (the K > 1 point at gamma 8: the K term is then extrapolated at most twofold to the gamma-16 rows people run)
OVERHEAD_POINTS = {"ar": (("sps", 2, 1), ("sps", 8, 1)),
                   "block": (("specdiff2", 2, 1), ("specdiff2", 8, 1), ("specdiff2", 8, 4))}
SAMPLED_POINT = ("sps", 8, 1)  # timed again at temperature 1: what sampling adds per drafted token
VALIDATION_POINTS = {"ar": ("sps", 4, 1), "block": ("specdiff2", 2, 4)}  # held out: the model's prediction error
TIMING_REPEATS = 5  # timed calls of each decode (median)
MIN_ERROR = 0.05  # the error never claimed below this (repeated timings of one decode spread about this much)
ANALYTIC_ERROR = 0.15  # analytic models are not checked against any timing: the error the issue allows a model
# name -> (peak dense bf16 FLOP/s, memory bandwidth bytes/s, fixed per-round overhead in ms), per chip
ACCELERATORS = {
    "tpu-v5e": (197e12, 819e9, 0.05),
    "tpu-v5p": (459e12, 2765e9, 0.05),
    "tpu-v6e": (918e12, 1640e9, 0.05),
    "h100": (989e12, 3350e9, 0.03),
    "h200": (989e12, 4800e9, 0.03),
    "a100": (312e12, 2039e9, 0.03),
}


def cache_dir() -> Path:
    """Where measured cost models and acceptance profiles are kept ($SPECDIFF_JAX_CACHE or ~/.cache)."""
    return Path(os.environ.get("SPECDIFF_JAX_CACHE", Path.home() / ".cache" / "specdiff_jax"))


def fingerprint(model) -> str:
    """A short hash of a model's config, parameter shapes and a sample of its values: equal only for the same
    weights in practice (cheap: it reads a few values of each array)."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.cfg), sort_keys=True, default=str).encode())
    for path, x in sorted(jax.tree_util.tree_leaves_with_path(nnx.state(model)), key=lambda kv: str(kv[0])):
        a = np.asarray(x).reshape(-1)
        h.update(f"{jax.tree_util.keystr(path)}{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a[:: max(1, a.size // 64)][:64]).tobytes())
    return h.hexdigest()[:16]


def device_kind() -> str:
    d = jax.devices()[0]
    return f"{jax.default_backend()}:{d.device_kind}"


def ctx_bucket(n: int) -> int:
    return max(64, 1 << (max(n, 1) - 1).bit_length())


def _interp(qs, ms, q: float) -> float:
    """Piecewise-linear in Q, extrapolated linearly past the last measured point."""
    qs, ms = list(qs), list(ms)
    if q <= qs[-1]:
        return float(np.interp(q, qs, ms))
    slope = (ms[-1] - ms[-2]) / (qs[-1] - qs[-2])
    return ms[-1] + slope * (q - qs[-1])


@dataclasses.dataclass
class CostModel:
    """Milliseconds of a verifier forward by query count, of drafter forwards by kind, and the fixed round part."""

    source: str  # "measured" or "analytic:<accelerator>"
    device: str
    batch: int
    ctx: int  # context length (cache entries) the curves were taken at
    verifier_q: tuple
    verifier_ms: tuple
    drafter_q: dict  # kind -> query counts
    drafter_ms: dict  # kind -> ms
    fixed_ms: float  # ar: ms per step outside the verifier forward
    window: int = 0  # bidirectional drafters: committed tokens re-encoded per round
    # speculative rounds, per drafter kind: ms outside the modelled forwards
    # = a + b * (gamma + 1) + c * (K - 1) * (gamma + 1)  (a, b, c)
    overhead: dict = dataclasses.field(default_factory=dict)
    call_ms: float = 0.0  # per decode call, whatever its length
    # what sampling adds: ms per round when the verifier samples (temperature > 0), ms per token an AR drafter
    # samples (draft temperature > 0)
    sampled_round_ms: float = 0.0
    sampled_draft_ms: float = 0.0
    error: float = 0.0  # relative error of the modelled round time on decodes the fits did not use

    def call_ms_per_round(self, new_tokens: int, expected_tokens: float) -> float:
        """The per-call cost spread over the rounds of a `new_tokens` decode emitting `expected_tokens` a round."""
        return self.call_ms * expected_tokens / max(new_tokens, 1)

    def verify_ms(self, q: int) -> float:
        return _interp(self.verifier_q, self.verifier_ms, q)

    def draft_ms(self, kind: str, gamma: int, num_drafts: int = 1, steps: int = 1) -> float:
        if kind == "none":
            return 0.0
        f = lambda q: _interp(self.drafter_q[kind], self.drafter_ms[kind], q)  # noqa: E731
        if kind == "ar":  # the 1-2 pending tokens, then gamma - 1 one-token steps
            return f(2) + (gamma - 1) * f(1)
        if kind == "block":  # pending (<= gamma + 1) + gamma MASKs in one forward; T - 1 block re-runs
            return f(2 * gamma + 1) + (min(steps, gamma) - 1) * f(num_drafts * gamma)
        return min(steps, gamma) * f(self.window + gamma) * (num_drafts if steps > 1 else 1)  # bidir

    def round_overhead_ms(self, kind: str, gamma: int = 0, num_drafts: int = 1, temperature: float = 0.0,
                          draft_temperature: float = 0.0) -> float:
        """ms of a round outside the models' forwards (sampling, selection, acceptance, cache and sequence writes)."""
        sampled = self.sampled_round_ms if temperature > 0 else 0.0
        if kind == "none" or kind not in self.overhead:
            return self.fixed_ms + sampled
        a, b, c = (tuple(self.overhead[kind]) + (0.0,))[:3]
        rest = a + b * (gamma + 1) + c * (num_drafts - 1) * (gamma + 1)
        if kind == "ar" and draft_temperature > 0:
            rest += self.sampled_draft_ms * gamma
        return max(self.fixed_ms, rest) + sampled

    def verify_q(self, kind: str, gamma: int, num_drafts: int = 1) -> int:
        """Query tokens of a round's verifier forward: K chains of gamma + 1 in one sequence (1 for ar)."""
        return 1 if kind == "none" else num_drafts * (gamma + 1)

    def round_ms(self, kind: str, gamma: int, num_drafts: int = 1, steps: int = 1, temperature: float = 0.0,
                 draft_temperature: float = 0.0) -> float:
        return (self.verify_ms(self.verify_q(kind, gamma, num_drafts)) + self.draft_ms(kind, gamma, num_drafts, steps)
                + self.round_overhead_ms(kind, gamma, num_drafts, temperature, draft_temperature))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "CostModel":
        d = dict(d)
        for k in ("verifier_q", "verifier_ms"):
            d[k] = tuple(d[k])
        d["overhead"] = {k: tuple(v) for k, v in d.get("overhead", {}).items()}
        return cls(**d)


def _decode_timer(verifier, drafter, method: str, gamma: int, batch: int, ctx: int, n: int = 64, *,
                  num_drafts: int = 1, temperature: float = 0.0):
    """A compiled and warmed-up `n`-token decode at this context: a function that times one call -> (ms, rounds).
    Greedy with argmax drafts at temperature 0 (K > 1 drafts at draft temperature 1: K argmax drafts would be K
    copies of one); at temperature > 0 the drafts are sampled at that temperature."""
    prompt_len = max(1, min(ctx, verifier.cfg.max_seq_len - n - gamma - 1) - n // 2)
    prompts = [[3 + (i * 7 + b) % 50 for i in range(prompt_len)] for b in range(batch)]
    dt = temperature if temperature > 0 else (1.0 if num_drafts > 1 else 0.0)
    dec = Decoder(verifier, drafter, method=method, max_new_tokens=n, eos_id=None, gamma=max(gamma, 1),
                  num_drafts=num_drafts, temperature=temperature, draft_temperature=dt)
    jax.block_until_ready(dec.decode_raw(dec.prefill(prompts), 0))
    seed = iter(range(1, 1 << 30))

    def once() -> tuple[float, int]:
        state = dec.prefill(prompts)
        jax.block_until_ready(state["carry"])
        t0 = time.perf_counter()
        raw = dec.decode_raw(state, next(seed))
        jax.block_until_ready(raw)
        return 1e3 * (time.perf_counter() - t0), max(int(raw[2]["rounds"]), 1)

    return once


def _time_decodes(verifier, drafters: dict, settings: dict, batch: int, ctx: int, repeats: int = TIMING_REPEATS,
                  progress=None) -> dict:
    """{name: (median ms, rounds)} of the decodes `settings` {name: (kind, method, gamma, K, temperature, n)}.
    All are compiled first, then timed in turn, `repeats` rounds of one call each: a machine whose load changes
    while they are timed slows every setting alike, so the fits' differences between settings stay sound."""
    timers = {}
    for name, (kind, method, g, k, temp, n) in settings.items():
        if progress:
            progress(f"cost model: compiling decode {name}")
        timers[name] = _decode_timer(verifier, drafters.get(kind), method, g, batch, ctx, n, num_drafts=k,
                                     temperature=temp)
    samples = {name: [] for name in timers}
    for _ in range(repeats):
        for name, once in timers.items():
            samples[name].append(once())
    return {name: (statistics.median(ms for ms, _ in xs), xs[-1][1]) for name, xs in samples.items()}


def _point_name(kind: str, point: tuple, temperature: float = 0.0) -> str:
    _, g, k = point
    return f"{kind}_g{g}_k{k}_t{temperature:g}"


def _decode_settings(drafters: dict) -> dict:
    """Every decode `measure` times: ar at two lengths and at temperature 1, OVERHEAD_POINTS, SAMPLED_POINT and
    VALIDATION_POINTS of the drafter kinds present."""
    out = {"ar16": ("none", "ar", 0, 1, 0.0, 16), "ar64": ("none", "ar", 0, 1, 0.0, 64),
           "ar64_t1": ("none", "ar", 0, 1, 1.0, 64)}
    for kind, points in OVERHEAD_POINTS.items():
        if kind in drafters:
            for p in points + (VALIDATION_POINTS[kind],):
                out[_point_name(kind, p)] = (kind, p[0], p[1], p[2], 0.0, 64)
    if "ar" in drafters:
        out[_point_name("ar", SAMPLED_POINT, 1.0)] = ("ar", *SAMPLED_POINT, 1.0, 64)
    return out


def _round_ms(cm: "CostModel", timed: dict, kind: str, point: tuple, temperature: float = 0.0) -> float:
    """Measured ms per round of the decode at `point` = (method, gamma, K), its per-call cost taken out."""
    ms, rounds = timed[_point_name(kind, point, temperature)]
    return max(ms - cm.call_ms, 0.0) / rounds


def _rest_ms(cm: "CostModel", timed: dict, kind: str, point: tuple, temperature: float = 0.0) -> float:
    """ms of a measured round at `point` outside the modelled forwards."""
    _, g, k = point
    return (_round_ms(cm, timed, kind, point, temperature) - cm.verify_ms(cm.verify_q(kind, g, k))
            - cm.draft_ms(kind, g, k))


def _overheads(cm: "CostModel", timed: dict, drafters: dict) -> dict:
    """Per drafter kind, (a, b, c) with a round's time outside the modelled forwards
    = a + b * (gamma + 1) + c * (K - 1) * (gamma + 1), solved on the decodes of OVERHEAD_POINTS (c = 0 where only
    K = 1 is timed). More positions never cost less: a negative slope is timing noise, which extrapolated to long
    drafts would predict rounds cheaper than their forwards, so that slope is set to 0 and the rest refitted."""
    out = {}
    for kind, points in OVERHEAD_POINTS.items():
        if kind not in drafters:
            continue
        x = np.array([[1.0, g + 1.0, (k - 1.0) * (g + 1.0)] for _, g, k in points])
        y = np.array([_rest_ms(cm, timed, kind, p) for p in points])
        cols = [0, 1, 2] if np.any(x[:, 2]) else [0, 1]
        while True:
            coef = np.zeros(3)
            coef[cols] = np.linalg.lstsq(x[:, cols], y, rcond=None)[0]
            negative = [j for j in cols[1:] if coef[j] < 0]
            if not negative:
                break
            cols.remove(negative[0])
        out[kind] = tuple(float(v) for v in coef)
    return out


def _sampling(cm: "CostModel", timed: dict, drafters: dict, step_ms: float) -> tuple[float, float]:
    """(ms a round adds when the verifier samples, ms per token an AR drafter samples): an ar decode and the
    SAMPLED_POINT decode timed again at temperature 1."""
    ms, rounds = timed["ar64_t1"]
    per_round = max(0.0, (ms - cm.call_ms) / rounds - step_ms)
    per_draft = 0.0
    if "ar" in drafters:
        _, g, k = SAMPLED_POINT
        greedy = cm.round_overhead_ms("ar", g, k)
        sampled = _rest_ms(cm, timed, "ar", SAMPLED_POINT, temperature=1.0)
        per_draft = max(0.0, (sampled - greedy - per_round) / g)
    return per_round, per_draft


def _validation_error(cm: "CostModel", timed: dict, drafters: dict) -> float:
    """The largest relative error of the modelled round time on the VALIDATION_POINTS decodes (no fit used them),
    at least MIN_ERROR."""
    errs = [MIN_ERROR]
    for kind, point in VALIDATION_POINTS.items():
        if kind in drafters:
            _, g, k = point
            measured = _round_ms(cm, timed, kind, point)
            modelled = cm.round_ms(kind, g, k, draft_temperature=1.0 if k > 1 else 0.0)
            errs.append(abs(modelled / max(measured, 1e-9) - 1.0))
    return float(max(errs))


def drafter_forward_ms(model, kind: str, *, batch: int, ctx: int, length: int) -> tuple[tuple, tuple]:
    """(query counts, ms) of the drafter's forwards as a round of drafter `kind` runs them, against `length`
    cached tokens of a cache for about `ctx` (bidir: a window of BIDIR_WINDOW committed tokens + the block,
    no cache)."""
    if kind == "bidir":
        window = min(BIDIR_WINDOW, length)
        qs = tuple(window + g for g in (4, 8, 16, 32) if window + g <= model.cfg.max_seq_len)
        return qs, tuple(1e3 * time_forward(model, batch, q, 0, 0) for q in qs)
    qs = AR_DRAFTER_QS if kind == "ar" else DRAFTER_QS
    dcap = min(model.cfg.max_seq_len, ctx + max(qs))
    return qs, tuple(1e3 * time_forward(model, batch, q, dcap, min(length, dcap - max(qs))) for q in qs)


def measure(verifier, drafters: dict | None = None, *, batch: int = 1, ctx: int = 256, use_cache: bool = True,
            progress=None) -> CostModel:
    """Measure (or load from the disk cache) the cost model of `verifier` and `drafters` ({kind: model} with kind
    in ar | block | bidir) on this device at `batch` rows and a context of about `ctx` tokens."""
    drafters = drafters or {}
    ctx = ctx_bucket(ctx)
    key = "_".join([CACHE_VERSION, device_kind().replace(":", "-").replace(" ", "_"), fingerprint(verifier),
                    *[f"{k}-{fingerprint(m)}" for k, m in sorted(drafters.items())], f"b{batch}", f"c{ctx}"])
    path = cache_dir() / "cost" / f"{key}.json"
    if use_cache and path.is_file():
        try:
            return CostModel.from_json(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError):
            pass  # a stale or damaged entry is measured again
    say = progress or (lambda msg: None)
    cap = min(verifier.cfg.max_seq_len, ctx + max(VERIFIER_QS))
    length = min(ctx, cap - max(VERIFIER_QS))
    say(f"cost model: timing the verifier at {len(VERIFIER_QS)} query counts")
    vms = tuple(1e3 * time_forward(verifier, batch, q, cap, length) for q in VERIFIER_QS)
    dq, dms, window = {}, {}, 0
    for kind, m in sorted(drafters.items()):
        say(f"cost model: timing the {kind} drafter")
        window = min(BIDIR_WINDOW, length) if kind == "bidir" else window
        dq[kind], dms[kind] = drafter_forward_ms(m, kind, batch=batch, ctx=ctx, length=length)
    settings = _decode_settings(drafters)
    timed = _time_decodes(verifier, drafters, settings, batch, ctx, progress=say)
    (short, r_short), (long, r_long) = timed["ar16"], timed["ar64"]
    step = max(long - short, 1e-6) / max(r_long - r_short, 1)
    fixed = max(0.0, step - vms[0])
    cm = CostModel("measured", device_kind(), batch, ctx, VERIFIER_QS, vms, dq, dms, fixed, window,
                   call_ms=max(0.0, short - r_short * step))
    cm.overhead = _overheads(cm, timed, drafters)
    cm.sampled_round_ms, cm.sampled_draft_ms = _sampling(cm, timed, drafters, step)
    cm.error = _validation_error(cm, timed, drafters)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cm.to_json(), indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache directory only costs a re-measurement next time
    return cm


def _forward_ms(cfg, batch: int, q: int, keys: int, peak: float, bw: float) -> float:
    """Roofline time of one forward: max(FLOPs / peak, bytes / bandwidth), bf16 weights and cache."""
    D, L, F = cfg.hidden_size, cfg.num_layers, cfg.intermediate_size
    H, KV, hd, V = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    layer_params = D * (H + 2 * KV) * hd + H * hd * D + 3 * D * F
    params = L * layer_params + 2 * V * D
    tokens = batch * q
    flops = 2 * tokens * (L * layer_params + V * D) + 4 * tokens * L * H * hd * keys
    bytes_ = 2 * params + 2 * 2 * L * batch * KV * hd * keys + 4 * tokens * V
    return 1e3 * max(flops / peak, bytes_ / bw)


def analytic(verifier_cfg, drafter_cfgs: dict | None = None, *, accelerator: str, batch: int = 1,
             ctx: int = 1024) -> CostModel:
    """The cost model a pair would have on `accelerator` (a key of ACCELERATORS), from FLOPs and bytes."""
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator {accelerator!r} is unknown; choose one of {sorted(ACCELERATORS)}")
    peak, bw, fixed = ACCELERATORS[accelerator]
    vms = tuple(_forward_ms(verifier_cfg, batch, q, ctx + q, peak, bw) for q in VERIFIER_QS)
    dq, dms, window = {}, {}, 0
    for kind, cfg in sorted((drafter_cfgs or {}).items()):
        if kind == "bidir":
            window = min(BIDIR_WINDOW, ctx)
            qs = tuple(window + g for g in (4, 8, 16, 32))
            dq[kind], dms[kind] = qs, tuple(_forward_ms(cfg, batch, q, q, peak, bw) for q in qs)
        else:
            qs = AR_DRAFTER_QS if kind == "ar" else DRAFTER_QS
            dq[kind], dms[kind] = qs, tuple(_forward_ms(cfg, batch, q, ctx + q, peak, bw) for q in qs)
    return CostModel(f"analytic:{accelerator}", accelerator, batch, ctx, VERIFIER_QS, vms, dq, dms, fixed, window,
                     error=ANALYTIC_ERROR)
