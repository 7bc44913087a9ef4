"""Acceptance rules, self-selection and the sampling filter: exact on hand-made distributions, and statistical
losslessness of the full jitted kernel at temperature > 0.

Statistical tests: the joint law of the first 4 tokens a method emits is compared with the verifier's exact law
(enumerated by full forwards without a cache over every continuation, 4^4 outcomes) by a chi-square test with
false-alarm rate ALPHA = 1e-4 per test (cells with expected count < 5 are pooled; a sample of a zero-probability
sequence fails outright). The models have O(1) weights, so attention (positions, the cache) changes the law; gamma
<= 2 makes every row span at least two rounds; every sampling rule (ar, pq, delta, multi_draft) runs plain, with
top-k and with top-p, and each drafted case must show rejections and whole accepted drafts. The seeds are fixed,
so each test's outcome is deterministic; over random seeds a correct kernel would fail one with probability ALPHA.
Deliberately wrong rules must be rejected by the same test (their p-value must fall below ALPHA), which shows the
test has the power to see a wrong residual."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from specdiff_jax import acceptance as acc
from specdiff_jax import decode
from specdiff_jax.config import ModelConfig
from specdiff_jax.model import Transformer
from specdiff_jax.sampling import probs, sample

KEY = jax.random.key(0)
# jitted once per shape: much cheaper than eager op-by-op dispatch on a loaded CPU
greedy, pq, delta, multi_draft = (jax.jit(f) for f in (acc.greedy, acc.pq, acc.delta, acc.multi_draft))


def onehot(ids, V=5):
    return jax.nn.one_hot(jnp.asarray(ids), V, dtype=jnp.float32)


# --- sampling filter ----------------------------------------------------------------------------------
def test_filter_temperature_zero_is_argmax_over_allowed_ids():
    logits = jnp.array([[1.0, 5.0, 9.0, 3.0]])
    # id 2 (the best) is the mask token, id 3 is past num_sampleable: argmax must be id 1
    p = probs(logits, temperature=0.0, num_sampleable=3, exclude=(2,))
    np.testing.assert_array_equal(p, [[0, 1, 0, 0]])


def test_filter_top_k_top_p_temperature_by_hand():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
    p = probs(logits, temperature=1.0, top_k=2)
    np.testing.assert_allclose(p, [[0, 4 / 7, 0, 3 / 7]], rtol=1e-6)
    # top_p=0.6: sorted 0.4, 0.3 (mass before 0.3 is 0.4 < 0.6, before 0.2 is 0.7 >= 0.6) -> keep {1, 3}
    p = probs(logits, temperature=1.0, top_p=0.6)
    np.testing.assert_allclose(p, [[0, 4 / 7, 0, 3 / 7]], rtol=1e-6)
    p = probs(logits, temperature=1.0, top_p=0.3)  # only the most likely token survives
    np.testing.assert_allclose(p, [[0, 1, 0, 0]], atol=1e-7)
    p = probs(logits, temperature=0.5)  # p^2 renormalised
    w = np.array([0.01, 0.16, 0.04, 0.09])
    np.testing.assert_allclose(p, [w / w.sum()], rtol=1e-5)
    p = probs(logits, temperature=1.0, num_sampleable=3, exclude=(1,))
    np.testing.assert_allclose(p, [[1 / 3, 0, 2 / 3, 0]], rtol=1e-6)


def test_sample_never_draws_zero_probability_ids():
    p = jnp.broadcast_to(jnp.array([0.0, 0.5, 0.0, 0.5]), (4000, 4))
    x = np.asarray(sample(KEY, p))
    assert set(np.unique(x)) == {1, 3}


def test_sample_frequencies_large_vocab():
    # V > 256 takes the blocked-cumsum path; first, last and a mid-block id; chi-square, false alarm 1e-4
    V, ids, w = 1000, [0, 500, 999], np.array([0.2, 0.5, 0.3])
    p = jnp.zeros(V).at[jnp.array(ids)].set(jnp.asarray(w, jnp.float32))
    x = np.asarray(jax.jit(lambda k: sample(k, p, shape=(100000,)))(KEY))
    assert set(np.unique(x)) <= set(ids)
    counts = np.array([(x == i).sum() for i in ids])
    assert stats.chisquare(counts, w * len(x)).pvalue > 1e-4


# --- single-chain rules on hand-made distributions ----------------------------------------------------
def test_greedy_by_hand():
    # row 0 accepts all 3 drafts, bonus 4; row 1 accepts 1, then emits argmax p_2 = 3
    p = jnp.stack([onehot([1, 2, 0, 4]), onehot([1, 3, 2, 0])])
    x = jnp.array([[1, 2, 0], [1, 2, 2]])
    n, nxt = greedy(p, x)
    np.testing.assert_array_equal(n, [3, 1])
    np.testing.assert_array_equal(nxt, [4, 3])


def test_pq_by_hand():
    # p_j(x_j) >= q_j(x_j) -> always accepted; p_j(x_j) = 0 -> always rejected, whatever the coins.
    p1 = jnp.array([0.5, 0.3, 0.2, 0.0, 0.0])
    q1 = jnp.array([0.2, 0.6, 0.2, 0.0, 0.0])
    p = jnp.stack([jnp.stack([p1, p1, onehot(3)]), jnp.stack([p1, p1, onehot(3)])])
    q = jnp.stack([jnp.stack([q1, q1]), jnp.stack([q1, q1])])
    x = jnp.array([[0, 2], [0, 3]])  # row 0: 0.5 >= 0.2, 0.2 >= 0.2: both accepted; row 1: x_2 = 3 has p = 0
    for seed in range(5):
        n, nxt = pq(p, q, x, jax.random.key(seed))
        np.testing.assert_array_equal(n, [2, 1])
        # row 0: bonus from p_3 = onehot(3); row 1: residual norm(max(0, p - q)) = [0.3, 0, 0, ...] -> id 0
        np.testing.assert_array_equal(nxt, [3, 0])
    np.testing.assert_allclose(acc.pq_residual(p1, q1), [1, 0, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(acc.pq_residual(q1, p1), [0, 1, 0, 0, 0], atol=1e-7)
    r = acc.pq_residual(jnp.array([0.5, 0.5, 0.0]), jnp.array([0.1, 0.3, 0.6]))
    np.testing.assert_allclose(r, [2 / 3, 1 / 3, 0], rtol=1e-6)


def test_pq_acceptance_probability_is_min_one_p_over_q():
    B = 20000
    p = jnp.broadcast_to(jnp.array([[0.3, 0.7], [0.5, 0.5]]), (B, 2, 2))
    q = jnp.broadcast_to(jnp.array([[0.6, 0.4]]), (B, 1, 2))
    n, nxt = pq(p, q, jnp.zeros((B, 1), jnp.int32), KEY)
    rate = float(jnp.mean(n))
    assert abs(rate - 0.5) < 4.5 * np.sqrt(0.25 / B)  # 4.5 sigma: false alarm < 1e-5
    # rejected rows emit the residual norm(max(0, p - q)) = onehot(1)
    assert bool(jnp.all(jnp.where(n == 0, nxt == 1, True)))


def test_delta_by_hand():
    p_a = jnp.array([0.5, 0.5, 0.0, 0.0, 0.0])
    p = jnp.stack([jnp.stack([onehot(2), onehot(1), onehot(4)]), jnp.stack([onehot(2), p_a, onehot(4)])])
    x = jnp.array([[2, 1], [2, 1]])
    for seed in range(5):
        n, nxt = delta(p[:1], x[:1], jax.random.key(seed))  # p(x) = 1 twice: accept both, bonus 4
        np.testing.assert_array_equal(n, [2])
        np.testing.assert_array_equal(nxt, [4])
    # row 1: x_2 = 1 has p = 0.5; on rejection the residual is p without id 1 = onehot(0)
    n, nxt = delta(jnp.broadcast_to(p[1:], (4000, 3, 5)), jnp.broadcast_to(x[1:], (4000, 2)), KEY)
    n, nxt = np.asarray(n), np.asarray(nxt)
    assert set(np.unique(n)) == {1, 2}
    assert np.all(nxt[n == 1] == 0) and np.all(nxt[n == 2] == 4)
    assert abs(np.mean(n == 2) - 0.5) < 4.5 * np.sqrt(0.25 / 4000)
    np.testing.assert_allclose(acc.delta_residual(jnp.array([0.2, 0.3, 0.5]), jnp.array(2)), [0.4, 0.6, 0])


def test_multi_draft_by_hand():
    # depth 1: both chains propose 2 with p(2) = 0 -> both rejected; residual after chain 0:
    # norm(max(0, p - q)) = [1, 0, 0]; after chain 1: still [1, 0, 0] -> emits 0, n = 0
    p1 = jnp.array([0.6, 0.4, 0.0])
    q1 = jnp.array([0.0, 0.5, 0.5])
    p = jnp.broadcast_to(jnp.stack([p1, onehot(1, 3)]), (1, 2, 2, 3))
    n, nxt, chain = multi_draft(p, q1[None, None], jnp.array([[[2], [2]]]), KEY)
    np.testing.assert_array_equal(n, [0])
    np.testing.assert_array_equal(nxt, [0])

    # G=2: chains [0, 2] and [0, 1]. Depth 1: p(0) = 1 >= q(0): chain 0 accepted, both survive (same token).
    # Depth 2: chain 0's token 2 has p = 0 -> rejected, r = norm(max(0, p - q)); chain 1's token 1 has
    # r(1) = 1 >= q(1): accepted. n = 2, chain 1 committed, bonus = argmax p_3 of chain 1 = 2.
    p_d1 = onehot(0, 3)
    p_d2 = jnp.array([0.0, 1.0, 0.0])
    q = jnp.array([[[0.5, 0.25, 0.25], [0.0, 0.5, 0.5]]])
    p = jnp.array([[[p_d1, p_d2, onehot(0, 3)], [p_d1, p_d2, onehot(2, 3)]]])
    for seed in range(5):
        n, nxt, chain = multi_draft(p, q, jnp.array([[[0, 2], [0, 1]]]), jax.random.key(seed))
        np.testing.assert_array_equal(n, [2])
        np.testing.assert_array_equal(chain, [1])
        np.testing.assert_array_equal(nxt, [2])


def test_multi_draft_carries_the_residual_across_rejections():
    """Three chains, all rejected at depth 1, where the running residual differs from p after each rejection.

    p = [0.5, 0.5, 0], q = [0.1, 0.4, 0.5]; drafts 2, 2, 1. Chain 0: p(2) = 0, rejected; r1 = norm(max(0, p - q))
    = [0.8, 0.2, 0]. Chain 1: r1(2) = 0, rejected; r2 = norm(max(0, r1 - q)) = [1, 0, 0]. Chain 2: r2(1) = 0,
    rejected; the next token is drawn from norm(max(0, r2 - q)) = [1, 0, 0]. So every row emits n = 0, next = 0
    whatever the coins. A residual restarted from p (r = norm(max(0, p - q)) = [0.8, 0.2, 0] before chain 2) would
    accept chain 2's token 1 with probability 1/2.
    """
    B = 2000
    p1 = jnp.array([0.5, 0.5, 0.0])
    q = jnp.broadcast_to(jnp.array([[0.1, 0.4, 0.5]]), (B, 1, 3))
    p = jnp.broadcast_to(jnp.stack([p1, onehot(2, 3)]), (B, 3, 2, 3))
    x = jnp.broadcast_to(jnp.array([[2], [2], [1]]), (B, 3, 1))
    np.testing.assert_allclose(acc.pq_residual(acc.pq_residual(p1, q[0, 0]), q[0, 0]), [1, 0, 0], atol=1e-7)
    n, nxt, _ = multi_draft(p, q, x, KEY)
    np.testing.assert_array_equal(n, np.zeros(B))
    np.testing.assert_array_equal(nxt, np.zeros(B))


def test_select_drafts_by_hand():
    # chain scores: 0.9 + 0.9*0.1 = 0.99; 0.5 + 0.5*0.9 = 0.95; 1.0 + 1.0*0 = 1.0 -> chain 2
    V = 4
    x = jnp.array([[[0, 1], [2, 3], [1, 0]]])

    def dist(tok, prob):
        rest = (1 - prob) / (V - 1)
        return jnp.where(jnp.arange(V) == tok, prob, rest)

    p = jnp.array([[[dist(0, .9), dist(1, .1), dist(0, 1)],
                    [dist(2, .5), dist(3, .9), dist(0, 1)],
                    [dist(1, 1.), dist(0, 0.), dist(0, 1)]]])
    np.testing.assert_allclose(acc.chain_scores(p, x), [[0.99, 0.95, 1.0]], rtol=1e-5)
    np.testing.assert_array_equal(acc.select_drafts(p, x), [2])
    # temperature 0: one-hot p, score = length of the prefix matching the argmax path
    p0 = jnp.stack([onehot([0, 1, 3], V), onehot([0, 2, 3], V), onehot([3, 0, 0], V)])[None]
    np.testing.assert_allclose(acc.chain_scores(p0, x), [[2, 0, 0]])
    x2 = jnp.array([[[0, 3], [0, 2], [3, 3]]])  # matches: 1, 2, 0 -> chain 1
    np.testing.assert_array_equal(acc.select_drafts(p0, x2), [1])


def test_resolve_acceptance_auto_and_refusals():
    r = acc.resolve_acceptance
    assert r("ar", "auto", temperature=0, num_drafts=1, denoise_steps=1) == "greedy"
    assert r("sps", "auto", temperature=1, num_drafts=1, denoise_steps=1) == "pq"
    assert r("specdiff", "auto", temperature=1, num_drafts=1, denoise_steps=1) == "pq"
    assert r("specdiff", "auto", temperature=1, num_drafts=1, denoise_steps=2) == "delta"
    assert r("specdiff", "auto", temperature=1, num_drafts=4, denoise_steps=1) == "multi_draft"
    assert r("specdiff2", "auto", temperature=1, num_drafts=4, denoise_steps=2) == "delta"
    assert r("specdiff2", "auto", temperature=0, num_drafts=4, denoise_steps=2) == "greedy"
    with pytest.raises(acc.AcceptanceError, match="self-selection"):
        r("specdiff2", "pq", temperature=1, num_drafts=4, denoise_steps=1)
    with pytest.raises(acc.AcceptanceError, match="denoise_steps=3 is not lossless"):
        r("specdiff", "pq", temperature=1, num_drafts=1, denoise_steps=3)
    with pytest.raises(acc.AcceptanceError, match="only lossless at temperature 0"):
        r("specdiff", "greedy", temperature=0.7, num_drafts=1, denoise_steps=1)
    with pytest.raises(acc.AcceptanceError, match="not lossless"):
        r("specdiff", "multi_draft", temperature=1, num_drafts=4, denoise_steps=2)
    with pytest.raises(acc.AcceptanceError, match="unknown"):
        r("specdiff", "bogus", temperature=1, num_drafts=1, denoise_steps=1)


# --- statistical losslessness of the full kernel --------------------------------------------------------
ALPHA = 1e-4  # false-alarm rate of each chi-square test
NS = 4  # sampleable vocabulary (ids 4 and 5 are padded rows, 5 is the drafters' mask): 4^4 = 256 joint outcomes
NTOK = 4  # emitted tokens compared: with gamma <= 2 every row needs at least 2 rounds (cache reuse across rounds)
ROWS = 12000  # samples per check (rows of one batched generate call)
PROMPT = [1, 3, 0, 2, 2]
CFG = ModelConfig(vocab_size=NS + 2, sample_vocab_size=NS, hidden_size=32, num_layers=1, num_heads=4,
                  num_kv_heads=2, head_dim=8, intermediate_size=64, max_seq_len=64)


@pytest.fixture(scope="module")
def models():
    """O(1) weights (as tests/test_model.py builds them): attention is far from uniform, so a position or cache error
    in a later round changes the law, and p and q are far from each other (acceptance ~0.4-0.7)."""
    import dataclasses

    from tests.test_model import randomized

    block = dataclasses.replace(CFG, attention="block_causal", mask_token_id=NS + 1)
    return tuple(nnx.merge(*randomized(cfg, seed)) for cfg, seed in ((CFG, 21), (block, 22), (CFG, 23)))


def exact_law(verifier, *, temperature, top_k=0, top_p=1.0, n=NTOK):
    """P(y_1..y_n | PROMPT) under the verifier alone, float64[NS]*n, by enumeration (full forwards, no cache)."""
    seqs = np.array([PROMPT + list(s) for s in itertools.product(range(NS), repeat=n - 1)], np.int32)
    logits = verifier(jnp.asarray(seqs))[..., :NS]  # [NS^(n-1), P+n-1, NS]
    P = len(PROMPT)
    law = np.ones(())
    for i in range(n):
        # p(y_{i+1} | y_1..y_i): read at position P-1+i of the sequences that continue y_1..y_i with zeros
        pi = np.asarray(probs(logits[:, P - 1 + i], temperature=temperature, top_k=top_k, top_p=top_p,
                              num_sampleable=NS), np.float64).reshape((NS,) * (n - 1) + (NS,))
        law = law[..., None] * pi[(slice(None),) * i + (0,) * (n - 1 - i)]
    return law


def chi2_pvalue(tokens, law):
    n = law.ndim
    idx = np.ravel_multi_index(tuple(tokens[:, i] for i in range(n)), (NS,) * n)
    counts = np.bincount(idx, minlength=NS ** n).astype(np.float64)
    expected = law.reshape(-1) * len(tokens)
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        if obs[-1] > 0:  # sequences of probability zero were emitted
            return 0.0
        obs, exp = obs[:-1], exp[:-1]
    assert obs.sum() == len(tokens)
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def run_kernel(verifier, drafter, method, *, rule=None, temperature=1.0, top_k=0, top_p=1.0, seed=1, **kw):
    dec = decode.Decoder(verifier, drafter, method=method, max_new_tokens=NTOK, temperature=temperature,
                         top_k=top_k, top_p=top_p, **kw)
    if rule is not None:  # test hook: force a (possibly wrong) rule past the lossless check
        dec.rule = rule
    out = dec([PROMPT] * ROWS, seed=seed)
    assert np.all(out.lengths == NTOK)
    return out


# Every rule that samples (ar's own sampling, pq, delta, multi_draft) plain, with top-k and with top-p.
CASES = {
    "ar": dict(method="ar"),
    "ar_top_k_top_p": dict(method="ar", temperature=0.8, top_k=3, top_p=0.85),
    "specdiff_pq": dict(method="specdiff", gamma=2, acceptance="pq", draft_temperature=1.0),
    "specdiff_pq_top_k": dict(method="specdiff", gamma=1, acceptance="pq", top_k=3),
    "sps_pq_top_p": dict(method="sps", gamma=2, acceptance="pq", temperature=0.8, top_p=0.85),
    "specdiff_delta_T2": dict(method="specdiff", gamma=2, denoise_steps=2, acceptance="delta", draft_temperature=1.5),
    "specdiff_delta_T2_top_p": dict(method="specdiff", gamma=2, denoise_steps=2, acceptance="delta", top_p=0.85),
    "specdiff2_selection_delta_top_k": dict(method="specdiff2", gamma=2, num_drafts=3, acceptance="delta",
                                            draft_temperature=2.0, top_k=3),
    "specdiff_multi_draft": dict(method="specdiff", gamma=2, num_drafts=3, acceptance="multi_draft"),
    "specdiff_multi_draft_top_k": dict(method="specdiff", gamma=1, num_drafts=3, acceptance="multi_draft", top_k=3),
    "specdiff_multi_draft_top_p": dict(method="specdiff", gamma=2, num_drafts=2, acceptance="multi_draft",
                                       top_p=0.85),
    # the other settings the auto planner may choose at temperature > 0
    "specdiff2_one_draft_pq": dict(method="specdiff2", gamma=2, acceptance="auto", draft_temperature=1.0),
    "specdiff2_multi_draft": dict(method="specdiff2", gamma=2, num_drafts=3, acceptance="auto",
                                  draft_temperature=1.0),
    "specdiff2_adaptive_gamma_delta": dict(method="specdiff2", gamma=2, num_drafts=2, acceptance="delta",
                                           adaptive_gamma=[1, 2], draft_temperature=1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_is_lossless_at_temperature(models, case):
    verifier, block, ar = models
    kw = dict(CASES[case])
    method = kw.pop("method")
    drafter = {"ar": None, "sps": ar}.get(method, block)
    out = run_kernel(verifier, drafter, method, **kw)
    law = exact_law(verifier, temperature=kw.get("temperature", 1.0), top_k=kw.get("top_k", 0),
                    top_p=kw.get("top_p", 1.0))
    pv = chi2_pvalue(out.tokens, law)
    assert pv > ALPHA, f"{case}: chi-square p-value {pv:.2e} <= {ALPHA}: emitted tokens are not distributed as AR"
    assert min(out.stats["row_verifier_calls"]) >= 2  # every row's tokens span at least two rounds
    if method != "ar":  # the drafts must matter: rejections, and whole drafts accepted (the bonus-token path)
        hist = np.asarray(out.stats["accepted_hist"])
        assert hist[0] > 0 and hist[1:].sum() > 0 and hist[-1] > 0, hist


def _pq_without_residual(p, q, x, key):
    """Wrong on purpose: on rejection sample p instead of norm(max(0, p - q))."""
    B, G = x.shape
    ku, kr = jax.random.split(key)
    px = jnp.take_along_axis(p[:, :G], x[..., None], -1)[..., 0]
    qx = jnp.take_along_axis(q, x[..., None], -1)[..., 0]
    n = acc._leading(jax.random.uniform(ku, (B, G)) * qx < px)
    return n, sample(kr, acc._at(p, n))


@pytest.mark.parametrize("wrong", ["greedy_at_temperature_1", "pq_without_residual"])
def test_wrong_rules_fail_the_same_check(models, wrong, monkeypatch):
    verifier, block, _ = models
    if wrong == "pq_without_residual":
        monkeypatch.setitem(decode.EXTRA_RULES, "pq_no_residual", _pq_without_residual)
        out = run_kernel(verifier, block, "specdiff", gamma=2, acceptance="pq", rule="pq_no_residual")
    else:  # accept on equality with the verifier's argmax at temperature 1, emit its argmax at a mismatch
        out = run_kernel(verifier, block, "specdiff", gamma=2, acceptance="delta", rule="greedy")
    pv = chi2_pvalue(out.tokens, exact_law(verifier, temperature=1.0))
    assert pv < ALPHA, f"the wrong rule {wrong} passed the losslessness check (p-value {pv:.2e})"
