"""Train-time alignment of a diffusion drafter to its verifier (docs/METHOD.md §6): losses, windows, evaluation.

Data: sequences `[prompt ; y]` where y is a completion sampled from the verifier (see train/generate_data.py).
A calibration batch is {"tokens": int32[B, L], "segment_ids": int32[B, L]} with segment id 1 on the prompt,
2 on the completion (EOS included) and 0 on padding, so it travels through the pre-training loop unchanged.

Windows: at every offset t of the completion (t = prompt_len + k * stride) the drafter sees
`[prompt ; y_<t ; MASK x gamma]` and is scored on the targets y_t .. y_{t+gamma-1} (positions past the end of the
sequence are not scored: after EOS nothing is emitted). Our drafters are block_causal with logit_shift False: block
position j predicts the token at that position, and the prefix keys/values do not depend on the block. So one
causal forward over the whole sequence gives the keys/values of every prefix, and all windows of a batch are one
block forward of gamma MASK tokens each against that shared cache, the window's cache length set to t. This is
exactly the kernel's inference computation (`decode._draft_block`), checked in tests against
`drafter([x_<t ; MASK x gamma], prefix_len=t)`, at a cost linear in the number of windows.

Losses, all pure functions of per-window arrays with `lq[n, j] = log q_j(y_j)` at the drafter's inference
temperature, `valid[n, j]` marking scored positions (a prefix of each window), mean over windows with any valid
position:
    streak     - sum_m exp(sum_{j<=m} lq_j)                    (= - expected accepted streak under the delta rule)
    ce_streak  - sum_j stopgrad(prod_{i<j} q_i(y_i)) * lq_j
    kd_first   KL(p_1 || q_1)                                  (p: verifier, teacher-forced, at its temperature)
    kd_window  mean over valid positions j of KL(p_j || q_j)
    mdlm       masked-diffusion loss on the windows: rate t ~ U(t_min, 1) per window (stratified), each block token
               stays MASK with probability t (else it shows y_j), loss (1/gamma) sum_{masked j} -lq_j / t
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specdiff_jax.cache import KVCache
from specdiff_jax.config import ConfigError
from specdiff_jax.sampling import allowed_ids

Array = jax.Array
LOSSES = ("streak", "ce_streak", "kd_first", "kd_window", "mdlm")
PROMPT_SEGMENT, COMPLETION_SEGMENT = 1, 2
_NEG = -1e30


# ======================================================================================================
# distributions
# ======================================================================================================
def log_probs(logits: Array, temperature: float, *, num_sampleable: int | None = None,
              exclude: tuple[int, ...] = ()) -> Array:
    """log softmax(logits / temperature) over the sampleable ids (others get a very negative log-prob).

    logits f32[..., V] -> f32[..., V]. The same ids are forbidden as in `sampling.probs` (padded rows, the mask
    token), so training sees the distribution the kernel drafts from (top-k/top-p filters are not applied).
    temperature must be > 0.
    """
    if not temperature > 0:
        raise ConfigError(f"calibration temperature {temperature!r} must be > 0 (a loss needs a smooth q)")
    V = logits.shape[-1]
    ok = allowed_ids(V, V if num_sampleable is None else num_sampleable, exclude)
    z = jnp.where(ok, logits.astype(jnp.float32) / temperature, _NEG)
    return jax.nn.log_softmax(z, axis=-1)


def teacher_probs(logits: Array, temperature: float, *, num_sampleable: int | None = None,
                  exclude: tuple[int, ...] = ()) -> Array:
    """Verifier distribution p f32[..., V] at `temperature` (0 = one-hot argmax), never-sampled ids zero."""
    V = logits.shape[-1]
    ok = allowed_ids(V, V if num_sampleable is None else num_sampleable, exclude)
    z = jnp.where(ok, logits.astype(jnp.float32), _NEG)
    if temperature == 0:
        return jax.nn.one_hot(jnp.argmax(z, axis=-1), V, dtype=jnp.float32)
    return jax.nn.softmax(z / temperature, axis=-1)


LQ_FLOOR = -100.0  # log q of a target the drafter can never draft (mask id, padded rows): finite, no gradient


def target_logprobs(logq: Array, targets: Array) -> Array:
    """lq[..., j] = max(logq[..., j, targets[..., j]], LQ_FLOOR): logq f32[..., G, V], targets int32[..., G]."""
    return jnp.maximum(jnp.take_along_axis(logq, targets[..., None], axis=-1)[..., 0], LQ_FLOOR)


# ======================================================================================================
# losses (pure; N windows of G positions)
# ======================================================================================================
def _window_mean(per_window: Array, valid: Array) -> Array:
    w = valid.any(-1)
    return jnp.where(w, per_window, 0.0).sum() / jnp.maximum(w.sum(), 1)


def streak_prefix_probs(lq: Array, valid: Array) -> Array:
    """a[n, m] = prod_{j<=m} q_j(y_j) (0 on invalid positions), via the cumulative sum of logs. f32[N, G]."""
    lq = jnp.where(valid, lq, 0.0)
    return jnp.where(valid, jnp.exp(jnp.cumsum(lq, axis=-1)), 0.0)


def expected_streak(lq: Array, valid: Array) -> Array:
    """Per window sum_m prod_{j<=m} q_j(y_j): the expected accepted streak of a q-draft judged by y. f32[N]."""
    return streak_prefix_probs(lq, valid).sum(-1)


def streak_loss(lq: Array, valid: Array) -> Array:
    """- mean_windows sum_m exp(sum_{j<=m} lq_j). lq f32[N, G], valid bool[N, G] -> scalar."""
    return -_window_mean(expected_streak(lq, valid), valid)


def ce_streak_loss(lq: Array, valid: Array) -> Array:
    """- mean_windows sum_j stopgrad(prod_{i<j} q_i(y_i)) * lq_j."""
    lq0 = jnp.where(valid, lq, 0.0)
    before = jnp.cumsum(lq0, axis=-1) - lq0  # sum_{i<j}
    w = jax.lax.stop_gradient(jnp.exp(before))
    return -_window_mean(jnp.where(valid, w * lq0, 0.0).sum(-1), valid)


def kl_divergence(p: Array, logq: Array) -> Array:
    """KL(p || q) = sum_v p (log p - log q) over the last axis (0 log 0 = 0). f32[..., V] -> f32[...]."""
    logp = jnp.log(jnp.maximum(p, 1e-38))
    return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def kd_first_loss(p: Array, logq: Array, valid: Array) -> Array:
    """mean_windows KL(p_1 || q_1). p, logq f32[N, G, V], valid bool[N, G]."""
    kl = kl_divergence(p[:, 0], logq[:, 0])
    v = valid[:, 0]
    return jnp.where(v, kl, 0.0).sum() / jnp.maximum(v.sum(), 1)


def kd_window_loss(p: Array, logq: Array, valid: Array) -> Array:
    """Mean over valid (window, position) pairs of KL(p_j || q_j)."""
    kl = kl_divergence(p, logq)
    return jnp.where(valid, kl, 0.0).sum() / jnp.maximum(valid.sum(), 1)


def mdlm_window_loss(lq: Array, masked: Array, t: Array, valid: Array) -> Array:
    """mean_windows (1/G) sum_{j masked, valid} -lq_j / t. lq f32[N, G], masked bool[N, G], t f32[N]."""
    G = lq.shape[-1]
    per = jnp.where(masked & valid, -lq, 0.0).sum(-1) / (t * G)
    return _window_mean(per, valid)


def streak_grad_formula(lq: Array, valid: Array) -> Array:
    """d J / d lq_j = sum_{m>=j} prod_{i<=m} q_i for J = sum_m prod_{i<=m} q_i (one window per row)."""
    a = streak_prefix_probs(lq, valid)
    return jnp.where(valid, jnp.flip(jnp.cumsum(jnp.flip(a, -1), -1), -1), 0.0)


def acceptance_stats(lq: Array, valid: Array, greedy_match: Array | None = None) -> dict[str, Array]:
    """Streak statistics of N windows: expected_streak (mean), a_j = E[prod_{i<=j} q_i] and
    alpha_j = a_j / a_{j-1} (position-wise acceptance of q-drafts judged by the targets, f32[G]),
    and, with greedy_match bool[N, G] (argmax q_j == y_j), the mean greedy streak (matching prefix length)."""
    a = streak_prefix_probs(lq, valid)
    prev = jnp.concatenate([jnp.where(valid[:, :1], 1.0, 0.0), a[:, :-1]], axis=-1) * valid
    alpha = a.sum(0) / jnp.maximum(prev.sum(0), 1e-30)
    out = {"expected_streak": _window_mean(a.sum(-1), valid), "alpha": alpha,
           "reach": valid.sum(0)}
    if greedy_match is not None:
        run = jnp.cumprod((greedy_match & valid).astype(jnp.int32), axis=-1).sum(-1)
        out["greedy_streak"] = _window_mean(run.astype(jnp.float32), valid)
    return out


# ======================================================================================================
# windows
# ======================================================================================================
def num_windows(max_completion: int, stride: int) -> int:
    """Windows per row when completions have at most `max_completion` tokens."""
    return -(-max_completion // stride)


def window_layout(tokens: Array, segment_ids: Array, *, gamma: int, stride: int, windows: int) -> dict[str, Array]:
    """Where the windows of each row are.

    tokens, segment_ids int32[B, L] (segments: 1 prompt, 2 completion, 0 padding; prompt first, padding last).
    Returns starts int32[B, W] (t = first completion position + k * stride), targets int32[B, W, G]
    (y_t .. y_{t+G-1}, pad beyond L) and valid bool[B, W, G] (target position inside the sequence and the window
    start inside the completion).
    """
    B, L = tokens.shape
    is_c = segment_ids == COMPLETION_SEGMENT
    first = jnp.argmax(is_c, axis=1).astype(jnp.int32)  # first completion position
    end = (segment_ids != 0).sum(1).astype(jnp.int32)  # one past the last valid position
    has = is_c.any(1)
    starts = first[:, None] + stride * jnp.arange(windows, dtype=jnp.int32)[None]  # [B, W]
    pos = starts[:, :, None] + jnp.arange(gamma, dtype=jnp.int32)[None, None]  # [B, W, G]
    valid = (pos < end[:, None, None]) & (starts < end[:, None])[..., None] & has[:, None, None]
    targets = jnp.take_along_axis(tokens[:, None, :], jnp.minimum(pos, L - 1), axis=2)
    targets = jnp.where(valid, targets, 0)
    return {"starts": jnp.minimum(starts, L), "targets": targets, "valid": valid, "positions": pos}


def check_drafter(cfg) -> None:
    """Calibration trains block_causal drafters without logit shift (exact prefix cache); refuse others."""
    if cfg.attention != "block_causal" or cfg.logit_shift or cfg.mask_token_id is None:
        raise ConfigError(
            f"calibration needs a block_causal diffusion drafter with logit_shift=false and a mask token; got "
            f"attention={cfg.attention}, logit_shift={cfg.logit_shift}, mask_token_id={cfg.mask_token_id}. "
            "Pre-train one with train.objective=mdlm (bidirectional Dream-style drafters have no exact prefix "
            "cache and are not supported here)")


def drafter_window_logits(drafter, tokens: Array, starts: Array, block: Array) -> Array:
    """Drafter logits f32[B, W, G, V] of the windows `[tokens[:t] ; block]` for every start t.

    tokens int32[B, L]; starts int32[B, W]; block int32[B, W, G] (MASK tokens, or partly revealed targets for
    the mdlm loss). One causal forward gives the prefix keys/values (they do not depend on the block in the
    block_causal layout), then one block forward per window against a cache of length t.
    """
    B, L = tokens.shape
    W, G = block.shape[1], block.shape[2]
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    causal = jnp.tril(jnp.ones((L, L), bool))[None]
    _, k, v = drafter.forward(tokens, pos, causal, None, compute_logits=False)
    rep = lambda a: jnp.repeat(a, W, axis=1)  # noqa: E731  [layers, B*W, L, kv, hd]
    cache = KVCache(rep(k), rep(v), starts.reshape(B * W))
    bpos = (starts[:, :, None] + jnp.arange(G, dtype=jnp.int32)).reshape(B * W, G)
    logits, _, _ = drafter.forward(block.reshape(B * W, G), bpos, jnp.ones((1, G, G), bool), cache)
    return logits.reshape(B, W, G, -1)


def verifier_window_logits(verifier, tokens: Array, positions: Array) -> Array:
    """Teacher-forced verifier logits f32[B, W, G, V] predicting the tokens at `positions` int32[B, W, G]:
    one causal forward over the full sequence; the logit at i-1 predicts token i."""
    B, L = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    logits, _, _ = verifier.forward(tokens, pos, jnp.tril(jnp.ones((L, L), bool))[None], None)
    idx = jnp.clip(positions - 1, 0, L - 1)
    Wn, G = positions.shape[1], positions.shape[2]
    out = jnp.take_along_axis(logits, idx.reshape(B, Wn * G)[..., None], axis=1)
    return out.reshape(B, Wn, G, -1)


# ======================================================================================================
# the objective plugged into the training loop
# ======================================================================================================
@dataclasses.dataclass(frozen=True)
class Settings:
    """Static settings of a calibration objective (from the run config's `calibrate` section)."""

    loss: str = "streak"
    gamma: int = 16
    stride: int = 1
    windows: int = 128  # windows per row (num_windows(max completion, stride))
    windows_per_row: int = 0  # > 0: a random subset of this many windows per row and step (0 = all)
    temperature: float = 1.0  # drafter inference temperature
    verifier_temperature: float = 1.0  # teacher temperature for kd_first / kd_window
    mdlm_t_min: float = 1e-3
    num_sampleable: int | None = None
    mask_id: int = 3
    verifier_exclude: tuple[int, ...] = ()

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"calibrate.loss={self.loss!r} is unknown; choose one of {LOSSES}")
        for k in ("gamma", "stride", "windows"):
            if getattr(self, k) < 1:
                raise ConfigError(f"calibrate.{k}={getattr(self, k)!r} must be a positive integer")
        if self.windows_per_row < 0:
            raise ConfigError(f"calibrate.windows_per_row={self.windows_per_row!r} must be >= 0 (0 = all windows)")
        if not self.temperature > 0:
            raise ConfigError(f"calibrate.temperature={self.temperature!r} must be > 0")
        if self.verifier_temperature < 0:
            raise ConfigError(f"calibrate.verifier_temperature={self.verifier_temperature!r} must be >= 0")

    @property
    def needs_verifier(self) -> bool:
        return self.loss in ("kd_first", "kd_window")


def _select_windows(rng: Array, lay: dict, n: int) -> dict:
    """A random subset of n windows per row (among the valid ones first)."""
    B, W = lay["starts"].shape
    score = jax.random.uniform(rng, (B, W)) + lay["valid"][:, :, 0].astype(jnp.float32)
    _, idx = jax.lax.top_k(score, n)
    take = lambda a: jnp.take_along_axis(a, idx.reshape((B, n) + (1,) * (a.ndim - 2)), axis=1)  # noqa: E731
    return {k: take(v) for k, v in lay.items()}


def window_forward(s: Settings, drafter, tokens: Array, segment_ids: Array, rng: Array | None = None,
                   verifier=None) -> dict[str, Array]:
    """Everything the losses need for one batch, flattened to N = B*W windows: lq, logq, valid, targets,
    (mdlm: masked, t), (kd: p)."""
    lay = window_layout(tokens, segment_ids, gamma=s.gamma, stride=s.stride, windows=s.windows)
    r_sel, r_mask = jax.random.split(rng if rng is not None else jax.random.PRNGKey(0))
    if 0 < s.windows_per_row < s.windows:
        lay = _select_windows(r_sel, lay, s.windows_per_row)
    B, W, G = lay["targets"].shape
    block = jnp.full((B, W, G), s.mask_id, jnp.int32)
    out = {}
    if s.loss == "mdlm":
        n = B * W
        u = (jax.random.uniform(jax.random.fold_in(r_mask, 0), ()) + jnp.arange(n)) / n
        u = jax.random.permutation(jax.random.fold_in(r_mask, 1), u)
        t = (s.mdlm_t_min + (1.0 - s.mdlm_t_min) * u).reshape(B, W)
        masked = jax.random.uniform(jax.random.fold_in(r_mask, 2), (B, W, G)) < t[..., None]
        noisy = jnp.where(masked, s.mask_id, lay["targets"])
        lg = drafter_window_logits(drafter, tokens, lay["starts"], noisy)
        lqn = target_logprobs(log_probs(lg, s.temperature, num_sampleable=s.num_sampleable,
                                        exclude=(s.mask_id,)), lay["targets"])
        out.update(lq_noisy=lqn.reshape(n, G), masked=masked.reshape(n, G), t=t.reshape(n))
    lg = drafter_window_logits(drafter, tokens, lay["starts"], block)
    if s.loss == "mdlm":
        lg = jax.lax.stop_gradient(lg)  # statistics only
    logq = log_probs(lg, s.temperature, num_sampleable=s.num_sampleable, exclude=(s.mask_id,))
    lq = target_logprobs(logq, lay["targets"])
    N = B * W
    out.update(lq=lq.reshape(N, G), valid=lay["valid"].reshape(N, G), targets=lay["targets"].reshape(N, G),
               greedy_match=(jnp.argmax(logq, -1) == lay["targets"]).reshape(N, G))
    if s.needs_verifier:
        if verifier is None:
            raise ConfigError(f"calibrate.loss={s.loss} needs the verifier (calibrate.verifier=<model dir>)")
        vl = jax.lax.stop_gradient(verifier_window_logits(verifier, tokens, lay["positions"]))
        V = logq.shape[-1]
        # The teacher is restricted to ids the drafter may draft (never its mask id), so KL(p || q) is finite.
        p = teacher_probs(vl[..., :V], s.verifier_temperature, num_sampleable=s.num_sampleable,
                          exclude=tuple(s.verifier_exclude) + (s.mask_id,))
        out.update(p=p.reshape(N, G, -1), logq=logq.reshape(N, G, -1))
    return out


def loss_from_windows(s: Settings, w: dict) -> Array:
    if s.loss == "streak":
        return streak_loss(w["lq"], w["valid"])
    if s.loss == "ce_streak":
        return ce_streak_loss(w["lq"], w["valid"])
    if s.loss == "kd_first":
        return kd_first_loss(w["p"], w["logq"], w["valid"])
    if s.loss == "kd_window":
        return kd_window_loss(w["p"], w["logq"], w["valid"])
    return mdlm_window_loss(w["lq_noisy"], w["masked"], w["t"], w["valid"])


def calibration_loss(s: Settings, drafter, batch: dict, rng: Array, verifier=None) -> tuple[Array, dict]:
    """`(loss, metrics)` of one batch. metrics: loss, tokens (valid windows, the averaging weight),
    expected_streak, greedy_streak, alpha_1, alpha_mid (j = G/2), alpha_last."""
    w = window_forward(s, drafter, batch["tokens"], batch["segment_ids"], rng, verifier)
    loss = loss_from_windows(s, w)
    st = acceptance_stats(jax.lax.stop_gradient(w["lq"]), w["valid"], w["greedy_match"])
    G = s.gamma
    metrics = {"loss": loss, "tokens": w["valid"].any(-1).sum(), "expected_streak": st["expected_streak"],
               "greedy_streak": st["greedy_streak"], "alpha_1": st["alpha"][0],
               "alpha_mid": st["alpha"][max(G // 2 - 1, 0)], "alpha_last": st["alpha"][G - 1]}
    return loss, metrics


def make_objective(s: Settings, verifier=None) -> Callable:
    """The calibration objective for the training loop. The verifier (frozen) is a Transformer or None.

    Losses without a teacher: `objective(drafter, batch, rng) -> (loss, metrics)`. kd_first / kd_window:
    `objective(drafter, batch, rng, teacher)`, where teacher is the verifier's parameters as a pure dict; they
    travel as `objective.aux` (the verifier's nnx state: its logical axes place them) and the training loop
    passes them to the jitted step as an input, sharded like the verifier's parameters. Closing over
    them instead would make every teacher weight a constant of the compiled step: harmless for a tiny model,
    wrong for a 7B one (the whole teacher inlined into the program, replicated, recompiled per teacher).
    """
    if s.needs_verifier and verifier is None:
        raise ConfigError(f"calibrate.loss={s.loss} needs a verifier: set calibrate.verifier=<model dir>")
    if verifier is not None and s.needs_verifier:
        gv, vstate = nnx.split(verifier)

        def objective(drafter, batch, rng, teacher):
            return calibration_loss(s, drafter, batch, rng, nnx.merge(gv, jax.lax.stop_gradient(teacher)))

        objective.aux = vstate
    else:
        def objective(drafter, batch, rng):
            return calibration_loss(s, drafter, batch, rng)
    objective.name = f"calibrate_{s.loss}"
    return objective


# ======================================================================================================
# evaluation on held-out windows (pure statistics; the kernel-based measurement is in eval/calibration_report)
# ======================================================================================================
@functools.lru_cache(maxsize=8)
def _stats_fn(s: Settings, graphdef):
    def f(state, tokens, seg):
        w = window_forward(dataclasses.replace(s, loss="streak", windows_per_row=0), nnx.merge(graphdef, state),
                           tokens, seg)
        a = streak_prefix_probs(w["lq"], w["valid"])
        prev = jnp.concatenate([jnp.where(w["valid"][:, :1], 1.0, 0.0), a[:, :-1]], -1) * w["valid"]
        run = jnp.cumprod((w["greedy_match"] & w["valid"]).astype(jnp.int32), axis=-1).sum(-1)
        nw = w["valid"].any(-1)
        return {"a_sum": a.sum(0), "prev_sum": prev.sum(0), "streak_sum": jnp.where(nw, a.sum(-1), 0).sum(),
                "greedy_sum": jnp.where(nw, run, 0).sum(), "windows": nw.sum()}
    return jax.jit(f)


def window_stats(drafter, batches, s: Settings) -> dict:
    """Expected streak, greedy streak and alpha_j (list of G floats) over all windows of `batches`
    (iterable of {"tokens", "segment_ids"} numpy arrays)."""
    gd, state = nnx.split(drafter)
    fn = _stats_fn(s, gd)
    tot = None
    for b in batches:
        r = jax.device_get(fn(state, jnp.asarray(b["tokens"]), jnp.asarray(b["segment_ids"])))
        tot = r if tot is None else {k: tot[k] + r[k] for k in r}
    if tot is None:
        raise ValueError("window_stats: no batches given")
    n = max(int(tot["windows"]), 1)
    return {"expected_streak": float(tot["streak_sum"]) / n, "greedy_streak": float(tot["greedy_sum"]) / n,
            "alpha": (np.asarray(tot["a_sum"]) / np.maximum(np.asarray(tot["prev_sum"]), 1e-30)).tolist(),
            "windows": int(tot["windows"])}


def kernel_eval(verifier, drafter, prompts: list[list[int]], *, gamma: int, max_new_tokens: int,
                batch_size: int = 8, draft_temperature: float = 0.0, eos_id: int | None = None,
                method: str = "specdiff") -> dict:
    """Run the decode kernel greedily (verifier temperature 0) with `drafter` on `prompts` and aggregate its
    statistics: tokens_per_verifier_call (emitted tokens / row-rounds), alpha (position-wise acceptance given
    the earlier positions were accepted, G floats), accept_rate (P(position j accepted) per round), mean_accepted,
    accepted_hist, and per prompt row_tokens / row_verifier_calls (for confidence intervals over prompts). Greedy output equals the verifier's own greedy decoding, so every
    drafter is judged on the same token sequences."""
    from specdiff_jax.decode import Decoder

    if not prompts:
        raise ValueError("kernel_eval: no prompts")
    dec = Decoder(verifier, drafter, method=method, max_new_tokens=max_new_tokens, temperature=0.0, gamma=gamma,
                  draft_temperature=draft_temperature, eos_id=eos_id)
    hist = np.zeros(gamma + 1, np.int64)
    acc = np.zeros(gamma, np.int64)
    row_tokens, row_rounds = [], []
    for i in range(0, len(prompts), batch_size):
        out = dec(prompts[i: i + batch_size], seed=i)
        st = out.stats
        hist += np.asarray(st["accepted_hist"], np.int64)
        acc += np.asarray(st["accept_counts"], np.int64)
        n = len(prompts[i: i + batch_size])
        row_tokens += np.asarray(out.lengths)[:n].astype(int).tolist()
        row_rounds += [int(r) for r in st["row_verifier_calls"][:n]]
    tokens, rounds = sum(row_tokens), sum(row_rounds)
    reach = np.array([hist[j:].sum() for j in range(gamma)])
    alpha = [float(a) / r if r else None for a, r in zip(acc, reach)]  # None: position never judged
    return {"tokens_per_verifier_call": tokens / max(rounds, 1), "alpha": alpha, "reach": reach.tolist(),
            # P(draft token j accepted) per round, unconditionally: the fraction of rounds whose streak reaches j
            "accept_rate": (acc / max(int(hist.sum()), 1)).tolist(),
            "mean_accepted": float(np.dot(np.arange(gamma + 1), hist)) / max(hist.sum(), 1),
            "accepted_hist": hist.tolist(), "tokens": int(tokens), "verifier_calls": int(rounds),
            "row_tokens": row_tokens, "row_verifier_calls": row_rounds,
            "prompts": len(prompts), "gamma": gamma, "draft_temperature": draft_temperature}
