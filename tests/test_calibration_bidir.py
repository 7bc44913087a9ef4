"""Calibration of bidirectional (Dream / DiffuCoder-layout) drafters: every window encoded as the decode kernel
drafts with such a drafter (the last `draft_window` committed tokens plus gamma MASKs, logit shift), checked against
a plain no-cache forward per window; and a short calibration run that raises the held-out expected streak and the
kernel's tokens per verifier call."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specdiff_jax import calibration as C
from specdiff_jax.checkpoint import fill_model
from specdiff_jax.model import Transformer
from tests.conftest import tiny_config
from tests.test_calibration import _closed_forms, tiny

V, MASK = 64, 3
VCFG = tiny_config(vocab_size=V, num_layers=2, eos_token_id=2, pad_token_id=0)
BCFG = dataclasses.replace(VCFG, attention="bidirectional", logit_shift=True, mask_token_id=MASK, block_size=4)
G, STRIDE, NWIN, DRAFT_WINDOW = 4, 3, 6, 5


def _batch():
    """Two rows: prompts of 6 and 4 tokens, completions of 12 and 16 (the first row padded)."""
    r = np.random.default_rng(0)
    tok = r.integers(4, V, (2, 20)).astype(np.int32)
    seg = np.zeros((2, 20), np.int32)
    seg[0, :6], seg[0, 6:18] = 1, 2
    seg[1, :4], seg[1, 4:20] = 1, 2
    tok[seg == 0] = 0
    return tok, seg


def _windows_by_hand(seg):
    """(row, start t, number of scored positions) of every non-empty window: t = first completion position +
    k * STRIDE, scored positions t .. t+G-1 inside the sequence."""
    out = []
    for b in range(seg.shape[0]):
        first, end = int(np.argmax(seg[b] == 2)), int((seg[b] != 0).sum())
        for k in range(NWIN):
            t = first + STRIDE * k
            if t < end:
                out.append((b, t, min(G, end - t)))
    return out


def _log_softmax_np(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _reference_q(plain, row, w: int, shift: bool) -> np.ndarray:
    """q_j (f64 [G, V], the mask id excluded) of one window from a plain no-cache forward of the hand-built row
    `[x_{t-w} .. x_{t-1} ; block]` (rotary positions 0.., every token attending to every token)."""
    lg = np.asarray(plain(jnp.asarray(row[None], jnp.int32))[0], np.float64)
    lg = lg[w - 1: w - 1 + G] if shift else lg[w: w + G]
    lg[:, MASK] = -np.inf
    return np.exp(_log_softmax_np(lg))


@pytest.mark.parametrize("shift", [True, False])
def test_bidirectional_window_logits_equal_a_plain_forward_per_window(shift):
    """Every window's q from the batched calibration encoding equals softmax of the drafter's plain `__call__` on
    `[last min(t, draft_window) committed tokens ; MASK x G]`, read at block position j-1 (logit shift) or j."""
    d = tiny(dataclasses.replace(BCFG, logit_shift=shift), 0, std=0.3)
    tok, seg = _batch()
    s = C.Settings(loss="streak", gamma=G, stride=STRIDE, windows=NWIN, num_sampleable=V, mask_id=MASK,
                   draft_window=DRAFT_WINDOW)
    w = jax.jit(lambda t_, s_: C.window_forward(s, d, t_, s_))(jnp.asarray(tok), jnp.asarray(seg))
    lq = np.asarray(w["lq"]).reshape(2, NWIN, G)
    plain = jax.jit(lambda x: d(x))
    windows = _windows_by_hand(seg)
    assert any(t < DRAFT_WINDOW for _, t, _ in windows) and any(t > DRAFT_WINDOW for _, t, _ in windows)
    first = {b: int(np.argmax(seg[b] == 2)) for b in range(2)}
    for b, t, m in windows:
        wlen = min(t, DRAFT_WINDOW)
        row = np.concatenate([tok[b, t - wlen: t], np.full(G, MASK)])
        q = _reference_q(plain, row, wlen, shift)
        k = (t - first[b]) // STRIDE
        ref = np.log(q[np.arange(m), tok[b, t: t + m]])
        np.testing.assert_allclose(lq[b, k, :m], ref, rtol=2e-5, atol=2e-5)
        assert np.asarray(w["valid"]).reshape(2, NWIN, G)[b, k].sum() == m


def test_every_loss_on_bidirectional_windows_equals_its_plain_forward_reference():
    """streak, ce_streak, kd_first, kd_window and mdlm of a logit-shifted bidirectional drafter (calibration_loss)
    equal their closed forms on q from a plain forward per hand-built window, the teacher p from the verifier's
    plain forward over the whole row (mdlm: the hand-built row shows y_j where the loss's own draw unmasked it)."""
    d, v = tiny(BCFG, 0, std=0.3), tiny(VCFG, 1, std=0.3)
    tok, seg = _batch()
    windows = _windows_by_hand(seg)
    plain = jax.jit(lambda x: d(x))
    vlg = np.asarray(jax.jit(lambda x: v(x))(jnp.asarray(tok)), np.float64)
    first = {b: int(np.argmax(seg[b] == 2)) for b in range(2)}
    S = {loss: C.Settings(loss=loss, gamma=G, stride=STRIDE, windows=NWIN, num_sampleable=V, mask_id=MASK,
                          draft_window=DRAFT_WINDOW, verifier_temperature=1.0) for loss in C.LOSSES}
    rng = jax.random.PRNGKey(5)

    @jax.jit
    def under_test(b_):  # every loss in one program (one compile); mdlm's draw (masked, t) is the loss's own
        w = C.window_forward(S["mdlm"], d, b_["tokens"], b_["segment_ids"], rng, v)
        return {k: C.calibration_loss(s_, d, b_, rng, v)[0] for k, s_ in S.items()}, (w["masked"], w["t"])

    batch = {"tokens": jnp.asarray(tok), "segment_ids": jnp.asarray(seg)}
    losses, (w_masked, w_t) = jax.device_get(under_test(batch))
    for loss in C.LOSSES:
        n_win = len(windows)
        qy, valid = np.ones((n_win, G)), np.zeros((n_win, G), bool)
        p, q = np.full((n_win, G, V), 1.0 / V), np.full((n_win, G, V), 1.0 / V)
        masked, tt = np.zeros((n_win, G), bool), np.ones(n_win)
        for i, (b, t, m) in enumerate(windows):
            n = b * NWIN + (t - first[b]) // STRIDE  # the window's row in the flattened arrays
            wlen = min(t, DRAFT_WINDOW)
            block = np.full(G, MASK)
            if loss == "mdlm":
                masked[i], tt[i] = w_masked[n], float(w_t[n])
                shown = np.where(np.arange(G) < m, tok[b, np.minimum(t + np.arange(G), tok.shape[1] - 1)], 0)
                block = np.where(masked[i], MASK, shown)  # past the sequence's end: padding (id 0)
            qi = _reference_q(plain, np.concatenate([tok[b, t - wlen: t], block]), wlen, True)
            valid[i, :m] = True
            qy[i, :m] = qi[np.arange(m), tok[b, t: t + m]]
            z = vlg[b, t - 1: t - 1 + m].copy()
            z[:, MASK] = -np.inf
            p[i, :m], q[i, :m] = np.exp(_log_softmax_np(z)), qi[:m]
        p[..., MASK] = q[..., MASK] = 1e-300  # never drafted, never taught: contributes 0 * log(1) to KL(p || q)
        ref = _closed_forms(qy, valid, p, q, masked, tt)[loss]
        assert math.isfinite(float(losses[loss])) and float(losses[loss]) == pytest.approx(ref, rel=1e-4), loss
