"""What the two masked-diffusion drafters share: turning step-1 marginals into K drafts (docs/METHOD.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specdiff_jax.decode.spec import KernelSpec
from specdiff_jax.sampling import sample

Array = jax.Array


def schedule(G: int, T: int) -> list[int]:
    """How many positions each of the T denoising steps commits (sums to G)."""
    return [(G * (t + 1)) // T - (G * t) // T for t in range(T)]


def denoise(s: KernelSpec, q1: Array, rerun, key: Array) -> Array:
    """Drafts int32[B, K, G] from step-1 marginals q1 [B, G, V].

    T == 1: K i.i.d. samples of the marginals. T > 1: confidence-ordered unmasking: every step samples each
    still-masked position, commits the most confident ones (confidence = q of the sampled token; with draft
    temperature 0 that is the max probability), and `rerun(block [B, K, G]) -> q [B, K, G, V]` re-predicts.
    """
    B, G, _ = q1.shape
    K, T = s.num_drafts, min(s.steps, G)
    if T == 1:
        if s.draft_temperature == 0:  # q1 is one-hot: its sample is its argmax (no inverse-CDF search over V)
            return jnp.broadcast_to(jnp.argmax(q1, axis=-1).astype(jnp.int32)[:, None], (B, K, G))
        return sample(key, q1[:, None], shape=(B, K, G))
    block = jnp.full((B, K, G), s.mask_id, jnp.int32)
    masked = jnp.ones((B, K, G), bool)
    qk = jnp.broadcast_to(q1[:, None], (B, K) + q1.shape[1:])
    for t, n_t in enumerate(schedule(G, T)):
        if t > 0:
            qk = rerun(block)
        key, kt = jax.random.split(key)
        y = sample(kt, qk)
        if t == T - 1:
            commit = masked
        else:
            conf = jnp.take_along_axis(qk, y[..., None], axis=-1)[..., 0]
            conf = jnp.where(masked, conf, -jnp.inf)
            _, idx = jax.lax.top_k(conf, n_t)  # [B, K, n_t]
            commit = jnp.any(jax.nn.one_hot(idx, G, dtype=bool), axis=-2) & masked
        block = jnp.where(commit, y, block)
        masked = masked & ~commit
    return block
