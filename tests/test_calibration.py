"""Calibration losses (closed forms, streak gradient), exact windows, and a few training steps raising the streak."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specdiff_jax import calibration as C
from specdiff_jax.checkpoint import fill_model
from specdiff_jax.config import ConfigError, ModelConfig
from specdiff_jax.model import Transformer, layout_mask
from tests.conftest import tiny_config

MASK = 3

# Two windows of G=3 over V=4 ids; window 1 has only two scored positions (the sequence ended).
Q = np.array([[[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]],
              [[0.7, 0.1, 0.1, 0.1], [0.2, 0.2, 0.5, 0.1], [0.4, 0.3, 0.2, 0.1]]])
P_ = np.array([[[0.6, 0.2, 0.1, 0.1], [0.3, 0.3, 0.3, 0.1], [0.1, 0.2, 0.3, 0.4]],
               [[0.25, 0.25, 0.25, 0.25], [0.1, 0.1, 0.7, 0.1], [0.9, 0.05, 0.03, 0.02]]])
Y = np.array([[0, 1, 3], [0, 2, 1]])
VALID = np.array([[True, True, True], [True, True, False]])
QY = np.take_along_axis(Q, Y[..., None], -1)[..., 0]  # q_j(y_j)


def _lq():
    return jnp.asarray(np.log(QY), jnp.float32), jnp.asarray(VALID)


def test_log_probs_temperature_and_forbidden_ids():
    lg = jnp.asarray([[1.0, 2.0, 0.5, 3.0, -1.0]])
    lp = C.log_probs(lg, 2.0, num_sampleable=4, exclude=(MASK,))
    z = np.array([1.0, 2.0, 0.5]) / 2.0
    ref = z - np.log(np.exp(z).sum())
    np.testing.assert_allclose(np.asarray(lp)[0, :3], ref, rtol=1e-6)
    assert float(jnp.exp(lp[0, 3:]).sum()) == 0.0  # the mask id and padded rows are never drafted
    with pytest.raises(ConfigError, match="temperature"):
        C.log_probs(lg, 0.0)


def test_streak_loss_closed_form():
    lq, valid = _lq()
    w0 = QY[0, 0] + QY[0, 0] * QY[0, 1] + QY[0, 0] * QY[0, 1] * QY[0, 2]
    w1 = QY[1, 0] + QY[1, 0] * QY[1, 1]
    assert float(C.streak_loss(lq, valid)) == pytest.approx(-(w0 + w1) / 2, rel=1e-6)
    np.testing.assert_allclose(np.asarray(C.expected_streak(lq, valid)), [w0, w1], rtol=1e-6)


def test_ce_streak_closed_form():
    lq, valid = _lq()
    w0 = -(math.log(QY[0, 0]) + QY[0, 0] * math.log(QY[0, 1]) + QY[0, 0] * QY[0, 1] * math.log(QY[0, 2]))
    w1 = -(math.log(QY[1, 0]) + QY[1, 0] * math.log(QY[1, 1]))
    assert float(C.ce_streak_loss(lq, valid)) == pytest.approx((w0 + w1) / 2, rel=1e-6)


def test_ce_streak_gradient_is_the_reach_probability_without_q_j():
    """d ce_streak / d lq_j = -prod_{i<j} q_i(y_i) / windows: position 1 is plain cross-entropy on every window and
    q_j itself is not a factor, unlike the streak loss's sum_{m>=j} prod_{i<=m} q_i (which vanishes with q_j)."""
    lq, valid = _lq()
    g = np.asarray(jax.grad(C.ce_streak_loss)(lq, valid))
    reach = np.where(VALID, np.concatenate([np.ones((2, 1)), np.cumprod(QY, -1)[:, :-1]], -1), 0.0)
    np.testing.assert_allclose(g, -reach / 2, rtol=1e-6)
    # a window whose first target the drafter gives 1e-4: streak's gradient there all but vanishes, ce_streak's not
    hard = lq.at[0, 0].set(math.log(1e-4))
    assert abs(float(jax.grad(C.streak_loss)(hard, valid)[0, 0])) < 1e-4
    assert float(jax.grad(C.ce_streak_loss)(hard, valid)[0, 0]) == pytest.approx(-0.5, rel=1e-6)


def _kl(p, q):
    return float(np.sum(p * np.log(p / q)))


def test_kd_losses_closed_form():
    p, logq, valid = jnp.asarray(P_), jnp.asarray(np.log(Q)), jnp.asarray(VALID)
    first = (_kl(P_[0, 0], Q[0, 0]) + _kl(P_[1, 0], Q[1, 0])) / 2
    assert float(C.kd_first_loss(p, logq, valid)) == pytest.approx(first, rel=1e-5)
    pairs = [(n, j) for n in range(2) for j in range(3) if VALID[n, j]]
    window = sum(_kl(P_[n, j], Q[n, j]) for n, j in pairs) / len(pairs)
    assert float(C.kd_window_loss(p, logq, valid)) == pytest.approx(window, rel=1e-5)
    # a zero-probability teacher entry contributes 0 (0 log 0 = 0), a one-hot teacher gives -log q
    onehot = jnp.asarray(np.eye(4)[Y])
    assert float(C.kd_first_loss(onehot, logq, valid)) == pytest.approx(-np.log(QY[:, 0]).mean(), rel=1e-5)


def test_mdlm_window_loss_closed_form():
    lq, valid = _lq()
    masked = jnp.asarray([[True, False, True], [True, True, True]])
    t = jnp.asarray([0.5, 0.25])
    w0 = -(math.log(QY[0, 0]) + math.log(QY[0, 2])) / 0.5 / 3
    w1 = -(math.log(QY[1, 0]) + math.log(QY[1, 1])) / 0.25 / 3  # position 3 is past the end
    assert float(C.mdlm_window_loss(lq, masked, t, valid)) == pytest.approx((w0 + w1) / 2, rel=1e-6)


def test_streak_gradient_matches_formula():
    """dJ/d log q_j = sum_{m>=j} prod_{i<=m} q_i, for J = sum_m prod_{i<=m} q_i (random windows, ragged)."""
    r = np.random.default_rng(1)
    lq = jnp.asarray(np.log(r.uniform(0.05, 0.99, (5, 8))), jnp.float32)
    valid = jnp.asarray(np.arange(8)[None] < np.array([8, 3, 1, 6, 8])[:, None])
    g = jax.grad(lambda x: -C.streak_loss(x, valid) * 5)(lq)  # J summed over the 5 windows
    ref = np.zeros((5, 8))
    q = np.exp(np.asarray(lq))
    for n in range(5):
        m_end = int(valid[n].sum())
        for j in range(m_end):
            ref[n, j] = sum(np.prod(q[n, : m + 1]) for m in range(j, m_end))
    np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(C.streak_grad_formula(lq, valid)), ref, rtol=1e-5, atol=1e-7)


def test_acceptance_stats():
    lq, valid = _lq()
    st = C.acceptance_stats(lq, valid, jnp.asarray([[True, False, True], [True, True, True]]))
    a1 = QY[:, 0].mean()
    a2 = (QY[0, 0] * QY[0, 1] + QY[1, 0] * QY[1, 1]) / 2
    np.testing.assert_allclose(np.asarray(st["alpha"])[:2], [a1, a2 / a1], rtol=1e-6)
    # position 3 is scored in window 0 only
    assert float(st["alpha"][2]) == pytest.approx(QY[0, 2], rel=1e-6)
    assert float(st["greedy_streak"]) == pytest.approx((1 + 2) / 2)


def _closed_forms(qy, valid, p, q, masked, t):
    """Every loss by its formula, averaged over the non-empty windows only (numpy, float64)."""
    rows = [n for n in range(len(valid)) if valid[n].any()]
    out = {"streak": 0.0, "ce_streak": 0.0, "mdlm": 0.0, "kd_first": 0.0}
    pairs = []
    for n in rows:
        m = int(valid[n].sum())  # valid is a prefix of the window
        pre = np.cumprod(qy[n, :m])
        out["streak"] -= pre.sum()
        out["ce_streak"] -= sum(np.prod(qy[n, :j]) * math.log(qy[n, j]) for j in range(m))
        out["mdlm"] -= sum(math.log(qy[n, j]) for j in range(m) if masked[n, j]) / t[n] / qy.shape[1]
        out["kd_first"] += _kl(p[n, 0], q[n, 0])
        pairs += [_kl(p[n, j], q[n, j]) for j in range(m)]
    out = {k: v / len(rows) for k, v in out.items()}
    out["kd_window"] = sum(pairs) / len(pairs)
    return out


def test_losses_average_over_non_empty_windows_only():
    """Windows with no scored position (past the end of a completion, or a row without one) carry no loss: every
    loss is its closed form averaged over the non-empty windows, whatever the arrays hold in the empty ones."""
    junk = np.full((3, 4), 0.25)
    order = [0, None, 1, None, None]  # windows 1, 3, 4 are empty
    q = np.stack([Q[i] if i is not None else junk for i in order])
    p = np.stack([P_[i] if i is not None else junk[:, ::-1] for i in order])
    y = np.stack([Y[i] if i is not None else np.array([1, 2, 0]) for i in order])
    valid = np.stack([VALID[i] if i is not None else np.zeros(3, bool) for i in order])
    qy = np.take_along_axis(q, y[..., None], -1)[..., 0]
    masked = np.array([[True, False, True], [True, True, True], [True, True, False], [True] * 3, [False] * 3])
    t = np.array([0.5, 0.3, 0.25, 0.7, 0.9])
    ref = _closed_forms(qy, valid, p, q, masked, t)
    lq, v = jnp.asarray(np.log(qy), jnp.float32), jnp.asarray(valid)
    logq, pj = jnp.asarray(np.log(q), jnp.float32), jnp.asarray(p, jnp.float32)
    got = {"streak": C.streak_loss(lq, v), "ce_streak": C.ce_streak_loss(lq, v),
           "mdlm": C.mdlm_window_loss(lq, jnp.asarray(masked), jnp.asarray(t, jnp.float32), v),
           "kd_first": C.kd_first_loss(pj, logq, v), "kd_window": C.kd_window_loss(pj, logq, v)}
    for k in ref:
        assert float(got[k]) == pytest.approx(ref[k], rel=1e-5), k
    st = C.acceptance_stats(lq, v, jnp.asarray(masked))
    assert float(st["expected_streak"]) == pytest.approx(-ref["streak"], rel=1e-5)
    assert float(st["greedy_streak"]) == pytest.approx((1 + 2) / 2)  # matching prefixes 1 and 2 (windows 0, 2)


# ------------------------------------------------------------------------------------------------------
# windows: exactly the inference computation
# ------------------------------------------------------------------------------------------------------
V = 64
VCFG = tiny_config(vocab_size=V, num_layers=2, eos_token_id=2, pad_token_id=0)
DCFG = dataclasses.replace(VCFG, attention="block_causal", mask_token_id=MASK, block_size=4)


def tiny(cfg: ModelConfig, seed: int, std: float = 0.1) -> Transformer:
    """A random model from numpy (no XLA compiles: an eager init compiles every op, seconds on a busy CPU)."""
    r = np.random.default_rng(seed)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param))
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: np.ones(a.shape, np.float32) if "norm" in jax.tree_util.keystr(path)
        else (std * r.standard_normal(a.shape)).astype(np.float32), abstract)
    return fill_model(cfg, params)


def _batch():
    r = np.random.default_rng(0)
    B, L = 2, 20
    tok = r.integers(4, V, (B, L)).astype(np.int32)
    seg = np.zeros((B, L), np.int32)
    seg[0, :6], seg[0, 6:18] = 1, 2
    seg[1, :4], seg[1, 4:20] = 1, 2
    tok[seg == 0] = 0
    return tok, seg


def test_window_logits_equal_per_window_inference_forward():
    d, v = tiny(DCFG, 0), tiny(VCFG, 1)
    tok, seg = _batch()
    G, W = 4, 6
    lay = jax.jit(functools.partial(C.window_layout, gamma=G, stride=3, windows=W))(tok, seg)
    np.testing.assert_array_equal(np.asarray(lay["starts"]), [[6, 9, 12, 15, 18, 20], [4, 7, 10, 13, 16, 19]])
    # window (0, 3) starts at 15 and scores 15, 16, 17 (the sequence ends at 18); (0, 4) starts at the end
    np.testing.assert_array_equal(np.asarray(lay["valid"][0, 3]), [True, True, True, False])
    assert not bool(lay["valid"][0, 4].any())
    gv, vst = nnx.split(v)
    gd, st = nnx.split(d)

    @jax.jit
    def under_test(st, vst, tok, starts, positions):
        dm, vm = nnx.merge(gd, st), nnx.merge(gv, vst)
        return (C.drafter_window_logits(dm, tok, starts, jnp.full((2, W, G), MASK, jnp.int32)),
                C.verifier_window_logits(vm, tok, positions), vm(tok))

    lg, vl, vfull = under_test(st, vst, jnp.asarray(tok), lay["starts"], lay["positions"])
    T = 24  # every reference window padded to one length: one compile

    @jax.jit
    def ref_forward(st, x, mask):
        return nnx.merge(gd, st).forward(x, jnp.arange(T)[None], mask)[0]

    checked = 0
    for b in range(2):
        for w in range(W):
            t = int(lay["starts"][b, w])
            if not bool(lay["valid"][b, w, 0]):
                continue
            # reference: the inference layout of `d([x_<t ; MASK x G], prefix_len=t)`, padded to T
            x = np.zeros((1, T), np.int32)
            x[0, : t + G] = np.concatenate([tok[b, :t], np.full(G, MASK)])
            mask = np.eye(T, dtype=bool)[None].copy()
            mask[:, : t + G, : t + G] = np.asarray(layout_mask(DCFG, T, t))[:, : t + G, : t + G]
            ref = ref_forward(st, jnp.asarray(x), jnp.asarray(mask))[0, t: t + G]
            np.testing.assert_allclose(np.asarray(lg[b, w]), np.asarray(ref), atol=2e-5)
            for j in range(G):
                if bool(lay["valid"][b, w, j]):
                    np.testing.assert_allclose(np.asarray(vl[b, w, j]), np.asarray(vfull[b, t + j - 1]), atol=2e-5)
                    assert int(lay["targets"][b, w, j]) == tok[b, t + j]
            checked += 1
    assert checked == 10


def test_every_loss_is_finite_with_gradients_on_a_tiny_model():
    """The verifier (kd_window) and noisy-block + window-subset (mdlm) paths in one jitted program (one compile),
    with a target the drafter can never draft (MASK). streak runs end to end below."""
    import optax

    d, v = tiny(DCFG, 0), tiny(VCFG, 1)
    tok, seg = _batch()
    tok[0, 8] = MASK
    gd, st = nnx.split(d)
    gv, vst = nnx.split(v)

    @jax.jit
    def all_losses(st, vst, tok, seg):
        out = {}
        for loss in ("kd_window", "mdlm"):
            s = C.Settings(loss=loss, gamma=4, stride=2, windows=8, windows_per_row=5 if loss == "mdlm" else 0,
                           num_sampleable=V, mask_id=MASK)

            def f(p):
                return C.calibration_loss(s, nnx.merge(gd, p), {"tokens": tok, "segment_ids": seg},
                                          jax.random.PRNGKey(0), nnx.merge(gv, vst))

            (l, m), g = jax.value_and_grad(f, has_aux=True)(st)
            out[loss] = (l, optax.global_norm(g), m["expected_streak"], m["tokens"])
        return out

    out = jax.device_get(all_losses(st, vst, jnp.asarray(tok), jnp.asarray(seg)))
    for loss, (l, gn, es, n) in out.items():
        assert np.isfinite(l) and np.isfinite(gn) and gn > 0, (loss, l, gn)
        assert n == (5 * 2 if loss == "mdlm" else 14), (loss, n)  # windows starting inside a completion


def test_kd_teacher_is_an_input_of_the_train_step_not_a_constant():
    """kd_* objectives hand the verifier's parameters to the jitted step as an argument (Objective.inputs): one
    compiled step serves any teacher of that shape, and each teacher gives its own closed-form-free reference
    loss (calibration_loss with that verifier). A teacher closed over as constants could not be swapped at all."""
    import optax

    from specdiff_jax.training import make_train_step

    d, v1, v2 = tiny(DCFG, 0), tiny(VCFG, 1), tiny(VCFG, 2)
    tok, seg = _batch()
    s = C.Settings(loss="kd_window", gamma=4, stride=2, windows=8, num_sampleable=V, mask_id=MASK)
    obj = C.make_objective(s, v1)
    assert C.make_objective(C.Settings(loss="streak", gamma=4, windows=8), v1).inputs is None
    gd, st = nnx.split(d)
    params = nnx.to_pure_dict(st)
    tx = optax.sgd(0.0)
    step = jax.jit(make_train_step(gd, obj, tx, lambda i: 0.0))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0), "rng": jax.random.PRNGKey(0)}
    batch = {"tokens": jnp.asarray(tok)[None], "segment_ids": jnp.asarray(seg)[None]}
    losses = []
    for v in (v1, v2):
        _, m = step(state, batch, None, nnx.to_pure_dict(nnx.split(v)[1]))
        ref, _ = C.calibration_loss(s, d, {"tokens": jnp.asarray(tok), "segment_ids": jnp.asarray(seg)},
                                    jax.random.PRNGKey(0), v)
        assert float(m["loss"]) == pytest.approx(float(ref), rel=1e-5)
        losses.append(float(m["loss"]))
    assert losses[0] != pytest.approx(losses[1], rel=1e-3), "the two teachers must give different KD losses"
    assert step._cache_size() == 1, "swapping the teacher must not recompile the step"


@pytest.mark.parametrize("loss", ["streak", "kd_first"])
def test_calibrate_step_loss_ignores_empty_windows(loss):
    """The jitted training step of a calibration objective reports the loss over non-empty windows only, on a batch
    where a short completion leaves windows past its end and one row has no completion at all (all windows empty).
    Reference: the same windows (`window_forward`) reduced in numpy over the non-empty ones."""
    import optax

    from specdiff_jax.training import make_train_step

    d, v = tiny(DCFG, 0, std=0.5), tiny(VCFG, 1, std=0.5)
    r = np.random.default_rng(3)
    B, L = 3, 20
    tok = r.integers(4, V, (B, L)).astype(np.int32)
    seg = np.zeros((B, L), np.int32)
    seg[0, :6], seg[0, 6:9] = 1, 2  # 3 completion tokens: windows starting at 10, 12, ... are empty
    seg[1, :4], seg[1, 4:20] = 1, 2
    seg[2, :7] = 1  # a prompt without a completion
    tok[seg == 0] = 0
    s = C.Settings(loss=loss, gamma=4, stride=2, windows=8, num_sampleable=V, mask_id=MASK,
                   verifier_temperature=1.0)
    obj = C.make_objective(s, v if s.needs_verifier else None)
    gd, st = nnx.split(d)
    params = nnx.to_pure_dict(st)
    tx = optax.sgd(0.0)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0), "rng": jax.random.PRNGKey(0)}
    batch = {"tokens": jnp.asarray(tok)[None], "segment_ids": jnp.asarray(seg)[None]}
    aux = nnx.to_pure_dict(nnx.split(v)[1]) if s.needs_verifier else None
    _, m = jax.jit(make_train_step(gd, obj, tx, lambda i: 0.0))(state, batch, None, aux)

    w = jax.device_get(jax.jit(lambda t_, s_: C.window_forward(s, d, t_, s_, None, v))(jnp.asarray(tok),
                                                                                      jnp.asarray(seg)))
    valid = np.asarray(w["valid"])
    nonempty = valid.any(-1)
    assert nonempty.sum() == 2 + 8 and not nonempty.all()  # row 0: 2 windows, row 1: 8, row 2: none
    lq = np.asarray(w["lq"], np.float64)
    if loss == "streak":
        ref = -np.mean([np.cumprod(np.exp(lq[n][valid[n]])).sum() for n in np.flatnonzero(nonempty)])
    else:
        p, logq = np.asarray(w["p"], np.float64), np.asarray(w["logq"], np.float64)
        kl = [np.sum(np.where(p[n, 0] > 0, p[n, 0] * (np.log(np.maximum(p[n, 0], 1e-300)) - logq[n, 0]), 0))
              for n in np.flatnonzero(nonempty)]
        ref = np.mean(kl)
    assert int(m["tokens"]) == 10
    assert float(m["loss"]) == pytest.approx(ref, rel=1e-4)


def test_refuses_unsupported_drafters():
    with pytest.raises(ConfigError, match="block_causal"):
        C.check_drafter(VCFG)
    with pytest.raises(ConfigError, match="unknown"):
        C.Settings(loss="streaky")
    with pytest.raises(ConfigError, match="verifier"):
        C.make_objective(C.Settings(loss="kd_first"), None)


# ------------------------------------------------------------------------------------------------------
# end to end: train.calibrate on a tiny drafter and a synthetic verifier-completions dataset
# ------------------------------------------------------------------------------------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
PROMPT, NEW = 6, 10


@pytest.fixture(scope="module")
def calib_setup(tmp_path_factory):
    """Tiny random drafter + verifier (saved) and a dataset whose completions are a learnable pattern."""
    from specdiff_jax.checkpoint import save_pretrained
    from specdiff_jax.data import verifier_data as vd

    tmp = tmp_path_factory.mktemp("calib")
    save_pretrained(tiny(DCFG, 0), tmp / "drafter")
    save_pretrained(tiny(VCFG, 1), tmp / "verifier")
    r = np.random.default_rng(0)
    recs = []
    for i in range(24):
        n = NEW if i % 3 else 7  # some completions end early (EOS)
        start = int(r.integers(8, 16))
        comp = [8 + (start + k) % 8 for k in range(n)]  # a cycle through 8 ids: learnable from the last token
        if n < NEW:
            comp[-1] = DCFG.eos_token_id
        recs.append({"prompt": r.integers(4, V, PROMPT).tolist(), "completion": comp, "prompt_index": i,
                     "sample_index": 0, "source": f"synthetic/{i}", "split": "validation" if i < 4 else "train"})
    vd.write_dataset(tmp / "data", recs, {"sampling": {"prompt_tokens": PROMPT, "max_new_tokens": NEW}})
    return tmp


def _args(tmp, run: str, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs/calibrate/tiny.yaml"), "--workdir", str(tmp / run),
            f"train.init_from={tmp / 'drafter'}", f"calibrate.data_dir={tmp / 'data'}",
            f"calibrate.verifier={tmp / 'verifier'}", "data.batch_size=4", "data.val_batches=1", "train.steps=8",
            "train.lr=1e-2", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=4",
            "train.progress_bar=false", "checkpoint.save_every=4", "checkpoint.async_save=false",
            "calibrate.windows_per_row=0", "calibrate.stride=1", "calibrate.gamma=4", *extra]


def test_calibration_steps_raise_the_expected_streak_on_training_windows(calib_setup):
    import json

    from specdiff_jax import load_pretrained
    from specdiff_jax.data import verifier_data as vd
    from train import calibrate

    tmp = calib_setup
    assert calibrate.main(_args(tmp, "streak", "loss=streak", "calibrate.eval_prompts=2",
                                "calibrate.eval_max_new_tokens=8")) == 0
    train_src = vd.load_completions(tmp / "data", "train")
    batches = vd.fixed_batches(train_src, seq_len=PROMPT + NEW, batch_size=4)
    s = C.Settings(gamma=4, stride=1, windows=NEW, num_sampleable=V, mask_id=MASK)
    before = C.window_stats(load_pretrained(tmp / "drafter"), batches, s)
    after = C.window_stats(load_pretrained(tmp / "streak" / "export"), batches, s)
    # deterministic (fixed data, init and seeds): measured 0.014 -> 0.114
    assert after["expected_streak"] > max(3 * before["expected_streak"], before["expected_streak"] + 0.05), \
        (before, after)
    recs = [json.loads(line) for line in (tmp / "streak" / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if "expected_streak" in r]
    assert len(train_recs) == 8 and any("val_loss" in r for r in recs)
    ev = json.loads((tmp / "streak" / calibrate.EVAL_FILE).read_text())
    assert ev["loss"] == "streak" and len(ev["windows"]["calibrated"]["alpha"]) == 4
    k = ev["kernel"]["calibrated"]
    assert k["prompts"] == 2 and 1.0 <= k["tokens_per_verifier_call"] <= 5.0 and len(k["alpha"]) == 4
    # The work dir is bound to its loss: resuming it with another one is refused before any training.
    assert calibrate.main(_args(tmp, "streak", "loss=ce_streak", "--no-eval")) == 1
    assert len((tmp / "streak" / "metrics.jsonl").read_text().splitlines()) == len(recs)


def test_report_table_and_alpha_plot(tmp_path):
    from eval.calibration_report import plot_alpha, render

    rows = [{"drafter": "base", "draft_temperature": 0.0, "tokens_per_verifier_call": 2.0, "mean_accepted": 1.0,
             "alpha": [0.5, 0.2, None, None], "accept_rate": [0.5, 0.1, 0.0, 0.0],
             "row_tokens": [4, 4], "row_verifier_calls": [2, 2]},
            {"drafter": "streak", "draft_temperature": 0.0, "tokens_per_verifier_call": 3.0, "mean_accepted": 2.0,
             "alpha": [0.6, 0.5, 0.4, 0.3], "accept_rate": [0.6, 0.3, 0.12, 0.036],
             "row_tokens": [4, 5], "row_verifier_calls": [2, 1]}]
    md = render(rows, {}, {"verifier": "v", "gamma": 4, "num_prompts": 3, "max_new_tokens": 8,
                           "prompt_sources": "3 humaneval"})
    assert "| base | 0 | 2.000 | - | +0.0% | 1.000 | 0.500 | 0.200 | 0.200 | 0.200 | 0.1000 | 0.0333 |" in md
    # tau ratio over the resampled prompt pairs: (8/4)/2 = 1, (10/2)/2 = 2.5, (9/3)/2 = 1.5 -> [+0, +150]
    assert ("| streak | 0 | 3.000 | - | +50.0% [+0, +150] | 2.000 | 0.600 | 0.500 | 0.500 | 0.400 | 0.3000 | 0.1520 |"
            in md), md
    plot_alpha(tmp_path / "alpha.png", rows + [dict(rows[1], draft_temperature=1.0)], "test")
    assert (tmp_path / "alpha.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_bootstrap_interval_covers_the_true_ratio_at_its_level():
    """Prompts with per-prompt tau ratio drawn around a known mean: the 90% interval must cover the population
    ratio in about 90% of 200 trials; a binomial(200, 0.9) count outside [168, 192] has probability < 0.3%."""
    from eval.calibration_report import bootstrap_ratio

    rng = np.random.default_rng(7)

    def draw(n):  # rounds per prompt for base (b) and a drafter about 1.3x better (a); 128 tokens each
        b = rng.integers(60, 90, n)
        return np.maximum((b / rng.normal(1.3, 0.15, n)).round().astype(int), 1), b

    big_a, big_b = draw(400_000)
    truth = big_b.sum() / big_a.sum()  # the population ratio of tau = tokens / rounds
    covered = 0
    for trial in range(200):
        n = 40
        tokens = np.full(n, 128)
        rounds_a, rounds_b = draw(n)
        lo, hi = bootstrap_ratio(tokens, rounds_a, tokens, rounds_b, resamples=1000, seed=trial, level=0.9)
        covered += lo <= truth <= hi
    assert 168 <= covered <= 192, covered


def test_lora_calibration_raises_the_expected_streak(calib_setup):
    """calibrate with train.lora_rank > 0: adapters only, base frozen; the export is an ordinary merged drafter."""
    from specdiff_jax import load_pretrained
    from specdiff_jax.data import verifier_data as vd
    from train import calibrate

    tmp = calib_setup
    assert calibrate.main(_args(tmp, "streak_lora", "loss=streak", "train.lora_rank=4", "train.lora_alpha=16",
                                "--no-eval")) == 0
    train_src = vd.load_completions(tmp / "data", "train")
    batches = vd.fixed_batches(train_src, seq_len=PROMPT + NEW, batch_size=4)
    s = C.Settings(gamma=4, stride=1, windows=NEW, num_sampleable=V, mask_id=MASK)
    base = load_pretrained(tmp / "drafter")
    tuned = load_pretrained(tmp / "streak_lora" / "export")
    before, after = C.window_stats(base, batches, s), C.window_stats(tuned, batches, s)
    assert after["expected_streak"] > before["expected_streak"] + 0.02, (before, after)
    b = nnx.to_pure_dict(nnx.state(base, nnx.Param))
    t = nnx.to_pure_dict(nnx.state(tuned, nnx.Param))
    np.testing.assert_array_equal(np.asarray(t["embed_tokens"]), np.asarray(b["embed_tokens"]))  # not a target
    assert not np.array_equal(np.asarray(t["layers"][0]["self_attn"]["q_proj"]),
                              np.asarray(b["layers"][0]["self_attn"]["q_proj"]))
