"""Token distributions: the one temperature / top-k / top-p filter used for sampling AND for acceptance.

Speculative decoding is lossless only if the probabilities that the acceptance rule compares are exactly the
distributions the tokens were (or would have been) sampled from. So the verifier's p and the drafter's q are
always produced by `probs` below, and tokens are always drawn from those same arrays with `sample`.

Conventions: logits float32[..., V]; ids at or above `num_sampleable` (embedding rows padded past the
tokenizer) and the mask token are never sampled; temperature 0 means argmax (a one-hot distribution, so the
greedy, p/q and delta rules all reduce to exact greedy decoding).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from specdiff_jax.model import NEG_INF

Array = jax.Array


def allowed_ids(vocab: int, num_sampleable: int, exclude: tuple[int, ...] = ()) -> Array:
    """bool[vocab]: which ids may ever be sampled."""
    ok = jnp.arange(vocab) < num_sampleable
    for e in exclude:
        if e is not None and 0 <= e < vocab:
            ok = ok.at[e].set(False)
    return ok


def probs(
    logits: Array,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    num_sampleable: int | None = None,
    exclude: tuple[int, ...] = (),
) -> Array:
    """Filtered sampling distribution float32[..., V] from logits float32[..., V].

    Order (as HF transformers): forbid never-sampled ids, divide by temperature, keep the top_k largest
    (0 = off), keep the smallest set of most likely tokens whose mass reaches top_p (1.0 = off; the most
    likely token is always kept), renormalise. temperature == 0 returns one_hot(argmax) over allowed ids.
    All filter arguments are static Python numbers.
    """
    V = logits.shape[-1]
    ns = V if num_sampleable is None else min(num_sampleable, V)
    logits = logits.astype(jnp.float32)
    logits = jnp.where(allowed_ids(V, ns, exclude), logits, NEG_INF)
    if temperature == 0:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), V, dtype=jnp.float32)
    logits = logits / temperature
    if top_k and top_k < V:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, NEG_INF)
    p = jax.nn.softmax(logits, axis=-1)
    if top_p < 1.0:
        order = jnp.argsort(-p, axis=-1)
        sp = jnp.take_along_axis(p, order, axis=-1)
        # keep a token if the mass strictly before it is < top_p (so the first token is always kept)
        keep_sorted = (jnp.cumsum(sp, axis=-1) - sp) < top_p
        keep = jnp.zeros_like(keep_sorted)
        keep = jnp.put_along_axis(keep, order, keep_sorted, axis=-1, inplace=False)
        p = jnp.where(keep, p, 0.0)
        p = p / jnp.sum(p, axis=-1, keepdims=True)
    return p


def cumsum_last(p: Array, block: int = 128) -> Array:
    """Cumulative sum over the last axis.

    For large vocabularies a two-level blocked sum (a [block, block] triangular matmul inside blocks plus a short
    cumsum over block totals) replaces XLA's associative-scan cumsum, which is slow on CPU.
    """
    V = p.shape[-1]
    if V <= 2 * block:
        return jnp.cumsum(p, axis=-1)
    nb = -(-V // block)
    pp = jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, nb * block - V)]).reshape(p.shape[:-1] + (nb, block))
    tri = jnp.triu(jnp.ones((block, block), p.dtype))  # tri[j, i] = 1 for j <= i
    within = jnp.einsum("...bj,ji->...bi", pp, tri, precision=jax.lax.Precision.HIGHEST)
    offsets = jnp.cumsum(within[..., -1], axis=-1) - within[..., -1]
    return (within + offsets[..., None]).reshape(p.shape[:-1] + (nb * block,))[..., :V]


def sample(key: Array, p: Array, shape: tuple[int, ...] | None = None) -> Array:
    """Draw int32 ids from probabilities p[..., V] (need not be normalised); zero-probability ids are never drawn.

    shape: output shape, default p.shape[:-1]; p's batch dims must equal shape's or be 1 (then that many
    independent draws share the distribution, e.g. K drafts from one set of marginals). Inverse-CDF sampling
    with a binary search: one uniform per draw (jax.random.categorical's Gumbel trick needs V of them, which
    dominated a decode round on CPU) and no [draws, V] intermediate.
    """
    bs = p.shape[:-1]
    shape = bs if shape is None else tuple(shape)
    V = p.shape[-1]
    nd = len(shape)
    bs = (1,) * (nd - len(bs)) + tuple(bs)
    p = p.reshape(bs + (V,))
    rep = [i for i in range(nd) if bs[i] == 1 and shape[i] != 1]  # axes drawn repeatedly from one distribution
    keep = [i for i in range(nd) if i not in rep]
    u = 1.0 - jax.random.uniform(key, shape)  # (0, 1]
    kshape = tuple(shape[i] for i in keep)
    R, M = math.prod(kshape), math.prod(shape[i] for i in rep)
    p2 = jnp.broadcast_to(jnp.squeeze(p, axis=tuple(rep)), kshape + (V,)).reshape(R, V).astype(jnp.float32)
    c = cumsum_last(p2)
    t = jnp.transpose(u, keep + rep).reshape(R, M) * c[:, -1:]
    idx = jax.vmap(lambda cr, tr: jnp.searchsorted(cr, tr, side="left"))(c, t)  # first i with c[i] >= t
    idx = jnp.minimum(idx, V - 1).astype(jnp.int32)
    # rounding can (with probability ~1e-7) land on a zero-probability id: fall back to the mode
    hit = jnp.take_along_axis(p2, idx, axis=-1) > 0
    idx = jnp.where(hit, idx, jnp.argmax(p2, axis=-1)[:, None].astype(jnp.int32))
    idx = idx.reshape(kshape + tuple(shape[i] for i in rep))
    return jnp.transpose(idx, np.argsort(keep + rep).tolist())


def normalize(r: Array, fallback: Array) -> Array:
    """r / sum(r) over the last axis; rows whose mass is (numerically) zero fall back to `fallback`.

    A zero residual only arises when rejection had probability zero (p == q up to rounding), so the
    fallback is never used with positive probability in exact arithmetic.
    """
    s = jnp.sum(r, axis=-1, keepdims=True)
    return jnp.where(s > 1e-12, r / jnp.maximum(s, 1e-30), fallback)
