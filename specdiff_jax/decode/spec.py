"""The static description of one compiled decode kernel, and the small array helpers every part of it shares."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from specdiff_jax.sampling import probs

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Everything static about one compiled kernel (a jit cache key)."""

    method: str
    rule: str
    dkind: str  # none | ar | block | bidir (the drafter implementation, see `drafters`)
    batch: int
    bucket: int  # padded prompt length P
    max_new: int  # N
    gamma: int  # G (0 for ar); with adaptive gamma the largest block size
    num_drafts: int  # K
    steps: int  # T
    temperature: float
    top_k: int
    top_p: float
    draft_temperature: float
    pad: int
    vocab: int  # sampleable vocabulary shared by verifier and drafter
    v_exclude: tuple
    mask_id: int
    logit_shift: bool
    vcap: int
    dcap: int
    window: int  # bidir: committed tokens re-encoded each round
    gammas: tuple = ()  # adaptive gamma: the block sizes a round may choose from (ascending, last == gamma)
    round_costs: tuple = ()  # adaptive gamma: relative cost of a round at each of `gammas`


def rows_at(a: Array, idx: Array) -> Array:
    """a[b, idx[b]] for a [B, N, ...]."""
    return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 1)), axis=1)[:, 0]


def write_rows(buf: Array, block: Array, offsets: Array) -> Array:
    """buf[b, offsets[b] : offsets[b] + n] = block[b] for buf [B, S], block [B, n]."""
    return jax.vmap(lambda r, x, o: jax.lax.dynamic_update_slice(r, x, (o,)))(buf, block, offsets)


def read_rows(buf: Array, offsets: Array, n: int) -> Array:
    """buf[b, offsets[b] : offsets[b] + n] for buf [B, S] -> [B, n]."""
    return jax.vmap(lambda r, o: jax.lax.dynamic_slice(r, (o,), (n,)))(buf, offsets)


def p_verifier(s: KernelSpec, logits: Array) -> Array:
    """The verifier's filtered distribution (the law `ar` samples and every rule checks against)."""
    return probs(logits[..., : s.vocab], temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                 num_sampleable=s.vocab, exclude=s.v_exclude)


def q_drafter(s: KernelSpec, logits: Array) -> Array:
    """The drafter's filtered distribution at the draft temperature (never the mask token)."""
    return probs(logits[..., : s.vocab], temperature=s.draft_temperature, top_k=s.top_k, top_p=s.top_p,
                 num_sampleable=s.vocab, exclude=(s.mask_id,))


def causal(n: int) -> Array:
    return jnp.asarray(np.tril(np.ones((n, n), bool))[None])


def block_diag(k: int, blk: np.ndarray) -> Array:
    return jnp.asarray(np.kron(np.eye(k, dtype=bool), blk)[None])
