"""The block-causal diffusion drafter (the project's own drafters; docs/METHOD.md).

It keeps an exact prefix KV cache: the tokens committed last round ("pending", at most gamma+1) and gamma MASK
tokens go through ONE forward: pending tokens attend causally (their keys/values are written into the cache), the
MASK block attends to the prefix, the valid pending tokens and itself. T > 1 denoising steps re-run only the
block(s) against the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from specdiff_jax.decode.drafters.base import Drafter
from specdiff_jax.decode.drafters.diffusion import denoise
from specdiff_jax.decode.spec import KernelSpec, block_diag, q_drafter, rows_at

Array = jax.Array


class BlockDrafter(Drafter):
    kind = "block"
    needs_cache = True

    def pending_slots(self, s: KernelSpec) -> int:
        return s.gamma + 1  # a whole round's tokens (largest gamma + 1) go through the next forward

    def draft(self, s: KernelSpec, d, state: dict, seq, slen, G: int, key):
        pend, pend_n, dcache = state["pend"], state["pend_n"], state["dcache"]
        B, Pn = pend.shape
        K = s.num_drafts
        D0 = dcache.lengths
        toks = jnp.concatenate([pend, jnp.full((B, G), s.mask_id, jnp.int32)], axis=1)
        i = jnp.arange(Pn + G)
        ii, jj = i[:, None], i[None, :]
        pend_part = (jj <= ii) & (jj < Pn)  # pending tokens: causal among themselves
        block_part = (jj >= Pn)[None] | (jj[None] < pend_n[:, None, None])  # MASKs: valid pending + whole block
        bm = jnp.where((ii < Pn)[None], pend_part[None], block_part)
        pos = jnp.where(i[None] < Pn, D0[:, None] + i[None], (D0 + pend_n)[:, None] + (i[None] - Pn))
        logits, k, v = d.forward(toks, pos, bm, dcache)
        if s.logit_shift:
            first = rows_at(logits, jnp.maximum(pend_n - 1, 0))  # q_1 from the last committed token
            lg = jnp.concatenate([first[:, None], logits[:, Pn: Pn + G - 1]], axis=1)
        else:
            first = None
            lg = logits[:, Pn: Pn + G]
        # the logits used are computed (every read of the cache done) before the cache is written: in place, no
        # copy of the loop-carried buffers (kernel.py); only the used positions go through the LM head
        dcache, k, v, lg, first = jax.lax.optimization_barrier((dcache, k, v, lg, first))
        dcache = dcache.write(k[:, :, :Pn], v[:, :, :Pn], D0).with_lengths(D0 + pend_n)
        q1 = q_drafter(s, lg)

        def rerun(block):  # [B, K, G] -> q [B, K, G, V]; the prefix cache already holds the pending tokens
            pos_b = (D0 + pend_n)[:, None] + jnp.tile(jnp.arange(G), K)[None]
            lgk, _, _ = d.forward(block.reshape(B, K * G), pos_b, block_diag(K, np.ones((G, G), bool)), dcache)
            lgk = lgk.reshape(B, K, G, -1)
            if s.logit_shift:
                lgk = jnp.concatenate([jnp.broadcast_to(first[:, None, None], (B, K, 1, first.shape[-1])),
                                       lgk[:, :, : G - 1]], axis=2)
            return q_drafter(s, lgk)

        drafts = denoise(s, q1, rerun, key)
        return drafts, q1, dict(state, dcache=dcache)

    def commit(self, s, state, emitted, n, m, done, G: int) -> dict:
        pend = jnp.pad(emitted, ((0, 0), (0, s.gamma - G)))  # [B, gamma_max + 1] whatever this round's gamma
        return dict(state, pend=pend, pend_n=jnp.where(done, 0, m))

    def calls(self, s, G: int) -> int:
        return min(s.steps, G)
