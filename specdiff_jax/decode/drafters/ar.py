"""The causal AR drafter of classic speculative sampling (`sps`): drafts gamma tokens one at a time with its own
KV cache. Accepted drafts' keys/values are already in its cache; only the last 1-2 committed tokens are pending."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specdiff_jax.decode.drafters.base import Drafter
from specdiff_jax.decode.spec import KernelSpec, causal, q_drafter, read_rows, rows_at
from specdiff_jax.sampling import sample

Array = jax.Array


class ARDrafter(Drafter):
    kind = "ar"
    needs_cache = True
    pending = 2  # the 1-2 tokens committed last round that are not in the cache yet

    def draft(self, s: KernelSpec, d, state, seq, slen, G: int, key):
        pend, pend_n, dcache = state["pend"], state["pend_n"], state["dcache"]
        B = pend.shape[0]
        D0 = dcache.lengths
        logits, k, v = d.forward(pend, D0[:, None] + jnp.arange(pend.shape[1])[None], causal(pend.shape[1]), dcache)
        lg1 = rows_at(logits, jnp.maximum(pend_n - 1, 0))
        dcache, k, v, lg1 = jax.lax.optimization_barrier((dcache, k, v, lg1))  # in-place write (kernel.py)
        dcache = dcache.write(k, v, D0).with_lengths(D0 + pend_n)
        keys = jax.random.split(key, G)
        q_1 = q_drafter(s, lg1)
        x_1 = sample(keys[0], q_1)

        def step(carry, k_j):
            cache, x_prev = carry
            lg, kk, vv = d.forward(x_prev[:, None], cache.lengths[:, None], causal(1), cache)
            cache, lg, kk, vv = jax.lax.optimization_barrier((cache, lg, kk, vv))
            cache = cache.append(kk, vv, jnp.ones((B,), jnp.int32))
            q_j = q_drafter(s, lg[:, 0])
            x_j = sample(k_j, q_j)
            return (cache, x_j), (q_j, x_j)

        (dcache, _), (qs, xs) = jax.lax.scan(step, (dcache, x_1), keys[1:])
        q = jnp.concatenate([q_1[:, None], jnp.moveaxis(qs, 0, 1)], axis=1)
        x = jnp.concatenate([x_1[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)
        return x[:, None], q, dict(state, dcache=dcache, committed=D0 + pend_n)

    def commit(self, s, state, emitted, n, m, done, G: int) -> dict:
        # x_1..x_min(n, G-1) are accepted and already in the drafter cache; the rest is pending
        B = emitted.shape[0]
        cached = jnp.where(done, 0, jnp.minimum(n, G - 1))
        state = dict(state)
        committed = state.pop("committed")
        return dict(state, dcache=state["dcache"].with_lengths(committed + cached),
                    pend=read_rows(jnp.concatenate([emitted, jnp.zeros((B, 2), jnp.int32)], 1), cached, 2),
                    pend_n=jnp.where(done, 0, m - cached))

    def calls(self, s, G: int) -> int:
        return G
