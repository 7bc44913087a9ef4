"""Property tests (hypothesis) of the acceptance rules and of the decode kernel's bookkeeping, and same-seed
determinism of decoding (docs/RELIABILITY.md).

Acceptance rules, on random distributions with the structures the filters produce (one-hot = temperature 0,
sparse = top-k / top-p, dense, peaked) and on verifier distributions that depend on the drafted prefix (as a real
verifier's do), whatever the drafts: the number accepted is in [0, gamma], the emitted tokens (x_1..x_n, next) are
sampleable ids (never a padded embedding row, never the mask token) with positive verifier probability, greedy
emits the argmax path, the delta rule's next token differs from the rejected draft, self-selection picks a
best-scoring chain. Decode kernel, on random prompts, EOS ids and seeds: every emitted id is sampleable, EOS only
ends a row, padding after each row's end, and the counts (tokens, verifier calls per row, accepted-length
histogram, alpha) agree with the lengths. Shapes are fixed, so each function compiles once.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specdiff_jax import acceptance as acc
from specdiff_jax import decode
from specdiff_jax.config import ModelConfig
from specdiff_jax.model import Transformer

B, K, G, V = 3, 3, 4, 12
NS, MASK = 10, 9  # ids >= NS are padded embedding rows; MASK is excluded too
ALLOWED = np.arange(V) < NS
ALLOWED[MASK] = False
STYLES = ("onehot", "sparse", "dense", "peaked")
PROPS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _dist(rng: np.random.Generator, style: str) -> np.ndarray:
    """One distribution over V ids, zero outside ALLOWED."""
    ids = np.flatnonzero(ALLOWED)
    p = np.zeros(V)
    if style == "onehot":
        p[rng.choice(ids)] = 1.0
    elif style == "sparse":
        keep = rng.choice(ids, size=rng.integers(1, 4), replace=False)
        p[keep] = rng.dirichlet(np.ones(len(keep)))
    elif style == "dense":
        p[ids] = rng.dirichlet(np.full(len(ids), 0.5))
    else:  # peaked: almost one-hot, tiny mass elsewhere
        p[ids] = 1e-7
        p[rng.choice(ids)] = 1.0
    return (p / p.sum()).astype(np.float32)


def _prefix_seed(seed: int, b: int, j: int, prefix) -> int:
    h = hashlib.sha256(f"{seed}/{b}/{j}/{list(map(int, prefix))}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def make_case(seed: int, p_style: str, q_style: str, greedy_drafts: bool):
    """q [B, G, V], drafts x [B, K, G] (from q, or the argmax path of p), p [B, K, G+1, V] depending on the
    chain's drafted prefix (chains that share a prefix share p_j, as with a real verifier)."""
    rng = np.random.default_rng(seed)
    q = np.stack([np.stack([_dist(rng, q_style) for _ in range(G)]) for _ in range(B)])
    x = np.zeros((B, K, G), np.int32)
    p = np.zeros((B, K, G + 1, V), np.float32)
    for b in range(B):
        for k in range(K):
            for j in range(G + 1):
                pj = _dist(np.random.default_rng(_prefix_seed(seed, b, j, x[b, k, :j])), p_style)
                p[b, k, j] = pj
                if j < G:
                    x[b, k, j] = int(np.argmax(pj)) if greedy_drafts and k == 0 else \
                        int(rng.choice(V, p=q[b, j].astype(np.float64) / q[b, j].astype(np.float64).sum()))
    return jnp.asarray(p), jnp.asarray(q), jnp.asarray(x)


CASE = st.tuples(st.integers(0, 2**32 - 1), st.sampled_from(STYLES), st.sampled_from(STYLES), st.booleans())
_greedy, _pq, _delta = jax.jit(acc.greedy), jax.jit(acc.pq), jax.jit(acc.delta)
_multi, _select, _scores = jax.jit(acc.multi_draft), jax.jit(acc.select_drafts), jax.jit(acc.chain_scores)


def check_emitted(p_chain: np.ndarray, x_chain: np.ndarray, n: np.ndarray, nxt: np.ndarray) -> None:
    """p_chain [B, G+1, V], x_chain [B, G]: n in [0, G]; x_1..x_n and next sampleable, next has p_{n+1} > 0."""
    assert n.shape == (B,) and nxt.shape == (B,)
    assert ((0 <= n) & (n <= G)).all(), n
    for b in range(B):
        emitted = list(x_chain[b, : n[b]]) + [int(nxt[b])]
        assert len(emitted) == n[b] + 1
        assert all(0 <= t < V and ALLOWED[t] for t in emitted), (b, emitted)
        assert p_chain[b, n[b], nxt[b]] > 0, (b, n[b], nxt[b])


@PROPS
@given(CASE)
def test_greedy_emits_the_argmax_path(case):
    p, q, x = make_case(*case)
    n, nxt = map(np.asarray, _greedy(p[:, 0], x[:, 0]))
    pn, xn = np.asarray(p[:, 0]), np.asarray(x[:, 0])
    check_emitted(pn, xn, n, nxt)
    target = pn.argmax(-1)
    for b in range(B):
        assert (xn[b, : n[b]] == target[b, : n[b]]).all() and nxt[b] == target[b, n[b]]
        assert n[b] == G or xn[b, n[b]] != target[b, n[b]]


@PROPS
@given(CASE, st.integers(0, 2**31 - 1))
def test_pq_and_delta_emit_sampleable_tokens(case, key):
    p, q, x = make_case(*case)
    pn, xn = np.asarray(p[:, 0]), np.asarray(x[:, 0])
    k = jax.random.key(key)
    n, nxt = map(np.asarray, _pq(p[:, 0], q, x[:, 0], k))
    check_emitted(pn, xn, n, nxt)
    n, nxt = map(np.asarray, _delta(p[:, 0], x[:, 0], k))
    check_emitted(pn, xn, n, nxt)
    for b in range(B):  # a rejected draft token is never the token emitted in its place
        assert n[b] == G or nxt[b] != xn[b, n[b]]


@PROPS
@given(CASE, st.integers(0, 2**31 - 1))
def test_multi_draft_and_self_selection(case, key):
    p, q, x = make_case(*case)
    n, nxt, chain = map(np.asarray, _multi(p, q, x, jax.random.key(key)))
    assert chain.shape == (B,) and ((0 <= chain) & (chain < K)).all()
    pa, xa = np.asarray(p), np.asarray(x)
    check_emitted(pa[np.arange(B), chain], xa[np.arange(B), chain], n, nxt)
    sel, scores = np.asarray(_select(p, x)), np.asarray(_scores(p, x))
    assert ((0 <= sel) & (sel < K)).all()
    assert ((scores >= 0) & (scores <= G + 1e-4)).all()
    assert (scores[np.arange(B), sel] >= scores.max(-1) - 1e-6).all()
    if case[1] == "onehot":  # at temperature 0 the score is the length of the prefix on the argmax path
        match = (xa == pa[:, :, :G].argmax(-1)).astype(int)
        np.testing.assert_allclose(scores, np.cumprod(match, -1).sum(-1), atol=1e-5)


# --- the kernel -----------------------------------------------------------------------------------------------

N = 12  # max_new_tokens
KV = dict(vocab_size=96, sample_vocab_size=90, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
          head_dim=16, intermediate_size=64, max_seq_len=64, mask_token_id=89, pad_token_id=0)
K_NS, K_MASK = 90, 89  # the verifier shares the drafter's tokenizer: the mask id is never emitted either


@pytest.fixture(scope="module")
def kernel_models():
    from tests.test_decode import _biased

    v = _biased(Transformer(ModelConfig(**KV), rngs=nnx.Rngs(0)), 7, 0.3, 1.0, scale=5.0)
    d = _biased(Transformer(ModelConfig(**KV, attention="block_causal"), rngs=nnx.Rngs(1)), 7, 1.0, 3.0)
    return v, d


KERNELS = {  # method settings (one compiled kernel each)
    "specdiff2_delta_T2": dict(method="specdiff2", gamma=4, num_drafts=3, denoise_steps=2, temperature=1.0,
                               top_k=20, draft_temperature=1.5),
    "specdiff_multi_draft": dict(method="specdiff", gamma=4, num_drafts=2, temperature=0.7, top_p=0.9),
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_outputs_and_counts_are_consistent(kernel_models, name):
    v, d = kernel_models

    @settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(prompts=st.lists(st.lists(st.integers(0, K_NS - 1), min_size=1, max_size=14), min_size=2, max_size=2),
           eos=st.one_of(st.none(), st.integers(0, K_NS - 1)), seed=st.integers(0, 2**31 - 1))
    def prop(prompts, eos, seed):
        dec = decode.Decoder(v, d, method=KERNELS[name]["method"], max_new_tokens=N, eos_id=eos,
                             **{k: x for k, x in KERNELS[name].items() if k != "method"})
        out = dec(prompts, seed=seed)
        st_ = out.stats
        gamma = KERNELS[name]["gamma"]
        assert out.tokens.shape == (2, N) and ((1 <= out.lengths) & (out.lengths <= N)).all()
        rr = np.asarray(st_["row_verifier_calls"])
        for b in range(2):
            row, n = out.tokens[b], int(out.lengths[b])
            assert ((row[:n] < K_NS) & (row[:n] != K_MASK)).all(), row  # never a padded row, never the mask
            assert (row[n:] == 0).all()  # padding after the end
            if eos is not None:
                assert eos not in row[: n - 1].tolist()  # EOS only ends a row
                assert n == N or row[n - 1] == eos  # a row ends early only at EOS
            assert rr[b] <= n <= rr[b] * (gamma + 1)  # 1..gamma+1 tokens per verifier call
        hist = np.asarray(st_["accepted_hist"])
        assert st_["tokens"] == int(out.lengths.sum()) and hist.sum() == rr.sum()
        assert st_["verifier_calls"] == rr.max()
        assert st_["tokens_per_verifier_call"] == pytest.approx(out.lengths.sum() / rr.sum())
        assert all(a is None or 0.0 <= a <= 1.0 for a in st_["alpha"])  # None: position never reached
        assert sum(st_["accept_counts"]) == int(np.dot(np.arange(gamma + 1), hist))

    prop()


# --- determinism of decoding ----------------------------------------------------------------------------------


def test_decoding_is_deterministic_per_seed(kernel_models):
    """Same seed (and device count) -> identical tokens and statistics, also from a new Decoder; another seed
    gives other samples (so the comparison can fail)."""
    v, d = kernel_models
    kw = dict(KERNELS["specdiff2_delta_T2"])
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    a = decode.Decoder(v, d, max_new_tokens=N, **kw)(prompts, seed=123)
    b = decode.Decoder(v, d, max_new_tokens=N, **kw)(prompts, seed=123)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    assert a.stats == b.stats
    others = [decode.Decoder(v, d, max_new_tokens=N, **kw)(prompts, seed=s).tokens for s in (124, 125, 126)]
    assert any(not np.array_equal(o, a.tokens) for o in others)
