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


# ------------------------------------------------------------------------------------------------------
# a short calibration run: held-out expected streak and kernel tokens per verifier call go up
# ------------------------------------------------------------------------------------------------------
PROMPT, NEW, CYCLE = 6, 10, 8


def _next(x):
    """The verifier's greedy successor: ids 8..15 form a cycle, any other id enters it (by its residue mod 8)."""
    return 8 + (np.asarray(x) + 1) % CYCLE


def bigram_verifier(cfg):
    """A verifier whose greedy next token is `_next(last token)`, by construction: every layer's output
    projections are zero (each layer adds nothing to the residual stream), the embedding of x carries its residue
    mod 8 as a one-hot in the first 8 dimensions plus noise in the others, and the LM head column of y = _next(r)
    reads residue r (other columns zero): the logit of _next(x) is positive, every other logit is 0."""
    r = np.random.default_rng(2)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param))
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: np.ones(a.shape, np.float32) if "norm" in jax.tree_util.keystr(path)
        else (0.02 * r.standard_normal(a.shape)).astype(np.float32), abstract)
    for layer in params["layers"].values():
        layer["self_attn"]["o_proj"][:] = 0.0
        layer["mlp"]["down_proj"][:] = 0.0
    emb = (0.1 * r.standard_normal((cfg.vocab_size, cfg.hidden_size))).astype(np.float32)
    emb[:, :CYCLE] = 0.0
    emb[np.arange(cfg.vocab_size), np.arange(cfg.vocab_size) % CYCLE] = 1.0
    head = np.zeros((cfg.hidden_size, cfg.vocab_size), np.float32)
    for res in range(CYCLE):
        head[res, int(_next(res))] = 8.0
    params["embed_tokens"], params["lm_head"] = emb, head
    return fill_model(cfg, params)


@pytest.fixture(scope="module")
def bidir_setup(tmp_path_factory):
    """A random bidirectional drafter, the bigram verifier (saved) and its greedy completions as the dataset."""
    from specdiff_jax.checkpoint import save_pretrained
    from specdiff_jax.data import verifier_data as vd

    tmp = tmp_path_factory.mktemp("calib_bidir")
    save_pretrained(tiny(BCFG, 0), tmp / "drafter")
    v = bigram_verifier(VCFG)
    save_pretrained(v, tmp / "verifier")
    r = np.random.default_rng(0)
    recs, rows = [], []
    for i in range(40):
        prompt = r.integers(4, V, PROMPT)
        comp = [int(_next(prompt[-1]))]
        while len(comp) < NEW:
            comp.append(int(_next(comp[-1])))
        rows.append(np.concatenate([prompt, comp]))
        recs.append({"prompt": prompt.tolist(), "completion": comp, "prompt_index": i, "sample_index": 0,
                     "source": f"synthetic/{i}", "split": "validation" if i < 8 else "train"})
    # the completions are the verifier's greedy ones: its argmax after every position is _next of that token
    rows = np.stack(rows).astype(np.int32)
    np.testing.assert_array_equal(np.argmax(np.asarray(v(jnp.asarray(rows))), -1), _next(rows))
    vd.write_dataset(tmp / "data", recs, {"sampling": {"prompt_tokens": PROMPT, "max_new_tokens": NEW}})
    return tmp


def test_calibration_of_a_bidirectional_drafter_raises_held_out_streak_and_kernel_tokens_per_call(bidir_setup):
    """train.calibrate (streak loss, LoRA) on a logit-shifted bidirectional drafter, then its own evaluation: the
    held-out expected streak (calibration's windows) and the tokens per verifier call of the decode kernel drafting
    with the same drafter (greedy verifier, argmax drafts) on held-out prompts, base vs calibrated.

    False alarms: none from chance. Data, initialisations, window draws and decoding are fixed by seeds and the
    computation is deterministic on CPU, so the test gives the same numbers every run (measured: expected streak
    0.014 -> 0.245, tokens per verifier call 1.00 -> 1.80; the random base drafter matches the verifier's next
    token about 1 time in 60). The margins (+0.1 and +0.3, well under half the measured gains) leave room for
    float-level differences between machines; a failure means the calibrated drafter no longer learns what the
    kernel then measures."""
    from train import calibrate

    tmp = bidir_setup
    args = ["--config", str(ROOT / "configs/calibrate/tiny.yaml"), "--workdir", str(tmp / "run"),
            f"train.init_from={tmp / 'drafter'}", f"calibrate.data_dir={tmp / 'data'}",
            f"calibrate.verifier={tmp / 'verifier'}", "data.batch_size=8", "data.val_batches=1", "train.steps=30",
            "train.lr=3e-2", "train.warmup_steps=1", "train.log_every=10", "train.eval_every=100",
            "train.progress_bar=false", "checkpoint.save_every=100", "checkpoint.async_save=false",
            "train.lora_rank=8", "train.lora_alpha=16", "calibrate.loss=streak", "calibrate.windows_per_row=0",
            "calibrate.stride=1", "calibrate.gamma=4", f"calibrate.draft_window={DRAFT_WINDOW}",
            "calibrate.eval_prompts=8", "calibrate.eval_max_new_tokens=16"]
    assert calibrate.main(args) == 0
    ev = json.loads((tmp / "run" / calibrate.EVAL_FILE).read_text())
    win, ker = ev["windows"], ev["kernel"]
    assert ev["settings"]["draft_window"] == DRAFT_WINDOW and win["calibrated"]["windows"] > 0
    assert win["calibrated"]["expected_streak"] > win["base"]["expected_streak"] + 0.1, win
    assert ker["calibrated"]["tokens_per_verifier_call"] > ker["base"]["tokens_per_verifier_call"] + 0.3, ker


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def _vocab_wide(jaxpr, V: int) -> list:
    """Shapes of every value in `jaxpr` (sub-jaxprs included) of rank >= 3 whose last axis is the vocabulary."""
    found = []
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            shape = getattr(v.aval, "shape", ())
            if len(shape) >= 3 and shape[-1] == V:
                found.append(shape)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    found += _vocab_wide(getattr(inner, "jaxpr", inner), V)
    return found


@pytest.mark.parametrize("layout", ["block_causal", "bidirectional"])
def test_vocab_chunked_calibration_losses_equal_the_full_logits_path(layout):
    """train.vocab_chunk > 0 (7: no chunk divides V): streak and mdlm (ce_streak reads the same lq as streak) score
    the windows from the drafter's hidden states over vocabulary chunks. Loss, gradients and the streak statistics
    equal the full-logits path, and the traced step holds no [..., V] array (the full path does: the check sees
    logits)."""
    base = dataclasses.replace(BCFG, intermediate_size=48)  # no activation as wide as the vocabulary
    cfg = base if layout == "bidirectional" else dataclasses.replace(base, attention="block_causal", logit_shift=False)
    graphdef, state = nnx.split(tiny(cfg, 0, std=0.3))
    tok, seg = _batch()
    batch = {"tokens": jnp.asarray(tok), "segment_ids": jnp.asarray(seg)}
    rng = jax.random.PRNGKey(5)

    def step(chunk):
        S = {loss: C.Settings(loss=loss, gamma=G, stride=STRIDE, windows=NWIN, num_sampleable=V - 2, mask_id=MASK,
                              draft_window=DRAFT_WINDOW, temperature=0.8, vocab_chunk=chunk)
             for loss in ("streak", "mdlm")}
        return lambda st: {k: jax.value_and_grad(lambda p: C.calibration_loss(s, nnx.merge(graphdef, p), batch, rng),
                                                 has_aux=True)(st) for k, s in S.items()}

    got, want = jax.jit(step(7))(state), jax.jit(step(0))(state)
    for loss in got:
        (lc, mc), gc = got[loss]
        (lf, mf), gf = want[loss]
        np.testing.assert_allclose(float(lc), float(lf), rtol=1e-5, atol=1e-6)
        for k in ("expected_streak", "greedy_streak", "alpha_1", "alpha_last"):
            np.testing.assert_allclose(float(mc[k]), float(mf[k]), rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gf)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert not _vocab_wide(jax.make_jaxpr(step(7))(state).jaxpr, V)
    assert _vocab_wide(jax.make_jaxpr(step(0))(state).jaxpr, V)
