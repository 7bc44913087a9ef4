"""The decoder core: validated settings, prompt buckets and the compiled kernels, and the output type.

`Decoder` validates everything a user can get wrong before anything compiles, pads prompts to a bucket, and runs
the separately jitted `prefill` and `decode` kernels of `kernel.py` (compiled once per static shape and cached
process-wide). It runs the concrete methods; `api.Decoder` adds method="auto" by supplying `_resolve_auto` (the
planner), so that the cost model and the planner can drive this core without an import circle.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specdiff_jax import acceptance as acc
from specdiff_jax.decode import kernel
from specdiff_jax.decode.spec import KernelSpec
from specdiff_jax.decode.stats import acceptance_stats

METHODS = ("ar", "sps", "specdiff", "specdiff2", "auto")
DRAFTER_METHODS = ("sps", "specdiff", "specdiff2")
MAX_GAMMA = 256
MAX_DRAFTS = 64
MIN_BUCKET = 16


class DecodeError(ValueError):
    """A generate() input is invalid; the message names the input and the fix."""


@dataclasses.dataclass
class GenerateOutput:
    """tokens int32[B, max_new_tokens] (pad after each row's end), lengths int32[B], stats dict."""

    tokens: np.ndarray
    lengths: np.ndarray
    stats: dict[str, Any]

    def rows(self) -> list[list[int]]:
        """The generated ids of each row, without padding."""
        return [self.tokens[b, : self.lengths[b]].tolist() for b in range(len(self.lengths))]


def _bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_sampling(max_new_tokens, temperature, draft_temperature, top_k, top_p) -> None:
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise DecodeError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if not isinstance(temperature, (int, float)) or temperature < 0 or not math.isfinite(temperature):
        raise DecodeError(f"temperature={temperature!r} must be >= 0 (0 = greedy)")
    if not isinstance(draft_temperature, (int, float)) or not 0 <= draft_temperature < math.inf:
        raise DecodeError(f"draft_temperature={draft_temperature!r} must be >= 0 (0 = argmax drafting)")
    if not _is_int(top_k) or top_k < 0:
        raise DecodeError(f"top_k={top_k!r} must be an integer >= 0 (0 = off)")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise DecodeError(f"top_p={top_p!r} must be in (0, 1] (1 = off)")


def _check_shape(gamma, num_drafts, denoise_steps, adaptive_gamma) -> tuple[int, ...]:
    for name, val, hi in (("gamma", gamma, MAX_GAMMA), ("num_drafts", num_drafts, MAX_DRAFTS),
                          ("denoise_steps", denoise_steps, MAX_GAMMA)):
        if not _is_int(val) or not 1 <= val <= hi:
            raise DecodeError(f"{name}={val!r} is out of range: must be an integer in [1, {hi}]")
    if not adaptive_gamma:
        return ()
    gammas = tuple(sorted({int(g) for g in adaptive_gamma})) if adaptive_gamma is not True else \
        tuple(sorted({max(1, gamma // 4), max(1, gamma // 2), gamma}))
    if not all(_is_int(g) and 1 <= g <= gamma for g in gammas) or gammas[-1] != gamma:
        raise DecodeError(f"adaptive_gamma={adaptive_gamma!r} must be True or block sizes in [1, gamma] whose "
                          f"largest is gamma={gamma}")
    return gammas


def _drafter_kind(method: str, verifier, drafter, num_drafts: int, denoise_steps: int, gamma: int) -> str:
    """The kernel's drafter implementation for `method`, refusing drafters of the wrong kind or vocabulary."""
    if method not in DRAFTER_METHODS:
        return "none"
    if drafter is None:
        raise DecodeError(f"method={method!r} needs a drafter model (drafter=...); method='ar' needs none")
    vcfg, dcfg = verifier.cfg, drafter.cfg
    if dcfg.num_sampleable != vcfg.num_sampleable:
        raise DecodeError(
            f"drafter/verifier vocabulary mismatch: the drafter samples {dcfg.num_sampleable} ids, the "
            f"verifier {vcfg.num_sampleable}; they must share one tokenizer (set sample_vocab_size to the "
            "tokenizer size in both model configs if only the padded embedding rows differ)")
    if method == "sps":
        if dcfg.attention != "causal":
            raise DecodeError(f"method='sps' needs a causal AR drafter; this drafter is {dcfg.attention} "
                              "(use method='specdiff' or 'specdiff2' for diffusion drafters)")
        if num_drafts != 1 or denoise_steps != 1:
            raise DecodeError("method='sps' drafts one chain autoregressively: num_drafts and denoise_steps must be 1")
        return "ar"
    if dcfg.mask_token_id is None or dcfg.attention == "causal":
        raise DecodeError(
            f"method={method!r} needs a diffusion drafter with a mask token (attention block_causal or "
            f"bidirectional and mask_token_id set); got attention={dcfg.attention}, "
            f"mask_token_id={dcfg.mask_token_id}. Use method='sps' for a causal AR drafter")
    if denoise_steps > gamma:
        raise DecodeError(f"denoise_steps={denoise_steps} must be <= gamma={gamma} "
                          "(each step commits at least one position)")
    if method == "specdiff" and num_drafts > 1 and denoise_steps > 1:
        raise DecodeError("method='specdiff' with num_drafts > 1 needs denoise_steps=1 (multi_draft "
                          "verification assumes i.i.d. drafts); use method='specdiff2' for T > 1")
    return "block" if dcfg.attention == "block_causal" else "bidir"


class Decoder:
    """Validated decode settings for one verifier (+ drafter), with jitted `prefill` and `decode`.

    Compiled kernels are cached process-wide per static shape (method, rule, batch, prompt bucket,
    max_new_tokens, gamma, K, T, filters, ...), so building Decoders and calling them again does not
    recompile. Typical timing use:
        dec = Decoder(verifier, drafter, method="specdiff2", max_new_tokens=128, ...)
        state = dec.prefill(prompts)            # jitted; block_until_ready to time it
        out = dec.decode(state, seed=0)         # jitted decode loop -> GenerateOutput

    method="auto": `drafter` may be one model or a list of candidates; the planner picks the method, drafter,
    gamma, K, draft temperature, acceptance rule and adaptive block sizes with the highest predicted tokens/s
    (or `ar` when nothing pays) at the first `prefill`; `plan` then holds the choice and its prediction.
    plan_prompts: prompts the planner measures acceptance on (default: those of the first prefill).
    adaptive_gamma: True (block sizes gamma/4, gamma/2, gamma) or a list of block sizes: each round picks one
    from the acceptance seen so far (exactly lossless; one compiled kernel).
    """

    def __init__(self, verifier, drafter=None, *, method: str, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, gamma: int = 16, num_drafts: int = 1,
                 denoise_steps: int = 1, draft_temperature: float = 1.0, acceptance: str = "auto",
                 eos_id: int | None = None, draft_window: int = 512, adaptive_gamma=False, mesh=None, rules=None,
                 cost_model=None, plan_prompts=None):
        vcfg = verifier.cfg
        if method not in METHODS:
            raise DecodeError(f"method={method!r} is unknown; choose one of {METHODS}")
        if vcfg.attention != "causal":
            raise DecodeError(f"the verifier is a {vcfg.attention} model (a diffusion drafter?); the verifier must "
                              "be a causal LM: pass the verifier and the drafter in that order")
        _check_sampling(max_new_tokens, temperature, draft_temperature, top_k, top_p)
        if eos_id is None:
            eos_id = vcfg.eos_token_id
        if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < vcfg.vocab_size):
            raise DecodeError(f"eos_id={eos_id!r} must be a token id in [0, {vcfg.vocab_size})")
        self.verifier, self.max_new_tokens, self.eos_id = verifier, max_new_tokens, eos_id
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.pad_id = vcfg.pad_token_id if vcfg.pad_token_id is not None else 0
        self.draft_window = draft_window
        self._gv, self._vstate = nnx.split(verifier)
        self._placement = None
        if mesh is not None:  # parameters sharded by their logical axes; kernels jitted with in/out shardings
            from specdiff_jax import sharding as shd

            self._placement = (mesh, tuple(rules) if rules is not None else shd.DEFAULT_AXIS_RULES)
            self._vstate = shd.place_state(self._vstate, *self._placement)
        self.plan, self.cost_model = None, cost_model
        if method == "auto":
            cands = drafter if isinstance(drafter, (list, tuple)) else ([drafter] if drafter is not None else [])
            self._auto = dict(candidates=list(cands), cost_model=cost_model, gamma=gamma,
                              adaptive=bool(adaptive_gamma), plan_prompts=plan_prompts)
            self._configure("ar", None, gamma=1, num_drafts=1, denoise_steps=1, draft_temperature=0.0,
                            acceptance="auto", adaptive_gamma=False)
            self.method = "auto"
            return
        self._auto = None
        self._configure(method, drafter, gamma=gamma, num_drafts=num_drafts, denoise_steps=denoise_steps,
                        draft_temperature=draft_temperature, acceptance=acceptance, adaptive_gamma=adaptive_gamma)

    def _configure(self, method, drafter, *, gamma, num_drafts, denoise_steps, draft_temperature, acceptance,
                   adaptive_gamma) -> None:
        """Validate and set the method's settings (also what an `auto` plan resolves to)."""
        gammas = _check_shape(gamma, num_drafts, denoise_steps, adaptive_gamma)
        dkind = _drafter_kind(method, self.verifier, drafter, num_drafts, denoise_steps, gamma)
        try:
            rule = acc.resolve_acceptance(method, acceptance, temperature=self.temperature, num_drafts=num_drafts,
                                          denoise_steps=denoise_steps)
        except acc.AcceptanceError as e:
            raise DecodeError(str(e)) from None
        if method == "ar":
            gamma, num_drafts, denoise_steps, gammas = 0, 1, 1, ()
        self.drafter = drafter if dkind != "none" else None
        self.method, self.rule, self.dkind = method, rule, dkind
        self.gamma, self.num_drafts, self.denoise_steps = gamma, num_drafts, denoise_steps
        self.draft_temperature, self.gammas = float(draft_temperature), gammas
        self._round_costs = self._costs(dkind, gammas, num_drafts, denoise_steps)
        self._gd, self._dstate = nnx.split(drafter) if dkind != "none" else (None, None)
        if self._placement is not None and self._dstate is not None:
            from specdiff_jax import sharding as shd

            self._dstate = shd.place_state(self._dstate, *self._placement)

    def _costs(self, kind: str, gammas: tuple, num_drafts: int, steps: int) -> tuple:
        """Relative round cost at each adaptive block size: the cost model's when the Decoder has one (given, or
        the planner's), else verifying g+1 positions at the slope of a 2-core CPU (1 + g/8 one-token forwards)."""
        if self.cost_model is not None:
            return tuple(self.cost_model.round_ms(kind, g, num_drafts, steps) for g in gammas)
        return tuple(1.0 + g / 8.0 for g in gammas)

    def _resolve_auto(self, prompts) -> None:
        """Resolve method="auto" into concrete settings at the first prefill (`api.Decoder` plans here)."""
        raise DecodeError("method='auto' needs the planner: use specdiff_jax.decode.Decoder")

    # ----------------------------------------------------------------------------------------------
    def _spec(self, prompts) -> tuple[KernelSpec, np.ndarray, np.ndarray]:
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise DecodeError("prompts must be a non-empty list of token-id lists, e.g. [[1, 2, 3]]")
        vcfg = self.verifier.cfg
        vocab_limit = vcfg.vocab_size if self.drafter is None else min(vcfg.vocab_size, self.drafter.cfg.vocab_size)
        for b, pr in enumerate(prompts):
            if not isinstance(pr, (list, tuple)) or not all(_is_int(t) for t in pr):
                raise DecodeError(f"prompt {b} must be a list of integer token ids, got {type(pr).__name__}")
            if len(pr) == 0:
                raise DecodeError(f"prompt {b} is empty: every prompt needs at least one token (e.g. a BOS id)")
            bad = [t for t in pr if not 0 <= t < vocab_limit]
            if bad:
                raise DecodeError(f"prompt {b} has token id {bad[0]} outside the vocabulary [0, {vocab_limit})")
        if self._auto is not None:
            self._resolve_auto([list(p) for p in prompts])
        B = len(prompts)
        longest = max(len(pr) for pr in prompts)
        N, G = self.max_new_tokens, self.gamma
        limit = vcfg.max_seq_len
        if self.dkind in ("ar", "block"):
            limit = min(limit, self.drafter.cfg.max_seq_len)
        need = longest + N + G
        if need > limit:
            raise DecodeError(
                f"prompt length {longest} + max_new_tokens {N} + gamma {G} = {need} exceeds the models' "
                f"max_seq_len {limit}; shorten the prompt or lower max_new_tokens / gamma")
        P = min(_bucket(longest), limit - N - G)
        window = 0
        if self.dkind == "bidir":
            dmax = self.drafter.cfg.max_seq_len
            if dmax <= G:
                raise DecodeError(f"gamma={G} must be below the drafter's max_seq_len={dmax}")
            window = max(1, min(self.draft_window, P + N, dmax - G))
        tokens = np.full((B, P), self.pad_id, np.int32)
        for b, pr in enumerate(prompts):
            tokens[b, : len(pr)] = pr
        lens = np.asarray([len(pr) for pr in prompts], np.int32)
        dcfg = self.drafter.cfg if self.drafter is not None else None
        spec = KernelSpec(
            method=self.method, rule=self.rule, dkind=self.dkind, batch=B, bucket=P, max_new=N, gamma=G,
            num_drafts=self.num_drafts, steps=self.denoise_steps, temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, draft_temperature=self.draft_temperature,
            pad=int(self.pad_id), vocab=vcfg.num_sampleable,
            v_exclude=(vcfg.mask_token_id,) if vcfg.mask_token_id is not None else (),
            mask_id=-1 if dcfg is None or dcfg.mask_token_id is None else dcfg.mask_token_id,
            logit_shift=bool(dcfg.logit_shift) if dcfg is not None else False,
            vcap=P + N + G, dcap=P + N + G if self.dkind in ("ar", "block") else 0, window=window,
            gammas=self.gammas, round_costs=self._round_costs if self.gammas else (),
        )
        return spec, tokens, lens

    def check(self, prompts) -> None:
        """Validate `prompts` (token ids, lengths against the models' capacity) without compiling or running."""
        if self._auto is None:
            self._spec(prompts)

    def prefill(self, prompts) -> dict:
        """Validate, pad to the bucket and encode the prompts (jitted). Returns the decode state."""
        spec, tokens, lens = self._spec(prompts)
        pre, _ = self._kernels(spec)
        eos = jnp.asarray(-1 if self.eos_id is None else self.eos_id, jnp.int32)  # traced: no recompile per EOS id
        alpha0 = jnp.float32(self.plan.alpha if self.plan is not None else 0.5)
        carry = pre(self._vstate, self._dstate, jnp.asarray(tokens), jnp.asarray(lens), eos, alpha0)
        return {"spec": spec, "carry": carry}

    def decode_raw(self, state: dict, seed: int = 0):
        """The jitted decode loop on a prefill state: device arrays (tokens [B, N], lengths [B], stats)."""
        spec = state["spec"]
        _, dec = self._kernels(spec)
        key = jax.random.key(seed) if _is_int(seed) else seed
        return dec(self._vstate, self._dstate, state["carry"], key)

    def _kernels(self, spec: KernelSpec):
        return kernel.compiled(spec, self._gv, self._gd, self._placement, self._vstate, self._dstate)

    def decode(self, state: dict, seed: int = 0) -> GenerateOutput:
        return self.output(self.decode_raw(state, seed))

    def output(self, raw) -> GenerateOutput:
        """The GenerateOutput (host arrays + statistics) of a `decode_raw` result."""
        tokens, lengths, st = jax.device_get(raw)
        return GenerateOutput(np.asarray(tokens), np.asarray(lengths), self._stats(st, np.asarray(lengths)))

    def __call__(self, prompts, seed: int = 0) -> GenerateOutput:
        return self.decode(self.prefill(prompts), seed)

    def settings(self) -> dict:
        """The resolved method and settings (after an `auto` plan: the planner's choice)."""
        return {"method": self.method, "acceptance": self.rule, "gamma": self.gamma, "num_drafts": self.num_drafts,
                "denoise_steps": self.denoise_steps, "draft_temperature": self.draft_temperature,
                "adaptive_gamma": list(self.gammas)}

    def _stats(self, st: dict, lengths: np.ndarray) -> dict[str, Any]:
        row_rounds = np.asarray(st["row_rounds"])
        out = {**self.settings(),
               "verifier_calls": int(st["rounds"]),  # verifier forwards in the decode loop (prefill excluded)
               "drafter_calls": int(st["drafter_calls"]),
               "row_verifier_calls": row_rounds.tolist(),
               "tokens": int(np.sum(lengths)),
               **acceptance_stats(np.asarray(st["hist"])[: self.gamma + 1], st["accept_counts"],
                                  tokens=int(np.sum(lengths)), row_rounds=int(row_rounds.sum()))}
        if self.gammas:
            out["gamma_rounds"] = dict(zip(self.gammas, np.asarray(st["gamma_rounds"]).tolist()))
        if self.plan is not None:
            out["plan"] = self.plan.describe()
        return out
