"""Training objectives: pure functions `(model, batch, rng) -> (loss, metrics)`, wrapped as an `Objective`.

batch: {"tokens": int32[B, L], "segment_ids": int32[B, L]} from the packing pipeline; segment id 0 marks padding,
a change of segment id marks a document boundary.

- `ar`: next-token cross-entropy (verifiers, AR drafters). With document masking, attention and rotary positions
  restart at each document, so a packed row trains exactly like separate documents each decoded from position 0.
- `mdlm`: masked diffusion for block_causal drafters (docs/METHOD.md §6, MD4/MDLM with the linear schedule).
  Each row is cut into blocks of `cfg.block_size` at a random per-row offset; each block gets its own masking
  rate t (stratified over all blocks of the batch), each of its tokens is replaced by [MASK] with probability t,
  and the loss is the cross-entropy on masked tokens weighted 1/t, per token of the batch (an upper bound on the
  negative log-likelihood, in nats per token). Every block is trained at once with the two-stream layout: the
  model runs on `[clean row ; noisy row]` (length 2L, noisy tokens at their original positions); clean tokens
  attend causally to clean tokens; a noisy token attends to the clean tokens before its block and to the noisy
  tokens of its own block. That is exactly the inference layout `m([x_<p ; noisy block], prefix_len=p)` for every
  block start p (tested), at twice the length instead of one block per row. Our block_causal drafters use
  `logit_shift=False`: the output at a masked position predicts the token at that same position.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True, eq=False)
class Objective:
    """What the training loop optimises: `loss(model, batch, rng, *inputs) -> (loss, metrics)`.

    name: recorded in checkpoints, so a run is never resumed with another loss.
    inputs: the objective's own inputs besides the model, declared here (e.g. a frozen KD teacher's nnx state,
    `calibration.make_objective`) or None. The loop hands their pure dict to the jitted step as an argument,
    placed by their logical axes: never closed over, so they are not baked into the compiled program as constants.
    metrics must hold "loss" and "tokens" (the loss's weight when averaging over validation batches).
    """

    name: str
    loss: Callable[..., tuple[Array, dict]]
    inputs: Any = None

    def __call__(self, model, batch: dict, rng: Array, inputs=None) -> tuple[Array, dict]:
        """The loss; `inputs` is the pure dict of `self.inputs` (ignored when the objective declares none)."""
        if self.inputs is None:
            return self.loss(model, batch, rng)
        return self.loss(model, batch, rng, inputs)


def document_layout(segment_ids: Array, document_masking: bool = True) -> tuple[Array, Array, Array]:
    """Per-row rotary positions int32[B, L], same-document matrix bool[B, L, L] and causal mask bool[B|1, L, L].

    Without document masking: positions 0..L-1 and one document per row.
    """
    B, L = segment_ids.shape
    idx = jnp.arange(L, dtype=jnp.int32)
    causal = (idx[None, :] <= idx[:, None])[None]
    if not document_masking:
        return jnp.broadcast_to(idx, (B, L)), jnp.ones((1, L, L), bool), causal
    is_start = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(is_start, idx[None, :], 0), axis=1)
    positions = idx[None, :] - start
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return positions, same, causal & same


def _token_nll(logits: Array, targets: Array) -> Array:
    """-log softmax(logits)[target]: logits f32[..., V], targets int32[...] -> f32[...]."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logz - picked


def ar_loss(model, batch: dict, rng: Array | None = None, *, document_masking: bool = True, vocab_chunk: int = 0):
    """Mean next-token cross-entropy (nats) over targets inside the same document and not padding.

    vocab_chunk > 0: the LM head and softmax run over vocabulary chunks (`Transformer.token_logprobs`), never
    holding [B, L, V] logits."""
    del rng
    tokens, seg = batch["tokens"], batch["segment_ids"]
    positions, _, mask = document_layout(seg, document_masking)
    if vocab_chunk > 0:
        x, _, _ = model.hidden_states(tokens, positions, mask)
        nll = -model.token_logprobs(x[:, :-1], tokens[:, 1:], chunk=vocab_chunk)[0]
    else:
        logits, _, _ = model.forward(tokens, positions, mask)
        nll = _token_nll(logits[:, :-1], tokens[:, 1:])
    valid = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    n = valid.sum()
    loss = jnp.where(valid, nll, 0.0).sum() / jnp.maximum(n, 1)
    return loss, {"loss": loss, "bits_per_token": loss / LN2, "tokens": n}


# --- mdlm ---------------------------------------------------------------------------------------------


def mdlm_noise(rng: Array, tokens: Array, segment_ids: Array, *, mask_id: int, block_size: int,
               t_min: float = 1e-3) -> dict[str, Array]:
    """Draw the blocks, masking rates and masks of one mdlm step.

    Returns noisy int32[B, L] (tokens with masked ones set to mask_id), masked bool[B, L], t f32[B, L] (the rate of
    each token's block) and block int32[B, L] (block index of each position; blocks start at a random per-row
    offset). Rates are stratified: the B * num_blocks rates are (u0 + k) / N mapped onto [t_min, 1], k = 0..N-1,
    randomly assigned to blocks, so every batch covers the whole range of t.
    """
    B, L = tokens.shape
    k_shift, k_u0, k_perm, k_mask = jax.random.split(rng, 4)
    shift = jax.random.randint(k_shift, (B, 1), 0, block_size)
    block = (jnp.arange(L)[None, :] + shift) // block_size  # [B, L]
    nb = (L - 1 + block_size - 1) // block_size + 1  # blocks per row, whatever the shift
    n = B * nb
    u = (jax.random.uniform(k_u0, ()) + jnp.arange(n)) / n
    u = jax.random.permutation(k_perm, u).reshape(B, nb)
    t_blocks = t_min + (1.0 - t_min) * u
    t = jnp.take_along_axis(t_blocks, block, axis=1)
    masked = (jax.random.uniform(k_mask, (B, L)) < t) & (segment_ids != 0)
    noisy = jnp.where(masked, jnp.int32(mask_id), tokens)
    return {"noisy": noisy, "masked": masked, "t": t, "block": block}


def two_stream_layout(segment_ids: Array, block: Array, document_masking: bool = True) -> tuple[Array, Array]:
    """Positions int32[B, 2L] and mask bool[B, 2L, 2L] of the `[clean ; noisy]` training layout (module doc)."""
    positions, same, causal = document_layout(segment_ids, document_masking)
    before = block[:, None, :] < block[:, :, None]  # key j's block precedes query i's block
    own = block[:, None, :] == block[:, :, None]
    B, L = segment_ids.shape
    cc = jnp.broadcast_to(causal, (B, L, L))
    nc = before & same
    nn = own & same
    top = jnp.concatenate([cc, jnp.zeros((B, L, L), bool)], axis=2)
    bottom = jnp.concatenate([nc, nn], axis=2)
    return jnp.concatenate([positions, positions], axis=1), jnp.concatenate([top, bottom], axis=1)


def mdlm_loss_from_logits(logits: Array, tokens: Array, masked: Array, t: Array, valid: Array):
    """sum over masked tokens of CE / t, divided by the number of valid tokens.

    logits f32[B, L, V] (same-position alignment), tokens int32[B, L], masked/valid bool[B, L], t f32[B, L].
    """
    return _mdlm_weighted(_token_nll(logits, tokens), masked, t, valid)


def _mdlm_weighted(nll: Array, masked: Array, t: Array, valid: Array):
    n = valid.sum()
    w = jnp.where(masked & valid, 1.0 / t, 0.0)
    loss = (w * nll).sum() / jnp.maximum(n, 1)
    return loss, n


def mdlm_loss(model, batch: dict, rng: Array, *, document_masking: bool = True, t_min: float = 1e-3,
              vocab_chunk: int = 0):
    """Masked-diffusion NELBO (nats per token) of a block_causal drafter over all blocks of the batch."""
    cfg = model.cfg
    tokens, seg = batch["tokens"], batch["segment_ids"]
    L = tokens.shape[1]
    nz = mdlm_noise(rng, tokens, seg, mask_id=cfg.mask_token_id, block_size=cfg.block_size, t_min=t_min)
    positions, mask = two_stream_layout(seg, nz["block"], document_masking)
    both = jnp.concatenate([tokens, nz["noisy"]], axis=1)
    if vocab_chunk > 0:  # vocabulary chunks: no [B, L, V] logits
        x, _, _ = model.hidden_states(both, positions, mask)
        nll = -model.token_logprobs(x[:, L:], tokens, chunk=vocab_chunk)[0]
        loss, n = _mdlm_weighted(nll, nz["masked"], nz["t"], seg != 0)
    else:  # the LM head only on the noisy half: about a fifth of a drafter's train step
        logits, _, _ = model.forward(both, positions, mask, logits_from=L)
        loss, n = mdlm_loss_from_logits(logits, tokens, nz["masked"], nz["t"], seg != 0)
    return loss, {"loss": loss, "bits_per_token": loss / LN2, "tokens": n,
                  "mask_rate": nz["masked"].sum() / jnp.maximum(n, 1)}


OBJECTIVES = {"ar": ar_loss, "mdlm": mdlm_loss}


def make_objective(train_cfg) -> Objective:
    """The objective named by train.objective (`ar` | `mdlm`), with its settings from `train_cfg`."""
    fn = OBJECTIVES[train_cfg.objective]
    kw = {"document_masking": train_cfg.document_masking, "vocab_chunk": train_cfg.vocab_chunk}
    if train_cfg.objective == "mdlm":
        kw["t_min"] = train_cfg.mdlm_t_min
    return Objective(train_cfg.objective, functools.partial(fn, **kw))
