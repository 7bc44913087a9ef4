"""The bidirectional (Dream / DiffuCoder-style) diffusion drafter: prefix states depend on the block, so each
round re-encodes a bounded window of the last W committed tokens plus the MASK block (docs/METHOD.md).

Logit alignment: cfg.logit_shift False -> block position j predicts x_j; True (Dream) -> q_1 is read at the last
committed token and q_j at block position j-1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specdiff_jax.decode.drafters.base import Drafter
from specdiff_jax.decode.drafters.diffusion import denoise
from specdiff_jax.decode.spec import KernelSpec, q_drafter, read_rows

Array = jax.Array


class BidirDrafter(Drafter):
    kind = "bidir"

    def draft(self, s: KernelSpec, d, state, seq, slen, G: int, key):
        B = seq.shape[0]
        K, W = s.num_drafts, s.window
        win = read_rows(seq, slen, W)  # seq is left-padded by W: this is s[slen-W : slen]
        w = jnp.minimum(slen, W)
        valid_prefix = jnp.arange(W)[None] >= (W - w)[:, None]
        toks = jnp.concatenate([jnp.where(valid_prefix, win, s.pad), jnp.full((B, G), s.mask_id, jnp.int32)], 1)
        pos = jnp.maximum(jnp.arange(W + G)[None] - (W - w)[:, None], 0)
        valid = jnp.concatenate([valid_prefix, jnp.ones((B, G), bool)], axis=1)
        Q = W + G

        def run(tokens, pos_, valid_):
            bm = jnp.broadcast_to(valid_[:, None, :], (tokens.shape[0], Q, Q))
            lg, _, _ = d.forward(tokens, pos_, bm, None)
            return lg[:, W - 1: W + G - 1] if s.logit_shift else lg[:, W: W + G]

        q1 = q_drafter(s, run(toks, pos, valid))

        def rerun(block):  # [B, K, G]: K copies of the window, each with its own partially unmasked block
            tk = jnp.concatenate([jnp.broadcast_to(toks[:, None, :W], (B, K, W)), block], axis=2)
            rep = lambda a: jnp.broadcast_to(a[:, None], (B, K) + a.shape[1:]).reshape((B * K,) + a.shape[1:])  # noqa: E731
            lg = run(tk.reshape(B * K, Q), rep(pos), rep(valid))
            return q_drafter(s, lg.reshape(B, K, G, -1))

        return denoise(s, q1, rerun, key), q1, state

    def calls(self, s, G: int) -> int:
        return min(s.steps, G)
