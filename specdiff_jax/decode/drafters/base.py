"""The drafter interface of the decode kernel.

A drafter proposes K chains of `gamma` tokens per round and keeps whatever state it needs between rounds (a KV
cache, pending tokens) in the kernel's carry. The kernel's verify / select / accept / commit step is written once
(`kernel.py`) and calls only these methods, so a drafting method is one subclass in one file:

    init(s, model, tokens, lens, encode) -> dict        state added to the carry at prefill
    draft(s, model, state, seq, slen, gamma, key)
        -> (drafts int32[B, K, gamma], q float32[B, gamma, V] or None, state)
    commit(s, state, emitted, n, m, done, gamma) -> state after the round committed m tokens (n drafts accepted)
    calls(s, gamma) -> drafter forwards per round (statistics)

`gamma` is static (a Python int). It equals `s.gamma` except under adaptive gamma, where a round may draft any of
`s.gammas`; the state's shapes never depend on it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specdiff_jax.decode.spec import KernelSpec, rows_at

Array = jax.Array


class Drafter:
    kind = "none"
    needs_cache = False  # whether prefill encodes the prompt into a drafter KV cache
    pending = 0  # cached drafters: slots for the tokens committed but not yet in the drafter's cache

    def init(self, s: KernelSpec, model, tokens: Array, lens: Array, encode) -> dict:
        """Cached drafters: the prompt but its last token in the cache, that token pending."""
        if not self.needs_cache:
            return {}
        B = tokens.shape[0]
        pend = jnp.zeros((B, self.pending_slots(s)), jnp.int32).at[:, 0].set(rows_at(tokens, lens - 1))
        return dict(dcache=encode(model, s.dcap), pend=pend, pend_n=jnp.ones((B,), jnp.int32))

    def pending_slots(self, s: KernelSpec) -> int:
        return self.pending

    def draft(self, s: KernelSpec, model, state: dict, seq: Array, slen: Array, gamma: int, key: Array):
        raise NotImplementedError

    def commit(self, s: KernelSpec, state: dict, emitted: Array, n: Array, m: Array, done: Array,
               gamma: int) -> dict:
        return state

    def calls(self, s: KernelSpec, gamma: int) -> int:
        return 0
