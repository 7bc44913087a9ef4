"""The transformer and its KV cache: cached decoding equals the full forward (f32, 1e-5) for prefill + token by
token, ragged multi-token blocks with rollback, K chains over one shared prefix, and the block-causal drafter's
exact prefix cache; config validation; bf16. Every call goes through split/merge + jax.jit."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import traversals

from specdiff_jax import ConfigError, KVCache, ModelConfig, Transformer
from tests.conftest import tiny_config

TOL = 1e-5
CFG = tiny_config(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
DRAFTER = dataclasses.replace(CFG, attention="block_causal", block_size=4, mask_token_id=63)


def randomized(cfg: ModelConfig, seed: int):
    """(graphdef, state) with every parameter random and O(1) activations, so that attention is far from uniform
    and a masking error shows up in the logits (the default init, std 0.02, would hide it). Numpy draws on an
    abstract model: no random init is compiled."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    flat = traversals.flatten_mapping(nnx.to_pure_dict(state))
    rng = np.random.RandomState(seed)
    new = {}
    for path, x in sorted(flat.items(), key=lambda kv: str(kv[0])):
        n = rng.standard_normal(x.shape).astype(np.float32)
        name = str(path[-1])
        if "layernorm" in str(path) or path[0] == "norm":
            v = 1.0 + 0.2 * n
        elif name.endswith("bias"):
            v = 0.3 * n
        elif name == "embed_tokens":
            v = n
        else:
            v = n / np.sqrt(x.shape[0])
        new[path] = jnp.asarray(v, x.dtype)
    nnx.replace_by_pure_dict(state, traversals.unflatten_mapping(new))
    return graphdef, state


@functools.partial(jax.jit, static_argnums=0)
def full(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


@functools.partial(jax.jit, static_argnums=0)
def fwd(graphdef, state, tokens, positions, block_mask, cache):
    return nnx.merge(graphdef, state).forward(tokens, positions, block_mask, cache)


@functools.partial(jax.jit, static_argnums=0)
def full_kv(graphdef, state, tokens):
    B, L = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(L), (B, L))
    return nnx.merge(graphdef, state).forward(tokens, pos, jnp.tril(jnp.ones((1, L, L), bool)))


def garbage_cache(cfg, batch, capacity, seed=0) -> KVCache:
    """An empty cache (lengths 0) whose stale entries are large noise: attention must mask them."""
    rng = np.random.RandomState(seed)
    shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
    dt = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    noise = lambda: jnp.asarray(3 * rng.standard_normal(shape), dt)  # noqa: E731
    layers = range(cfg.num_layers)
    return KVCache(tuple(noise() for _ in layers), tuple(noise() for _ in layers), jnp.zeros(batch, jnp.int32))


@jax.jit
def put(cache: KVCache, k, v, offsets, lengths) -> KVCache:
    """Write a block at per-row offsets and set the lengths (one compiled call instead of eager ops)."""
    return cache.write(k, v, jnp.asarray(offsets, jnp.int32)).with_lengths(lengths)


@jax.jit
def append1(cache: KVCache, k, v) -> KVCache:
    return cache.append(k, v, jnp.ones(cache.batch, jnp.int32))


def tril(n):
    return jnp.tril(jnp.ones((1, n, n), bool))


def arange_pos(batch, start, n):
    return jnp.broadcast_to(jnp.arange(start, start + n, dtype=jnp.int32), (batch, n))


def maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.fixture(scope="module", autouse=True)
def _exact_matmuls():
    # On GPUs f32 matmuls may default to TF32, which is far from 1e-5; CPUs are unaffected.
    with jax.default_matmul_precision("highest"):
        yield


ERRS: dict[str, float] = {}  # measured max |cached - full| logit differences, printed at the end (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if ERRS:
        print("\ncached vs full forward (max abs logit diff, f32):")
        for k, v in ERRS.items():
            print(f"  {k}: {v:.2e}")


@pytest.fixture(scope="module")
def verifier():
    return randomized(CFG, 0)


@pytest.fixture(scope="module")
def drafter():
    return randomized(DRAFTER, 1)


def test_random_model_is_not_trivial(verifier):
    g, s = verifier
    toks = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 12)), jnp.int32)
    logits = full(g, s, toks)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 12, 64)
    assert float(jnp.std(logits)) > 0.5


def test_prefill_then_token_by_token(verifier):
    g, s = verifier
    B, L, P = 2, 12, 5
    toks = jnp.asarray(np.random.RandomState(1).randint(0, 64, (B, L)), jnp.int32)
    ref = full(g, s, toks)
    cache = garbage_cache(CFG, B, 16)
    logits, k, v = fwd(g, s, toks[:, :P], arange_pos(B, 0, P), tril(P), cache)
    err = maxdiff(logits, ref[:, :P])
    cache = put(cache, k, v, np.zeros(B), np.full(B, P))
    for t in range(P, L):
        logits, k, v = fwd(g, s, toks[:, t:t + 1], arange_pos(B, t, 1), jnp.ones((1, 1, 1), bool), cache)
        err = max(err, maxdiff(logits[:, 0], ref[:, t]))
        cache = append1(cache, k, v)
    ERRS["prefill + token by token"] = err
    assert err < TOL, err
    assert cache.lengths.tolist() == [L, L]
    _, kf, vf = full_kv(g, s, toks)
    ck, cv = cache.stacked()
    assert maxdiff(ck[:, :, :, :L], kf.swapaxes(2, 3)) < TOL and maxdiff(cv[:, :, :, :L], vf.swapaxes(2, 3)) < TOL


def test_ragged_blocks_at_per_row_offsets_with_rollback(verifier):
    """Rows of different lengths; blocks of n=3 written at per-row offsets; each row then keeps a different
    number of the block's entries (as after speculative acceptance), so the next block overwrites stale ones."""
    g, s = verifier
    rng = np.random.RandomState(2)
    B, T, n, S = 3, 20, 3, 24
    lengths = np.array([14, 10, 17])
    toks = jnp.asarray(rng.randint(0, 64, (B, T)), jnp.int32)
    ref = np.asarray(full(g, s, toks))  # causal: positions < lengths[b] ignore the padding after them
    P = np.array([4, 6, 3])
    cache = garbage_cache(CFG, B, S, seed=1)
    logits, k, v = fwd(g, s, toks[:, :6], arange_pos(B, 0, 6), tril(6), cache)
    err = maxdiff(logits, ref[:, :6])
    cache = put(cache, k, v, np.zeros(B), P)
    cur = P.copy()
    steps = 0
    while np.any(cur < lengths):
        idx = cur[:, None] + np.arange(n)
        blk = jnp.asarray(np.take_along_axis(np.asarray(toks), np.minimum(idx, T - 1), axis=1))
        logits, k, v = fwd(g, s, blk, jnp.asarray(idx, jnp.int32), tril(n), cache)
        logits = np.asarray(logits)
        for b in range(B):
            for j in range(n):
                if idx[b, j] < lengths[b]:
                    err = max(err, float(np.max(np.abs(logits[b, j] - ref[b, idx[b, j]]))))
        keep = np.minimum(rng.randint(1, n + 1, B), np.maximum(lengths - cur, 0))
        cache = put(cache, k, v, cur, cur + keep)
        cur = cur + keep
        steps += 1
    ERRS["ragged blocks at per-row offsets"] = err
    assert err < TOL, err
    assert steps >= 4
    _, kf, vf = full_kv(g, s, toks)
    for b in range(B):
        ck, cv = cache.stacked()
        assert maxdiff(ck[:, b, :, :lengths[b]], kf[:, b, :lengths[b]].swapaxes(1, 2)) < TOL
        assert maxdiff(cv[:, b, :, :lengths[b]], vf[:, b, :lengths[b]].swapaxes(1, 2)) < TOL


def test_k_chains_share_one_prefix_cache(verifier):
    """K chains of g+1 tokens scored in one pass ([B, K*(g+1)] queries, block-diagonal causal mask, positions
    L+j inside each chain) equal K separate runs and the full forward; then the selected chain's keys/values are
    copied into the cache and decoding continues exactly."""
    g, s = verifier
    rng = np.random.RandomState(3)
    B, L, K, G1 = 2, 7, 3, 4
    prefix = jnp.asarray(rng.randint(0, 64, (B, L)), jnp.int32)
    chains = jnp.asarray(rng.randint(0, 64, (B, K, G1)), jnp.int32)
    cache = garbage_cache(CFG, B, 16, seed=2)
    _, k, v = fwd(g, s, prefix, arange_pos(B, 0, L), tril(L), cache)
    cache = put(cache, k, v, np.zeros(B), np.full(B, L))

    q = jnp.arange(K * G1)
    mask = ((q[:, None] // G1) == (q[None, :] // G1)) & (q[None, :] <= q[:, None])
    pos = jnp.broadcast_to(L + q % G1, (B, K * G1)).astype(jnp.int32)
    logits, kc, vc = fwd(g, s, chains.reshape(B, K * G1), pos, mask[None], cache)
    logits = logits.reshape(B, K, G1, -1)
    err = 0.0
    for c in range(K):
        lc, ks, vs = fwd(g, s, chains[:, c], arange_pos(B, L, G1), tril(G1), cache)
        err = max(err, maxdiff(logits[:, c], lc))
        assert maxdiff(kc[:, :, c * G1:(c + 1) * G1], ks) < TOL and maxdiff(vc[:, :, c * G1:(c + 1) * G1], vs) < TOL
        ref = full(g, s, jnp.concatenate([prefix, chains[:, c]], axis=1))
        err = max(err, maxdiff(logits[:, c], ref[:, L:]))
    ERRS["K chains vs separate runs and full forward"] = err
    assert err < TOL, err

    # Select chain 2 for row 0 and chain 0 for row 1, keep 3 of their tokens, copy their entries into the cache.
    sel, keep = np.array([2, 0]), np.array([3, 3])
    kc = kc.reshape(CFG.num_layers, B, K, G1, CFG.num_kv_heads, CFG.head_dim)[:, np.arange(B), sel]
    vc = vc.reshape(CFG.num_layers, B, K, G1, CFG.num_kv_heads, CFG.head_dim)[:, np.arange(B), sel]
    cache = put(cache, kc, vc, np.full(B, L), L + keep)
    nxt = jnp.asarray(rng.randint(0, 64, (B, 1)), jnp.int32)
    lg, _, _ = fwd(g, s, nxt, jnp.asarray((L + keep)[:, None], jnp.int32), jnp.ones((1, 1, 1), bool), cache)
    for b in range(B):
        seq = jnp.concatenate([prefix[b], chains[b, sel[b], :keep[b]], nxt[b]])[None]
        assert maxdiff(lg[b, 0], full(g, s, seq)[0, -1]) < TOL


def test_block_causal_drafter_prefix_cache_equals_no_cache(drafter):
    """Prefix written causally into the cache, then a block of MASK tokens attending to cache + itself, equals
    the drafter's full forward `m(tokens)` with the block at the end; twice, the second time after accepted
    tokens were appended to the prefix cache (a block written, then rolled back to the accepted length)."""
    g, s = drafter
    rng = np.random.RandomState(4)
    B, P, gam, M = 2, 8, DRAFTER.block_size, DRAFTER.mask_token_id
    prefix = jnp.asarray(rng.randint(0, 60, (B, P)), jnp.int32)
    masks = jnp.full((B, gam), M, jnp.int32)
    ref = full(g, s, jnp.concatenate([prefix, masks], axis=1))
    cache = garbage_cache(DRAFTER, B, 24, seed=3)
    lp, k, v = fwd(g, s, prefix, arange_pos(B, 0, P), tril(P), cache)
    err = maxdiff(lp, ref[:, :P])  # the prefix is causal in the block_causal layout
    cache = put(cache, k, v, np.zeros(B), np.full(B, P))
    lb, _, _ = fwd(g, s, masks, arange_pos(B, P, gam), jnp.ones((1, gam, gam), bool), cache)
    err = max(err, maxdiff(lb, ref[:, P:]))

    # The block really sees itself: changing its last token changes the first block position's logits.
    other = masks.at[:, -1].set(5)
    lo, _, _ = fwd(g, s, other, arange_pos(B, P, gam), jnp.ones((1, gam, gam), bool), cache)
    assert maxdiff(lo[:, 0], lb[:, 0]) > 1e-3

    acc = jnp.asarray(rng.randint(0, 60, (B, gam)), jnp.int32)
    keep = np.array([3, 3])
    _, k, v = fwd(g, s, acc, arange_pos(B, P, gam), tril(gam), cache)
    cache = put(cache, k, v, np.full(B, P), P + keep)
    lb2, _, _ = fwd(g, s, masks, jnp.asarray((P + keep)[:, None] + np.arange(gam), jnp.int32),
                    jnp.ones((1, gam, gam), bool), cache)
    for b in range(B):
        seq = jnp.concatenate([prefix[b], acc[b, :keep[b]], masks[b]])[None]
        err = max(err, maxdiff(lb2[b], full(g, s, seq)[0, -gam:]))
    ERRS["block-causal drafter prefix cache vs no cache"] = err
    assert err < TOL, err


@pytest.mark.parametrize("changes,match", [
    (dict(num_kv_heads=3), "num_kv_heads=3 is invalid: must divide num_heads=4"),
    (dict(head_dim=7), "head_dim=7 is invalid: must be even"),
    (dict(vocab_size=0), "vocab_size=0 is invalid: must be a positive integer"),
    (dict(num_layers=True), "num_layers=True is invalid"),
    (dict(attention="sliding"), "attention='sliding' is invalid: choose one of"),
    (dict(dtype="float16"), "dtype='float16' is invalid: choose one of"),
    (dict(param_dtype="int8"), "param_dtype='int8' is invalid"),
    (dict(rope_theta=0.0), "rope_theta=0.0 is invalid: must be positive"),
    (dict(mask_token_id=64), r"mask_token_id=64 is invalid: must be in \[0, vocab_size=64\)"),
    (dict(sample_vocab_size=65), r"sample_vocab_size=65 is invalid"),
    (dict(attention="block_causal"), "mask_token_id=None is invalid: a block_causal .* needs a mask token id"),
    (dict(attention="bidirectional"), "needs a mask token id"),
])
def test_config_validation(changes, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(CFG, **changes)


def test_config_unknown_key_and_limits(tmp_path):
    with pytest.raises(ConfigError, match="unknown model config key 'hiden_size'.*did you mean hidden_size"):
        ModelConfig.from_dict({"hiden_size": 32})
    CFG.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == CFG
    with pytest.raises(ValueError, match="cache capacity 65 exceeds the model's max_seq_len=64"):
        KVCache.init(CFG, 1, 65)
    small = dataclasses.replace(CFG, max_seq_len=8)
    m = nnx.eval_shape(lambda: Transformer(small, rngs=nnx.Rngs(0)))  # the check comes before any compute
    with pytest.raises(ValueError, match="sequence length 9 exceeds the model's max_seq_len=8"):
        m(jnp.zeros((1, 9), jnp.int32))


def test_bf16_runs_and_tracks_f32(verifier):
    g, s = verifier
    cfg16 = dataclasses.replace(CFG, dtype="bfloat16", param_dtype="bfloat16")
    g16, s16 = nnx.split(nnx.eval_shape(lambda: Transformer(cfg16, rngs=nnx.Rngs(0))))
    pure = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), nnx.to_pure_dict(s))
    nnx.replace_by_pure_dict(s16, pure)
    toks = jnp.asarray(np.random.RandomState(5).randint(0, 64, (2, 12)), jnp.int32)
    ref = full(g, s, toks)
    out = full(g16, s16, toks)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    scale = float(np.std(np.asarray(ref)))
    assert maxdiff(out, ref) < 0.15 * scale
    # bf16 cache: the last block against a bf16 prefix cache tracks the bf16 full forward
    cache = KVCache.init(cfg16, 2, 16)
    assert all(x.dtype == jnp.bfloat16 for x in cache.k + cache.v)
    _, k, v = fwd(g16, s16, toks, arange_pos(2, 0, 12), tril(12), cache)
    cache = put(cache, k, v, np.zeros(2), np.full(2, 8))
    lg, _, _ = fwd(g16, s16, toks[:, 8:], arange_pos(2, 8, 4), tril(4), cache)
    assert lg.dtype == jnp.float32
    assert maxdiff(lg, out[:, 8:]) < 0.05 * scale
