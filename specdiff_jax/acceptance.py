"""Lossless acceptance rules and self-selection, as small pure functions (docs/METHOD.md §4-§5).

Shapes: B rows, gamma = G draft tokens, V vocabulary.
  p: float32[B, G+1, V]  verifier distributions p_1..p_{G+1} (already filtered, `sampling.probs`)
  q: float32[B, G, V]    drafter distributions the drafts were sampled from
  x: int32[B, G]         draft tokens
Every rule returns (num_accepted int32[B] in [0, G], next_token int32[B]): emit x_1..x_n and then next_token.
Multi-chain functions take p: [B, K, G+1, V], x: [B, K, G] and also return the chain index to commit.

Which rule is exact when (checked by `resolve_acceptance`):
  greedy       verifier temperature 0 only.
  pq           one draft sampled from T=1 marginals q (Leviathan et al.).
  delta        any draft however chosen (accept x_j w.p. p_j(x_j)); so also after self-selection and T>1.
  multi_draft  K i.i.d. drafts from T=1 marginals (SpecInfer recursive rejection).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specdiff_jax.sampling import normalize, sample

Array = jax.Array

RULES = ("greedy", "pq", "delta", "multi_draft")


class AcceptanceError(ValueError):
    """A requested acceptance rule would not be lossless for the chosen method and settings."""


def _leading(accept: Array) -> Array:
    """Number of leading True values along the last axis: int32[...]."""
    return jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def _at(a: Array, idx: Array) -> Array:
    """a[b, idx[b]] for a: [B, N, ...], idx: int32[B]."""
    return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 1)), axis=1)[:, 0]


def _tok_prob(dist: Array, x: Array) -> Array:
    """dist[..., x] for dist [..., V] and x [...]."""
    return jnp.take_along_axis(dist, x[..., None], axis=-1)[..., 0]


# --- single-chain rules ------------------------------------------------------------------------------
def greedy(p: Array, x: Array) -> tuple[Array, Array]:
    """Accept the longest prefix with x_j == argmax p_j; emit argmax p at the first mismatch (or p_{G+1})."""
    target = jnp.argmax(p, axis=-1).astype(jnp.int32)  # [B, G+1]
    n = _leading(x == target[:, :-1])
    return n, _at(target, n)


def pq_residual(p_j: Array, q_j: Array) -> Array:
    """norm(max(0, p - q)) over the last axis (falls back to p where the residual vanishes)."""
    return normalize(jnp.maximum(p_j - q_j, 0.0), p_j)


def delta_residual(p_j: Array, x_j: Array) -> Array:
    """p with token x removed, renormalised: the law of y ~ p conditioned on y != x."""
    r = jnp.where(jnp.arange(p_j.shape[-1]) == x_j[..., None], 0.0, p_j)
    return normalize(r, p_j)


def pq(p: Array, q: Array, x: Array, key: Array) -> tuple[Array, Array]:
    """Leviathan speculative sampling: accept x_j iff u_j < p_j(x_j) / q_j(x_j); residual norm(max(0, p-q))."""
    B, G = x.shape
    ku, kr = jax.random.split(key)
    px = _tok_prob(p[:, :G], x)
    qx = _tok_prob(q, x)
    u = jax.random.uniform(ku, (B, G))
    n = _leading(u * qx < px)  # u < p/q without dividing by a tiny q
    p_n = _at(p, n)
    q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # q_{G+1} = 0: all accepted -> sample p_{G+1}
    resid = pq_residual(p_n, _at(q_pad, n))
    return n, sample(kr, resid)


def delta(p: Array, x: Array, key: Array) -> tuple[Array, Array]:
    """delta rule: accept x_j iff u_j < p_j(x_j); on rejection sample p_j without x_j; after G, sample p_{G+1}."""
    B, G = x.shape
    ku, kr = jax.random.split(key)
    u = jax.random.uniform(ku, (B, G))
    n = _leading(u < _tok_prob(p[:, :G], x))
    p_n = _at(p, n)
    x_pad = jnp.concatenate([x, jnp.full((B, 1), -1, x.dtype)], axis=1)  # -1: nothing removed from p_{G+1}
    resid = delta_residual(p_n, _at(x_pad, n))
    return n, sample(kr, resid)


# --- multi-chain --------------------------------------------------------------------------------------
def multi_draft(p: Array, q: Array, x: Array, key: Array) -> tuple[Array, Array, Array]:
    """SpecInfer recursive rejection over K i.i.d. drafts.

    p: [B, K, G+1, V] verifier distributions along each chain; q: [B, G, V] the (shared) T=1 marginals every
    chain was sampled from; x: [B, K, G]. At depth j the surviving chains (those whose tokens equal the accepted
    prefix; they share the same p_j) are tried in order with the p/q test against the current residual r,
    r <- norm(max(0, r - q_j)) after each rejection. Survivors' later tokens are still i.i.d. from q, so the rule
    is exact. Returns (n, next_token, chain) with `chain` a surviving chain whose first n tokens were accepted.
    """
    B, K, G1, V = p.shape
    G = G1 - 1
    ku, kr = jax.random.split(key)
    u = jax.random.uniform(ku, (G, K, B))
    rows = jnp.arange(B)

    def depth(carry, inp):
        alive, stopped, n, resid_stop = carry
        j, u_j = inp
        first = jnp.argmax(alive, axis=1)
        p_j = p[rows, first, j]  # [B, V]
        q_j = q[:, j]
        x_j = x[:, :, j]  # [B, K]

        def try_chain(c, inp_k):
            r, tok, acc = c
            k, u_jk = inp_k
            xk = x_j[:, k]
            trying = alive[:, k] & ~acc
            ok = trying & (u_jk * _tok_prob(q_j, xk) < _tok_prob(r, xk))
            tok = jnp.where(ok, xk, tok)
            rej = trying & ~ok
            r = jnp.where(rej[:, None], pq_residual(r, q_j), r)
            return (r, tok, acc | ok), None

        init = (p_j, jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool))
        (r, tok, acc), _ = jax.lax.scan(try_chain, init, (jnp.arange(K), u_j))
        active = ~stopped
        go = active & acc
        stop = active & ~acc
        alive = jnp.where(go[:, None], alive & (x_j == tok[:, None]), alive)
        resid_stop = jnp.where(stop[:, None], r, resid_stop)
        return (alive, stopped | stop, n + go.astype(jnp.int32), resid_stop), None

    init = (jnp.ones((B, K), bool), jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32), jnp.zeros((B, V), p.dtype))
    if G > 0:
        (alive, stopped, n, resid_stop), _ = jax.lax.scan(depth, init, (jnp.arange(G), u))
    else:
        alive, stopped, n, resid_stop = init
    chain = jnp.argmax(alive, axis=1).astype(jnp.int32)
    resid = jnp.where(stopped[:, None], resid_stop, p[rows, chain, G])
    return n, sample(kr, resid), chain


def chain_scores(p: Array, x: Array) -> Array:
    """Expected accepted length under the delta rule, float32[B, K] = sum_m prod_{j<=m} p_j(x_j).

    p: [B, K, G+1, V] (only p_1..p_G are used), x: [B, K, G]. With one-hot p (temperature 0) this is the
    length of the prefix that matches the argmax path. Computed as exp(cumsum(log p)) (no underflowing cumprod).
    """
    G = x.shape[-1]
    px = _tok_prob(p[:, :, :G], x)
    logp = jnp.where(px > 0, jnp.log(jnp.maximum(px, 1e-38)), -jnp.inf)
    return jnp.sum(jnp.exp(jnp.cumsum(logp, axis=-1)), axis=-1)


def select_drafts(p: Array, x: Array) -> Array:
    """Self-selection: k* = argmax_k chain_scores (first on ties), int32[B]. Uses no acceptance coins."""
    return jnp.argmax(chain_scores(p, x), axis=-1).astype(jnp.int32)


# --- choosing a rule ----------------------------------------------------------------------------------
def resolve_acceptance(
    method: str, acceptance: str, *, temperature: float, num_drafts: int, denoise_steps: int
) -> str:
    """The rule a method runs with, or AcceptanceError if the combination is not lossless.

    "auto": greedy at temperature 0; otherwise `ar` samples the verifier (reported as "delta" with gamma 0),
    one-draft one-step drafting (`sps`, `specdiff`, `specdiff2` with K = 1) uses pq, K > 1 one-step drafts use
    multi_draft (on the embedded default it accepts more than self-selection + delta: 1.63 against 1.12 tokens
    per verifier call at K = 4, gamma 16, temperature 1), and any T > 1 drafter uses delta (self-selection for
    `specdiff2` with K > 1). Self-selection + delta stays available as acceptance="delta".
    """
    valid = ("auto",) + RULES
    if acceptance not in valid:
        raise AcceptanceError(f"acceptance={acceptance!r} is unknown; choose one of {valid}")
    K, T = num_drafts, denoise_steps
    if method == "ar":
        if acceptance not in ("auto", "greedy", "delta"):
            raise AcceptanceError(f"method 'ar' has no drafts to accept; use acceptance='auto' (got {acceptance!r})")
        return "greedy" if temperature == 0 else "delta"
    if method not in ("sps", "specdiff", "specdiff2"):
        raise AcceptanceError(f"unknown method {method!r}")
    if acceptance == "auto":
        if temperature == 0:
            return "greedy"
        if T > 1:
            return "delta"
        return "multi_draft" if K > 1 else "pq"
    if acceptance == "greedy" and temperature != 0:
        raise AcceptanceError(
            f"acceptance='greedy' is only lossless at temperature 0 (got temperature={temperature}); "
            "use 'delta' or 'pq', or acceptance='auto'"
        )
    if method == "specdiff2" and acceptance == "pq" and K > 1:
        raise AcceptanceError(
            "acceptance='pq' after self-selection (specdiff2 with num_drafts > 1) is not lossless: selection picks "
            "the draft using the verifier's probabilities, so the chosen tokens are no longer distributed as q; "
            "use acceptance='delta' (exact for any draft), 'multi_draft' (all K drafts verified, no selection) or "
            "'greedy' at temperature 0"
        )
    if acceptance in ("pq", "multi_draft") and T > 1:
        raise AcceptanceError(
            f"acceptance={acceptance!r} with denoise_steps={T} is not lossless: with T > 1 a drafted token's "
            "distribution depends on tokens committed at other positions, so q_j is not its sampling law; "
            "use acceptance='delta' or denoise_steps=1"
        )
    if acceptance == "pq" and K > 1:
        raise AcceptanceError(
            f"acceptance='pq' takes one draft (got num_drafts={K}); use 'multi_draft' for K i.i.d. drafts "
            "or method='specdiff2' (self-selection + delta)"
        )
    if method == "specdiff" and K > 1 and acceptance == "delta":  # specdiff2 is the K > 1 + delta method
        raise AcceptanceError(
            "method='specdiff' with num_drafts > 1 verifies all drafts with 'multi_draft'; "
            "to pick one draft by self-selection use method='specdiff2'"
        )
    if method == "sps" and acceptance == "multi_draft":
        raise AcceptanceError("method='sps' drafts one chain; use acceptance 'pq', 'delta' or 'greedy'")
    return acceptance
