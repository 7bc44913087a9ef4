"""Calibration losses and acceptance statistics (docs/METHOD.md §6): pure functions of per-window arrays.

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

import jax
import jax.numpy as jnp

from specdiff_jax.config import ConfigError
from specdiff_jax.model import NEG_INF
from specdiff_jax.sampling import allowed_ids

Array = jax.Array
LOSSES = ("streak", "ce_streak", "kd_first", "kd_window", "mdlm")


# --- distributions ------------------------------------------------------------------------------------
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
    z = jnp.where(ok, logits.astype(jnp.float32) / temperature, NEG_INF)
    return jax.nn.log_softmax(z, axis=-1)


def teacher_probs(logits: Array, temperature: float, *, num_sampleable: int | None = None,
                  exclude: tuple[int, ...] = ()) -> Array:
    """Verifier distribution p f32[..., V] at `temperature` (0 = one-hot argmax), never-sampled ids zero."""
    V = logits.shape[-1]
    ok = allowed_ids(V, V if num_sampleable is None else num_sampleable, exclude)
    z = jnp.where(ok, logits.astype(jnp.float32), NEG_INF)
    if temperature == 0:
        return jax.nn.one_hot(jnp.argmax(z, axis=-1), V, dtype=jnp.float32)
    return jax.nn.softmax(z / temperature, axis=-1)


LQ_FLOOR = -100.0  # log q of a target the drafter can never draft (mask id, padded rows): finite, no gradient


def target_logprobs(logq: Array, targets: Array) -> Array:
    """lq[..., j] = max(logq[..., j, targets[..., j]], LQ_FLOOR): logq f32[..., G, V], targets int32[..., G]."""
    return jnp.maximum(jnp.take_along_axis(logq, targets[..., None], axis=-1)[..., 0], LQ_FLOOR)


def chunked_target_logprobs(drafter, hidden: Array, targets: Array, temperature: float, *,
                            num_sampleable: int | None = None, exclude: tuple[int, ...] = (),
                            chunk: int) -> tuple[Array, Array]:
    """`target_logprobs(log_probs(drafter.logits(hidden), ...), targets)` and whether each target is the argmax,
    without [..., V] logits: the LM head runs over vocabulary chunks (`Transformer.token_logprobs`).

    hidden [..., D] (the drafter's last layer output, before the final norm), targets int32[...] ->
    (f32[...], bool[...]). What the streak, ce_streak and mdlm losses need (the kd losses need whole
    distributions)."""
    if not temperature > 0:
        raise ConfigError(f"calibration temperature {temperature!r} must be > 0 (a loss needs a smooth q)")
    V = drafter.cfg.vocab_size
    ok = allowed_ids(V, V if num_sampleable is None else num_sampleable, exclude)
    lp, hit = drafter.token_logprobs(hidden, targets, chunk=chunk, temperature=temperature, allowed=ok)
    return jnp.maximum(lp, LQ_FLOOR), hit


# --- losses (N windows of G positions) ----------------------------------------------------------------
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
