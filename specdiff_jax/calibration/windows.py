"""Calibration windows (docs/METHOD.md §6): where they are, and the drafter / verifier forwards over them.

Data: sequences `[prompt ; y]` where y is a completion sampled from the verifier (see train/generate_data.py).
A calibration batch is {"tokens": int32[B, L], "segment_ids": int32[B, L]} with segment id 1 on the prompt,
2 on the completion (EOS included) and 0 on padding, so it travels through the training loop unchanged.

Windows: at every offset t of the completion (t = prompt_len + k * stride) the drafter sees
`[prompt ; y_<t ; MASK x gamma]` and is scored on the targets y_t .. y_{t+gamma-1} (positions past the end of the
sequence are not scored: after EOS nothing is emitted). Our drafters are block_causal with logit_shift False: block
position j predicts the token at that position, and the prefix keys/values do not depend on the block. So one
causal forward over the whole sequence gives the keys/values of every prefix, and all windows of a batch are one
block forward of gamma MASK tokens each against that shared cache, the window's cache length set to t. This is
exactly the kernel's inference computation (`decode._draft_block`), checked in tests against
`drafter([x_<t ; MASK x gamma], prefix_len=t)`, at a cost linear in the number of windows.

Bidirectional drafters (Dream / DiffuCoder: attention=bidirectional, usually logit_shift=True) have no prefix
cache: every prefix state depends on the MASK block. The kernel (`decode.drafters.bidir`) re-encodes, each round,
the last W committed tokens (W = `draft_window`, capped like the Decoder's) followed by gamma MASK tokens, all
attending to all, rotary positions counted from the window's first token, and reads q_j at block position j
(logit_shift False) or j-1 (True: q_1 comes from the last committed token). Calibration encodes each window
exactly so: one row `[pad x (W-w) ; x_{t-w} .. x_{t-1} ; MASK x gamma]` with w = min(t, W) per window, the pads
masked out as keys. The cost is windows x (W + gamma) tokens per row: use `calibrate.windows_per_row`.

Both encodings give the drafter's hidden states at the G scored positions (`drafter_window_hidden`); with
`train.vocab_chunk` set, the streak, ce_streak and mdlm losses score them over vocabulary chunks
(`losses.chunked_target_logprobs`), so no [windows, G, V] logits exist in either pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from specdiff_jax.cache import KVCache
from specdiff_jax.calibration.losses import (LOSSES, chunked_target_logprobs, log_probs, target_logprobs,
                                             teacher_probs)
from specdiff_jax.config import ConfigError

Array = jax.Array
PROMPT_SEGMENT, COMPLETION_SEGMENT = 1, 2


def num_windows(max_completion: int, stride: int) -> int:
    """Windows per row when completions have at most `max_completion` tokens."""
    return -(-max_completion // stride)


def window_layout(tokens: Array, segment_ids: Array, *, gamma: int, stride: int, windows: int) -> dict[str, Array]:
    """Where the windows of each row are.

    tokens, segment_ids int32[B, L] (segments: 1 prompt, 2 completion, 0 padding; prompt first, padding last).
    Returns starts int32[B, W] (t = first completion position + k * stride), targets int32[B, W, G]
    (y_t .. y_{t+G-1}, pad beyond L) and valid bool[B, W, G] (target position inside the sequence and the window
    start inside the completion).
    """
    B, L = tokens.shape
    is_c = segment_ids == COMPLETION_SEGMENT
    first = jnp.argmax(is_c, axis=1).astype(jnp.int32)  # first completion position
    end = (segment_ids != 0).sum(1).astype(jnp.int32)  # one past the last valid position
    has = is_c.any(1)
    starts = first[:, None] + stride * jnp.arange(windows, dtype=jnp.int32)[None]  # [B, W]
    pos = starts[:, :, None] + jnp.arange(gamma, dtype=jnp.int32)[None, None]  # [B, W, G]
    valid = (pos < end[:, None, None]) & (starts < end[:, None])[..., None] & has[:, None, None]
    targets = jnp.take_along_axis(tokens[:, None, :], jnp.minimum(pos, L - 1), axis=2)
    targets = jnp.where(valid, targets, 0)
    return {"starts": jnp.minimum(starts, L), "targets": targets, "valid": valid, "positions": pos}


def check_drafter(cfg) -> None:
    """Calibration trains diffusion drafters with a mask token: block_causal without logit shift (exact prefix
    cache) or bidirectional (Dream / DiffuCoder, with or without logit shift); refuse others."""
    ok = cfg.mask_token_id is not None and (
        (cfg.attention == "block_causal" and not cfg.logit_shift) or cfg.attention == "bidirectional")
    if not ok:
        raise ConfigError(
            f"calibration needs a diffusion drafter with a mask token: block_causal with logit_shift=false, or "
            f"bidirectional (Dream / DiffuCoder); got attention={cfg.attention}, logit_shift={cfg.logit_shift}, "
            f"mask_token_id={cfg.mask_token_id}. Point train.init_from at a diffusion drafter (pre-train one with "
            "train.objective=mdlm, or convert a Dream / DiffuCoder checkpoint)")


def bidir_window(draft_window: int, gamma: int, seq_len: int, max_seq_len: int) -> int:
    """The committed tokens a bidirectional drafter re-encodes per window, capped as the Decoder caps it
    (min(draft_window, sequence length, max_seq_len - gamma)); a shorter window than the Decoder's only drops
    left padding the drafter never attends to."""
    if max_seq_len <= gamma:
        raise ConfigError(f"calibrate.gamma={gamma} must be below the drafter's max_seq_len={max_seq_len}")
    return max(1, min(draft_window, seq_len, max_seq_len - gamma))


def step_tokens(model_cfg, *, seq_len: int, gamma: int, stride: int, windows_per_row: int,
                draft_window: int) -> tuple[int, int, int]:
    """(queries, keys per query, logit positions) per row of one calibration step, for memory plans.

    block_causal: one causal pass over the row plus windows x gamma block queries against it (keys: the row).
    bidirectional: windows rows of Wc + gamma tokens (Wc = `bidir_window`), each attending to itself.
    """
    windows = windows_per_row or max(seq_len // stride, 1)
    if model_cfg.attention == "bidirectional":
        q = bidir_window(draft_window, gamma, seq_len, model_cfg.max_seq_len) + gamma
        return windows * q, q, windows * gamma
    return seq_len + windows * gamma, seq_len, windows * gamma


def drafter_window_logits(drafter, tokens: Array, starts: Array, block: Array, *, draft_window: int = 512,
                          pad_id: int = 0) -> Array:
    """Drafter logits f32[B, W, G, V] of the windows `[tokens[:t] ; block]` for every start t, in the drafter's
    inference encoding: block_causal (below) or bidirectional (`bidir_window_logits`, `draft_window`)."""
    return drafter.logits(drafter_window_hidden(drafter, tokens, starts, block, draft_window=draft_window,
                                                pad_id=pad_id))


def drafter_window_hidden(drafter, tokens: Array, starts: Array, block: Array, *, draft_window: int = 512,
                          pad_id: int = 0) -> Array:
    """The drafter's last-layer outputs [B, W, G, D] (before the final norm and the LM head) at the positions
    whose logits are q_1 .. q_G of each window: `drafter.logits` of them is `drafter_window_logits`;
    `losses.chunked_target_logprobs` scores them over vocabulary chunks without [B, W, G, V] logits."""
    if drafter.cfg.attention == "bidirectional":
        return _bidir_window_hidden(drafter, tokens, starts, block, draft_window=draft_window, pad_id=pad_id)
    return _block_causal_window_hidden(drafter, tokens, starts, block)


def bidir_window_logits(drafter, tokens: Array, starts: Array, block: Array, *, draft_window: int,
                        pad_id: int = 0) -> Array:
    """Bidirectional drafter logits f32[B, W, G, V], each window encoded as the kernel drafts
    (`decode.drafters.bidir`): `[pad x (Wc-w) ; tokens[t-w:t] ; block]` with Wc = `bidir_window(...)`,
    w = min(t, Wc), pads masked as keys, positions from the window's first token, q_j read at Wc+j-1 with the
    logit shift (Wc+j without).

    tokens int32[B, L]; starts int32[B, W]; block int32[B, W, G]. One forward of B*W rows of Wc + G tokens.
    """
    return drafter.logits(_bidir_window_hidden(drafter, tokens, starts, block, draft_window=draft_window,
                                               pad_id=pad_id))


def _bidir_window_hidden(drafter, tokens: Array, starts: Array, block: Array, *, draft_window: int,
                         pad_id: int = 0) -> Array:
    """`bidir_window_logits` before the final norm and the LM head: [B, W, G, D]."""
    cfg = drafter.cfg
    B, L = tokens.shape
    W, G = block.shape[1], block.shape[2]
    Wc = bidir_window(draft_window, G, L, cfg.max_seq_len)
    t = starts.reshape(B * W)
    w = jnp.minimum(t, Wc)
    idx = t[:, None] - Wc + jnp.arange(Wc, dtype=jnp.int32)[None]  # [N, Wc]
    ok = idx >= 0
    rows = jnp.repeat(tokens, W, axis=0)
    prefix = jnp.where(ok, jnp.take_along_axis(rows, jnp.clip(idx, 0, L - 1), axis=1), pad_id)
    x = jnp.concatenate([prefix, block.reshape(B * W, G)], axis=1)
    pos = jnp.maximum(jnp.arange(Wc + G, dtype=jnp.int32)[None] - (Wc - w)[:, None], 0)
    keys = jnp.concatenate([ok, jnp.ones((B * W, G), bool)], axis=1)
    mask = jnp.broadcast_to(keys[:, None, :], (B * W, Wc + G, Wc + G))
    first = Wc - 1 if cfg.logit_shift else Wc
    h, _, _ = drafter.hidden_states(x, pos, mask, None)
    return h[:, first: first + G].reshape(B, W, G, -1)


def _block_causal_window_hidden(drafter, tokens: Array, starts: Array, block: Array) -> Array:
    """Block-causal drafter outputs [B, W, G, D] (before the final norm) of the windows `[tokens[:t] ; block]`.

    tokens int32[B, L]; starts int32[B, W]; block int32[B, W, G] (MASK tokens, or partly revealed targets for
    the mdlm loss). One causal forward gives the prefix keys/values (they do not depend on the block in the
    block_causal layout), then one block forward per window against a cache of length t.
    """
    B, L = tokens.shape
    W, G = block.shape[1], block.shape[2]
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    causal = jnp.tril(jnp.ones((L, L), bool))[None]
    _, k, v = drafter.hidden_states(tokens, pos, causal, None)
    rep = lambda a: jnp.repeat(a, W, axis=1)  # noqa: E731  [layers, B*W, L, kv, hd]
    cache = KVCache.from_block(rep(k), rep(v), starts.reshape(B * W))
    bpos = (starts[:, :, None] + jnp.arange(G, dtype=jnp.int32)).reshape(B * W, G)
    h, _, _ = drafter.hidden_states(block.reshape(B * W, G), bpos, jnp.ones((1, G, G), bool), cache)
    return h.reshape(B, W, G, -1)


def verifier_window_logits(verifier, tokens: Array, positions: Array) -> Array:
    """Teacher-forced verifier logits f32[B, W, G, V] predicting the tokens at `positions` int32[B, W, G]:
    one causal forward over the full sequence; the logit at i-1 predicts token i."""
    B, L = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    logits, _, _ = verifier.forward(tokens, pos, jnp.tril(jnp.ones((L, L), bool))[None], None)
    idx = jnp.clip(positions - 1, 0, L - 1)
    Wn, G = positions.shape[1], positions.shape[2]
    out = jnp.take_along_axis(logits, idx.reshape(B, Wn * G)[..., None], axis=1)
    return out.reshape(B, Wn, G, -1)


# --- settings and the forward of one batch ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
    """Static settings of a calibration objective (from the run config's `calibrate` section)."""

    loss: str = "streak"
    gamma: int = 16
    stride: int = 1
    windows: int = 128  # windows per row (num_windows(max completion, stride))
    windows_per_row: int = 0  # > 0: a random subset of this many windows per row and step (0 = all)
    temperature: float = 1.0  # drafter inference temperature
    verifier_temperature: float = 1.0  # teacher temperature for kd_first / kd_window
    mdlm_t_min: float = 1e-3
    num_sampleable: int | None = None
    mask_id: int = 3
    verifier_exclude: tuple[int, ...] = ()
    draft_window: int = 512  # bidirectional drafters: committed tokens re-encoded per window (as the Decoder's)
    pad_id: int = 0
    vocab_chunk: int = 0  # train.vocab_chunk: > 0 scores streak / ce_streak / mdlm over vocabulary chunks

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"calibrate.loss={self.loss!r} is unknown; choose one of {LOSSES}")
        for k in ("gamma", "stride", "windows"):
            if getattr(self, k) < 1:
                raise ConfigError(f"calibrate.{k}={getattr(self, k)!r} must be a positive integer")
        if self.windows_per_row < 0:
            raise ConfigError(f"calibrate.windows_per_row={self.windows_per_row!r} must be >= 0 (0 = all windows)")
        if not self.temperature > 0:
            raise ConfigError(f"calibrate.temperature={self.temperature!r} must be > 0")
        if self.verifier_temperature < 0:
            raise ConfigError(f"calibrate.verifier_temperature={self.verifier_temperature!r} must be >= 0")
        if self.draft_window < 1:
            raise ConfigError(f"calibrate.draft_window={self.draft_window!r} must be a positive integer")
        if self.vocab_chunk < 0:
            raise ConfigError(f"train.vocab_chunk={self.vocab_chunk!r} must be >= 0 (0 = full logits)")

    @property
    def needs_verifier(self) -> bool:
        return self.loss in ("kd_first", "kd_window")


def _select_windows(rng: Array, lay: dict, n: int) -> dict:
    """A random subset of n windows per row (among the valid ones first)."""
    B, W = lay["starts"].shape
    score = jax.random.uniform(rng, (B, W)) + lay["valid"][:, :, 0].astype(jnp.float32)
    _, idx = jax.lax.top_k(score, n)
    take = lambda a: jnp.take_along_axis(a, idx.reshape((B, n) + (1,) * (a.ndim - 2)), axis=1)  # noqa: E731
    return {k: take(v) for k, v in lay.items()}


def _scored(s: Settings, drafter, tokens: Array, starts: Array, block: Array, targets: Array, *,
            full: bool = False) -> tuple[Array, Array, Array | None]:
    """(lq [B, W, G], greedy_match [B, W, G], logq [B, W, G, V] or None) of the windows `block` at `starts`.

    With s.vocab_chunk > 0 and not `full`, lq and the argmax come from the drafter's hidden states through
    `chunked_target_logprobs`: no [B, W, G, V] logits in either pass (logq is None)."""
    enc = {"draft_window": s.draft_window, "pad_id": s.pad_id}
    h = drafter_window_hidden(drafter, tokens, starts, block, **enc)
    if s.vocab_chunk > 0 and not full:
        lq, hit = chunked_target_logprobs(drafter, h, targets, s.temperature, num_sampleable=s.num_sampleable,
                                          exclude=(s.mask_id,), chunk=s.vocab_chunk)
        return lq, hit, None
    logq = log_probs(drafter.logits(h), s.temperature, num_sampleable=s.num_sampleable, exclude=(s.mask_id,))
    return target_logprobs(logq, targets), jnp.argmax(logq, -1) == targets, logq


def window_forward(s: Settings, drafter, tokens: Array, segment_ids: Array, rng: Array | None = None,
                   verifier=None) -> dict[str, Array]:
    """Everything the losses need for one batch, flattened to N = B*W windows: lq, valid, targets, greedy_match,
    (mdlm: lq_noisy, masked, t), (kd: p, logq). With s.vocab_chunk > 0 the streak, ce_streak and mdlm losses never
    build [N, G, V] logits (the kd losses need whole distributions and build them)."""
    lay = window_layout(tokens, segment_ids, gamma=s.gamma, stride=s.stride, windows=s.windows)
    r_sel, r_mask = jax.random.split(rng if rng is not None else jax.random.PRNGKey(0))
    if 0 < s.windows_per_row < s.windows:
        lay = _select_windows(r_sel, lay, s.windows_per_row)
    B, W, G = lay["targets"].shape
    N = B * W
    block = jnp.full((B, W, G), s.mask_id, jnp.int32)
    out = {}
    if s.loss == "mdlm":
        u = (jax.random.uniform(jax.random.fold_in(r_mask, 0), ()) + jnp.arange(N)) / N
        u = jax.random.permutation(jax.random.fold_in(r_mask, 1), u)
        t = (s.mdlm_t_min + (1.0 - s.mdlm_t_min) * u).reshape(B, W)
        masked = jax.random.uniform(jax.random.fold_in(r_mask, 2), (B, W, G)) < t[..., None]
        noisy = jnp.where(masked, s.mask_id, lay["targets"])
        lqn, _, _ = _scored(s, drafter, tokens, lay["starts"], noisy, lay["targets"])
        out.update(lq_noisy=lqn.reshape(N, G), masked=masked.reshape(N, G), t=t.reshape(N))
    lq, hit, logq = _scored(s, drafter, tokens, lay["starts"], block, lay["targets"], full=s.needs_verifier)
    if s.loss == "mdlm":
        lq = jax.lax.stop_gradient(lq)  # the MASK-only pass: statistics only
    out.update(lq=lq.reshape(N, G), valid=lay["valid"].reshape(N, G), targets=lay["targets"].reshape(N, G),
               greedy_match=hit.reshape(N, G))
    if s.needs_verifier:
        if verifier is None:
            raise ConfigError(f"calibrate.loss={s.loss} needs the verifier (calibrate.verifier=<model dir>)")
        vl = jax.lax.stop_gradient(verifier_window_logits(verifier, tokens, lay["positions"]))
        V = logq.shape[-1]
        # The teacher is restricted to ids the drafter may draft (never its mask id), so KL(p || q) is finite.
        p = teacher_probs(vl[..., :V], s.verifier_temperature, num_sampleable=s.num_sampleable,
                          exclude=tuple(s.verifier_exclude) + (s.mask_id,))
        out.update(p=p.reshape(N, G, -1), logq=logq.reshape(N, G, -1))
    return out
