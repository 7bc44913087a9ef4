"""`ar`: no drafter. Every round verifies nothing and emits the verifier's own next token."""

from __future__ import annotations

import jax.numpy as jnp

from specdiff_jax.decode.drafters.base import Drafter


class NoDrafter(Drafter):
    kind = "none"

    def draft(self, s, model, state, seq, slen, G: int, key):
        return jnp.zeros((seq.shape[0], 1, 0), jnp.int32), None, state
