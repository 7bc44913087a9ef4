"""The jitted draft-verify kernel: one `lax.while_loop` per generate call (docs/METHOD.md).

Per round, for every row at once: draft -> verify (K chains in ONE verifier forward) -> select -> accept ->
commit (tokens, verifier cache, drafter state). Rows are independent: each has its own committed length, cache
lengths, pending tokens and EOS/budget state; a finished row keeps running through the batched forwards but
nothing of it changes any more. The drafter is a `drafters.Drafter` chosen by the spec's `dkind`; this file never
looks at what kind it is.

Verifier convention: the verifier cache holds the committed sequence s except its last token t_last. A round
feeds [t_last, x_1..x_G] at positions L..L+G (L = cache length) for each of K chains, as K*(G+1) queries against
the shared prefix cache with a block-diagonal causal mask; after accepting n tokens the selected chain's first
n+1 keys/values (t_last, x_1..x_n) are already the right ones, so they are written at offset L and the length
grows by n+1. No second verifier pass.

Adaptive gamma (spec.gammas non-empty): each round picks its block size among a few static ones with a
`lax.switch`, maximising expected tokens per unit of round cost under a per-token acceptance rate estimated from
the rounds so far (exponentially decayed counts). The choice depends only on tokens already committed, so every
acceptance rule stays exactly lossless.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specdiff_jax import acceptance as acc
from specdiff_jax.cache import KVCache
from specdiff_jax.decode.drafters import DRAFTERS
from specdiff_jax.decode.spec import KernelSpec, block_diag, causal, p_verifier, read_rows, rows_at, write_rows

Array = jax.Array
TRACES: collections.Counter = collections.Counter()  # how many times each kernel was traced (compiled)
EXTRA_RULES: dict = {}  # name -> fn(p [B,G+1,V], q [B,G,V], x [B,G], key) -> (n, next); for tests of the tests
ADAPT_DECAY = 0.9  # weight of the past in the acceptance estimate of adaptive gamma, per round
ADAPT_PRIOR = 4.0  # pseudo-count of judged positions behind the initial acceptance estimate
_COMPILED: dict = {}


def accept(s: KernelSpec, p: Array, q: Array | None, drafts: Array, key: Array):
    """(n, next, chain) for p [B, K, G+1, V], drafts [B, K, G]."""
    B = p.shape[0]
    if s.rule == "multi_draft":
        return acc.multi_draft(p, q, drafts, key)
    chain = acc.select_drafts(p, drafts) if s.num_drafts > 1 else jnp.zeros((B,), jnp.int32)
    pc, xc = rows_at(p, chain), rows_at(drafts, chain)
    if s.rule == "greedy":
        n, nxt = acc.greedy(pc, xc)
    elif s.rule == "pq":
        n, nxt = acc.pq(pc, q, xc, key)
    elif s.rule == "delta":
        n, nxt = acc.delta(pc, xc, key)
    else:  # test hook: extra rules registered in EXTRA_RULES (never reachable from generate())
        n, nxt = EXTRA_RULES[s.rule](pc, q, xc, key)
    return n, nxt, chain


def prefill_impl(s: KernelSpec, gv, gd, vstate, dstate, tokens: Array, lens: Array, eos: Array,
                 alpha0: Array) -> dict:
    TRACES["prefill"] += 1
    B, P = tokens.shape
    G = s.gamma
    verifier = nnx.merge(gv, vstate)
    pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    zeros = jnp.zeros((B,), jnp.int32)

    def encode(model, cap):
        _, k, v = model.forward(tokens, pos, causal(P), None, compute_logits=False)
        return KVCache.init(model.cfg, B, cap).write(k, v, zeros).with_lengths(lens - 1)

    W = s.window
    seq = jnp.full((B, W + P + s.max_new + G + 1), s.pad, jnp.int32)
    seq = seq.at[:, W: W + P].set(jnp.where(jnp.arange(P)[None] < lens[:, None], tokens, s.pad))
    carry = dict(
        vcache=encode(verifier, s.vcap), seq=seq, slen=lens, L0=lens, done=jnp.zeros((B,), bool), eos=eos,
        rounds=jnp.zeros((), jnp.int32), drafter_calls=jnp.zeros((), jnp.int32),
        row_rounds=zeros, hist=jnp.zeros((G + 1,), jnp.int32), accept_counts=jnp.zeros((max(G, 1),), jnp.int32),
        gamma_rounds=jnp.zeros((max(len(s.gammas), 1),), jnp.int32),
        # adaptive gamma: decayed counts of accepted and judged draft positions, seeded with the prior alpha0
        adapt=jnp.stack([ADAPT_PRIOR * alpha0, jnp.float32(ADAPT_PRIOR)]).astype(jnp.float32),
    )
    drafter = DRAFTERS[s.dkind]
    if drafter.needs_cache:
        carry.update(drafter.init(s, nnx.merge(gd, dstate), tokens, lens, encode))
    return carry


def _round(s: KernelSpec, G: int, verifier, dmodel, c: dict, kd: Array, ka: Array) -> dict:
    """One draft -> verify -> accept -> commit round with a static block size G (<= s.gamma)."""
    B, K, N, W, Gmax = s.batch, s.num_drafts, s.max_new, s.window, s.gamma
    drafter = DRAFTERS[s.dkind]
    c = dict(c)
    slen, done = c["slen"], c["done"]
    active = ~done
    t_last = rows_at(c["seq"], W + slen - 1)
    state = {k: c[k] for k in ("dcache", "pend", "pend_n") if k in c}
    drafts, q, state = drafter.draft(s, dmodel, state, c["seq"], slen, G, kd)
    # ---- verify: K chains, one forward against the shared prefix cache
    j = jnp.arange(G + 1)
    vc = c["vcache"]
    L = vc.lengths
    vt = jnp.concatenate([jnp.broadcast_to(t_last[:, None, None], (B, K, 1)), drafts], axis=2)
    vpos = L[:, None] + jnp.tile(j, K)[None]
    vmask = block_diag(K, np.tril(np.ones((G + 1, G + 1), bool)))
    logits, kv, vv = verifier.forward(vt.reshape(B, K * (G + 1)), vpos, vmask, vc)
    # Every read of the cache is done once the forward's outputs exist; saying so lets XLA update the loop-carried
    # cache in place below instead of copying every layer's buffer each round.
    vc, logits, kv, vv = jax.lax.optimization_barrier((vc, logits, kv, vv))
    p = p_verifier(s, logits.reshape(B, K, G + 1, -1))
    # ---- select + accept
    n, nxt, chain = accept(s, p, q, drafts, ka)
    # ---- commit
    x = jnp.concatenate([rows_at(drafts, chain), jnp.zeros((B, 1), jnp.int32)], axis=1)
    emitted = jnp.where(j[None] < n[:, None], x, jnp.where(j[None] == n[:, None], nxt[:, None], s.pad))
    m = n + 1
    is_eos = (emitted == c["eos"]) & (j[None] < m[:, None])  # eos -1 (none) never matches
    hit_eos = jnp.any(is_eos, axis=1)
    m = jnp.where(hit_eos, jnp.argmax(is_eos, axis=1) + 1, m)
    count = slen - c["L0"]
    m = jnp.where(active, jnp.minimum(m, N - count), 0)
    c["done"] = done | (active & (hit_eos | (count + m >= N)))
    c["seq"] = write_rows(c["seq"], emitted, W + slen)
    c["slen"] = slen + m
    rows = jnp.arange(B)
    kv = kv.reshape(kv.shape[:2] + (K, G + 1) + kv.shape[3:])[:, rows, chain]
    vv = vv.reshape(vv.shape[:2] + (K, G + 1) + vv.shape[3:])[:, rows, chain]
    c["vcache"] = vc.write(kv, vv, L).with_lengths(L + m)
    c.update(drafter.commit(s, state, emitted, n, m, c["done"], G))
    # ---- statistics (per active row-round; n is the accepted draft length before EOS/budget truncation)
    c["rounds"] = c["rounds"] + 1
    c["drafter_calls"] = c["drafter_calls"] + drafter.calls(s, G)
    c["row_rounds"] = c["row_rounds"] + active.astype(jnp.int32)
    c["hist"] = c["hist"] + jnp.sum(jax.nn.one_hot(n, Gmax + 1, dtype=jnp.int32) * active[:, None], axis=0)
    if Gmax > 0:
        c["accept_counts"] = c["accept_counts"] + jnp.sum(
            (jnp.arange(Gmax)[None] < n[:, None]) & active[:, None], axis=0, dtype=jnp.int32)
    if s.gammas:
        judged = jnp.minimum(n + 1, G)  # accepted positions and the rejected one, if any
        a = jnp.stack([jnp.sum(jnp.where(active, n, 0)), jnp.sum(jnp.where(active, judged, 0))]).astype(jnp.float32)
        c["adapt"] = ADAPT_DECAY * c["adapt"] + a
        c["gamma_rounds"] = c["gamma_rounds"].at[s.gammas.index(G)].add(1)
    return c


def choose_gamma(s: KernelSpec, adapt: Array) -> Array:
    """Index into s.gammas maximising E[tokens per round] / cost under the estimated per-token acceptance."""
    alpha = jnp.clip(adapt[0] / jnp.maximum(adapt[1], 1e-6), 0.0, 0.999)
    g = jnp.asarray(s.gammas, jnp.float32)
    expected = (1.0 - alpha ** (g + 1.0)) / (1.0 - alpha)  # E[tokens] with i.i.d. per-token acceptance alpha
    return jnp.argmax(expected / jnp.asarray(s.round_costs, jnp.float32)).astype(jnp.int32)


def decode_impl(s: KernelSpec, gv, gd, vstate, dstate, carry: dict, key: Array):
    TRACES["decode"] += 1
    verifier = nnx.merge(gv, vstate)
    dmodel = nnx.merge(gd, dstate) if s.dkind != "none" else None
    N, W = s.max_new, s.window

    def body(c):
        key, kd, ka = jax.random.split(c["key"], 3)
        if s.gammas:
            branches = [lambda c_, kd_, ka_, g=g: _round(s, g, verifier, dmodel, c_, kd_, ka_) for g in s.gammas]
            c = jax.lax.switch(choose_gamma(s, c["adapt"]), branches, c, kd, ka)
        else:
            c = _round(s, s.gamma, verifier, dmodel, c, kd, ka)
        return dict(c, key=key)

    def cond(c):
        return jnp.any(~c["done"]) & (c["rounds"] <= N)

    c = jax.lax.while_loop(cond, body, dict(carry, key=key))
    count = c["slen"] - c["L0"]
    out = read_rows(c["seq"], W + c["L0"], N)
    out = jnp.where(jnp.arange(N)[None] < count[:, None], out, s.pad)
    stats = {k: c[k] for k in ("rounds", "drafter_calls", "row_rounds", "hist", "accept_counts", "gamma_rounds")}
    return out, count, stats


def _carry_shardings(carry_shapes: dict, placement):
    """Shardings of the decode carry: KV caches by their logical axes (cache_batch, kv_heads), the rest replicated."""
    from specdiff_jax import sharding as shd

    mesh, rules = placement
    rep = shd.replicated(mesh)
    out = {}
    for k, v in carry_shapes.items():
        if isinstance(v, KVCache):
            out[k] = KVCache(tuple(shd.cache_sharding(mesh, rules, x.shape) for x in v.k),
                             tuple(shd.cache_sharding(mesh, rules, x.shape) for x in v.v), rep)
        else:
            out[k] = jax.tree.map(lambda _: rep, v)
    return out


def compiled(s: KernelSpec, gv, gd, placement=None, vstate=None, dstate=None):
    """(prefill, decode) jitted for this static spec; prefill is shared by every setting it does not read.

    placement: None (whatever the inputs' placement is) or (mesh, logical axis rules): then both are jitted with
    in/out shardings: parameters as placed by `Decoder` (vstate/dstate), KV caches by logical axes, the rest
    replicated.
    """
    ps = dataclasses.replace(s, method="", rule="", num_drafts=1, steps=1, temperature=0.0, top_k=0, top_p=1.0,
                             draft_temperature=0.0, vocab=0, v_exclude=(), mask_id=-1, logit_shift=False,
                             round_costs=(), gammas=(0,) * len(s.gammas))
    pkey = ("prefill", ps, gv, gd, placement)
    dkey = ("decode", s, gv, gd, placement)
    pre = lambda vs, ds, t, ln, e, a0: prefill_impl(ps, gv, gd, vs, ds, t, ln, e, a0)  # noqa: E731
    dec = lambda vs, ds, c, k: decode_impl(s, gv, gd, vs, ds, c, k)  # noqa: E731
    if placement is None:
        if pkey not in _COMPILED:
            _COMPILED[pkey] = jax.jit(pre)
        if dkey not in _COMPILED:
            _COMPILED[dkey] = jax.jit(dec)
        return _COMPILED[pkey], _COMPILED[dkey]
    from specdiff_jax import sharding as shd

    rep = shd.replicated(placement[0])
    if pkey not in _COMPILED or dkey not in _COMPILED:
        B, P = s.batch, s.bucket
        vsh, dsh = jax.tree.map(lambda x: x.sharding, vstate), jax.tree.map(lambda x: x.sharding, dstate)
        shapes = jax.eval_shape(lambda vs, ds: pre(vs, ds, jnp.zeros((B, P), jnp.int32), jnp.ones((B,), jnp.int32),
                                                   jnp.int32(0), jnp.float32(0)), vstate, dstate)
        csh = _carry_shardings(shapes, placement)
        _COMPILED[pkey] = jax.jit(pre, in_shardings=(vsh, dsh, rep, rep, rep, rep), out_shardings=csh)
        _COMPILED[dkey] = jax.jit(dec, in_shardings=(vsh, dsh, csh, rep), out_shardings=rep)
    return _COMPILED[pkey], _COMPILED[dkey]
