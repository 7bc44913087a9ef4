"""The jitted draft-verify kernel: one `lax.while_loop` per generate call (SPEC §3-§5, §7).

Per round, for every row at once: draft -> verify (K chains in ONE verifier forward) -> select -> accept ->
commit (tokens, verifier cache, drafter cache). Rows are independent: each has its own committed length,
cache lengths, pending tokens and EOS/budget state; a finished row keeps running through the batched
forwards but nothing of it changes any more.

Verifier convention (SPEC §4): the verifier cache holds the committed sequence s except its last token t_last.
A round feeds [t_last, x_1..x_G] at positions L..L+G (L = cache length) for each of K chains, as K*(G+1)
queries against the shared prefix cache with a block-diagonal causal mask; after accepting n tokens the
selected chain's first n+1 keys/values (t_last, x_1..x_n) are already the right ones, so they are written at
offset L and the length grows by n+1. No second verifier pass.

Drafters:
  block      block_causal diffusion drafter. It keeps an exact prefix KV cache. The tokens committed last round
             ("pending", at most G+1) and G MASK tokens go through ONE forward: pending tokens attend causally
             (their keys/values are written into the cache), the MASK block attends to the prefix, the valid
             pending tokens and itself. T > 1 denoising steps re-run only the block(s) against the cache.
  bidir      bidirectional (Dream-style) diffusion drafter: prefix states depend on the block, so each round
             re-encodes a bounded window of the last W committed tokens plus the MASK block.
  ar         causal AR drafter (`sps`): drafts G tokens one at a time with its own cache. Accepted drafts'
             keys/values are already in its cache; only the last 1-2 committed tokens are pending.
  none       `ar`: the verifier alone (gamma 0: each round emits one token).
Logit alignment of diffusion drafters: cfg.logit_shift False -> block position j predicts x_j; True (Dream) ->
q_1 is read at the last committed token and q_j at block position j-1.

Entry points: `generate(...)` (public API) and `Decoder` (validated settings, separately jitted `prefill` and
`decode`, compiled once per static shape and cached process-wide).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specdiff_jax import acceptance as acc
from specdiff_jax.cache import KVCache
from specdiff_jax.sampling import probs, sample

Array = jax.Array
METHODS = ("ar", "sps", "specdiff", "specdiff2")
DRAFTER_METHODS = ("sps", "specdiff", "specdiff2")
MAX_GAMMA = 256
MAX_DRAFTS = 64
MIN_BUCKET = 16

TRACES: collections.Counter = collections.Counter()  # how many times each kernel was traced (compiled)
_COMPILED: dict = {}


class DecodeError(ValueError):
    """A generate() input is invalid; the message names the input and the fix."""


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one compiled kernel."""

    method: str
    rule: str
    dkind: str  # none | ar | block | bidir
    batch: int
    bucket: int  # padded prompt length P
    max_new: int  # N
    gamma: int  # G (0 for ar)
    num_drafts: int  # K
    steps: int  # T
    temperature: float
    top_k: int
    top_p: float
    draft_temperature: float
    pad: int
    vocab: int  # sampleable vocabulary shared by verifier and drafter
    v_exclude: tuple
    mask_id: int
    logit_shift: bool
    vcap: int
    dcap: int
    window: int  # bidir: committed tokens re-encoded each round


@dataclasses.dataclass
class GenerateOutput:
    """tokens int32[B, max_new_tokens] (pad after each row's end), lengths int32[B], stats dict."""

    tokens: np.ndarray
    lengths: np.ndarray
    stats: dict[str, Any]

    def rows(self) -> list[list[int]]:
        """The generated ids of each row, without padding."""
        return [self.tokens[b, : self.lengths[b]].tolist() for b in range(len(self.lengths))]


# ======================================================================================================
# pieces of the kernel (pure functions; `s` is the static _Spec)
# ======================================================================================================
def _rows_at(a: Array, idx: Array) -> Array:
    """a[b, idx[b]] for a [B, N, ...]."""
    return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 1)), axis=1)[:, 0]


def _write_rows(buf: Array, block: Array, offsets: Array) -> Array:
    """buf[b, offsets[b] : offsets[b] + n] = block[b] for buf [B, S], block [B, n]."""
    return jax.vmap(lambda r, x, o: jax.lax.dynamic_update_slice(r, x, (o,)))(buf, block, offsets)


def _read_rows(buf: Array, offsets: Array, n: int) -> Array:
    return jax.vmap(lambda r, o: jax.lax.dynamic_slice(r, (o,), (n,)))(buf, offsets)


def _p_verifier(s: _Spec, logits: Array) -> Array:
    return probs(logits[..., : s.vocab], temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                 num_sampleable=s.vocab, exclude=s.v_exclude)


def _q_drafter(s: _Spec, logits: Array) -> Array:
    return probs(logits[..., : s.vocab], temperature=s.draft_temperature, top_k=s.top_k, top_p=s.top_p,
                 num_sampleable=s.vocab, exclude=(s.mask_id,))


def _causal(n: int) -> Array:
    return jnp.asarray(np.tril(np.ones((n, n), bool))[None])


def _block_diag(k: int, blk: np.ndarray) -> Array:
    return jnp.asarray(np.kron(np.eye(k, dtype=bool), blk)[None])


def _schedule(G: int, T: int) -> list[int]:
    """How many positions each of the T denoising steps commits (sums to G)."""
    return [(G * (t + 1)) // T - (G * t) // T for t in range(T)]


def _denoise(s: _Spec, q1: Array, rerun, key: Array) -> Array:
    """Drafts int32[B, K, G] from step-1 marginals q1 [B, G, V].

    T == 1: K i.i.d. samples of the marginals. T > 1: confidence-ordered unmasking: every step samples each
    still-masked position, commits the most confident ones (confidence = q of the sampled token; with draft
    temperature 0 that is the max probability), and `rerun(block [B, K, G]) -> q [B, K, G, V]` re-predicts.
    """
    B, G, _ = q1.shape
    K, T = s.num_drafts, s.steps
    if T == 1:
        return sample(key, q1[:, None], shape=(B, K, G))
    block = jnp.full((B, K, G), s.mask_id, jnp.int32)
    masked = jnp.ones((B, K, G), bool)
    qk = jnp.broadcast_to(q1[:, None], (B, K) + q1.shape[1:])
    for t, n_t in enumerate(_schedule(G, T)):
        if t > 0:
            qk = rerun(block)
        key, kt = jax.random.split(key)
        y = sample(kt, qk)
        if t == T - 1:
            commit = masked
        else:
            conf = jnp.take_along_axis(qk, y[..., None], axis=-1)[..., 0]
            conf = jnp.where(masked, conf, -jnp.inf)
            _, idx = jax.lax.top_k(conf, n_t)  # [B, K, n_t]
            commit = jnp.any(jax.nn.one_hot(idx, G, dtype=bool), axis=-2) & masked
        block = jnp.where(commit, y, block)
        masked = masked & ~commit
    return block


def _draft_block(s: _Spec, d, dcache: KVCache, pend: Array, pend_n: Array, key: Array):
    """block_causal drafter: commit pending tokens into its cache and draft, in one forward per step."""
    B = pend.shape[0]
    G, K = s.gamma, s.num_drafts
    Pn = pend.shape[1]
    D0 = dcache.lengths
    toks = jnp.concatenate([pend, jnp.full((B, G), s.mask_id, jnp.int32)], axis=1)
    i = jnp.arange(Pn + G)
    ii, jj = i[:, None], i[None, :]
    pend_part = (jj <= ii) & (jj < Pn)  # pending tokens: causal among themselves
    block_part = (jj >= Pn)[None] | (jj[None] < pend_n[:, None, None])  # MASKs: valid pending + whole block
    bm = jnp.where((ii < Pn)[None], pend_part[None], block_part)
    pos = jnp.where(i[None] < Pn, D0[:, None] + i[None], (D0 + pend_n)[:, None] + (i[None] - Pn))
    logits, k, v = d.forward(toks, pos, bm, dcache)
    dcache = dcache.write(k[:, :, :Pn], v[:, :, :Pn], D0).with_lengths(D0 + pend_n)
    if s.logit_shift:
        first = _rows_at(logits, jnp.maximum(pend_n - 1, 0))  # q_1 from the last committed token
        lg = jnp.concatenate([first[:, None], logits[:, Pn: Pn + G - 1]], axis=1)
    else:
        first = None
        lg = logits[:, Pn: Pn + G]
    q1 = _q_drafter(s, lg)

    def rerun(block):  # [B, K, G] -> q [B, K, G, V]; the prefix cache already holds the pending tokens
        pos_b = (D0 + pend_n)[:, None] + jnp.tile(jnp.arange(G), K)[None]
        bmask = _block_diag(K, np.ones((G, G), bool))
        lgk, _, _ = d.forward(block.reshape(B, K * G), pos_b, bmask, dcache)
        lgk = lgk.reshape(B, K, G, -1)
        if s.logit_shift:
            lgk = jnp.concatenate([jnp.broadcast_to(first[:, None, None], (B, K, 1, first.shape[-1])),
                                   lgk[:, :, : G - 1]], axis=2)
        return _q_drafter(s, lgk)

    drafts = _denoise(s, q1, rerun, key)
    return drafts, q1, dcache


def _draft_bidir(s: _Spec, d, seq: Array, slen: Array, key: Array):
    """Bidirectional drafter: re-encode the last W committed tokens + G MASKs (left-padded window)."""
    B = seq.shape[0]
    G, K, W = s.gamma, s.num_drafts, s.window
    win = _read_rows(seq, slen, W)  # seq is left-padded by W: this is s[slen-W : slen]
    w = jnp.minimum(slen, W)
    valid_prefix = jnp.arange(W)[None] >= (W - w)[:, None]
    toks = jnp.concatenate([jnp.where(valid_prefix, win, s.pad), jnp.full((B, G), s.mask_id, jnp.int32)], 1)
    pos = jnp.maximum(jnp.arange(W + G)[None] - (W - w)[:, None], 0)
    valid = jnp.concatenate([valid_prefix, jnp.ones((B, G), bool)], axis=1)
    Q = W + G

    def run(tokens, pos_, valid_):
        bm = jnp.broadcast_to(valid_[:, None, :], (tokens.shape[0], Q, Q))
        lg, _, _ = d.forward(tokens, pos_, bm, None)
        return lg[:, W - 1: W + G - 1] if s.logit_shift else lg[:, W: W + G]

    q1 = _q_drafter(s, run(toks, pos, valid))

    def rerun(block):  # [B, K, G]: K copies of the window, each with its own partially unmasked block
        tk = jnp.concatenate([jnp.broadcast_to(toks[:, None, :W], (B, K, W)), block], axis=2)
        rep = lambda a: jnp.broadcast_to(a[:, None], (B, K) + a.shape[1:]).reshape((B * K,) + a.shape[1:])
        lg = run(tk.reshape(B * K, Q), rep(pos), rep(valid))
        return _q_drafter(s, lg.reshape(B, K, G, -1))

    return _denoise(s, q1, rerun, key), q1


def _draft_ar(s: _Spec, d, dcache: KVCache, pend: Array, pend_n: Array, key: Array):
    """AR drafter: commit the 1-2 pending tokens, then draft G tokens one at a time."""
    B = pend.shape[0]
    G = s.gamma
    D0 = dcache.lengths
    logits, k, v = d.forward(pend, D0[:, None] + jnp.arange(pend.shape[1])[None], _causal(pend.shape[1]), dcache)
    dcache = dcache.write(k, v, D0).with_lengths(D0 + pend_n)
    keys = jax.random.split(key, G)
    q_1 = _q_drafter(s, _rows_at(logits, jnp.maximum(pend_n - 1, 0)))
    x_1 = sample(keys[0], q_1)

    def step(carry, k_j):
        cache, x_prev = carry
        lg, kk, vv = d.forward(x_prev[:, None], cache.lengths[:, None], _causal(1), cache)
        cache = cache.append(kk, vv, jnp.ones((B,), jnp.int32))
        q_j = _q_drafter(s, lg[:, 0])
        x_j = sample(k_j, q_j)
        return (cache, x_j), (q_j, x_j)

    (dcache, _), (qs, xs) = jax.lax.scan(step, (dcache, x_1), keys[1:])
    q = jnp.concatenate([q_1[:, None], jnp.moveaxis(qs, 0, 1)], axis=1)
    x = jnp.concatenate([x_1[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)
    return x[:, None], q, dcache, D0 + pend_n


def _accept(s: _Spec, p: Array, q: Array | None, drafts: Array, key: Array):
    """(n, next, chain) for p [B, K, G+1, V], drafts [B, K, G]."""
    B = p.shape[0]
    if s.rule == "multi_draft":
        return acc.multi_draft(p, q, drafts, key)
    chain = acc.select_drafts(p, drafts) if s.num_drafts > 1 else jnp.zeros((B,), jnp.int32)
    pc, xc = _rows_at(p, chain), _rows_at(drafts, chain)
    if s.rule == "greedy":
        n, nxt = acc.greedy(pc, xc)
    elif s.rule == "pq":
        n, nxt = acc.pq(pc, q, xc, key)
    elif s.rule == "delta":
        n, nxt = acc.delta(pc, xc, key)
    else:  # test hook: extra rules registered in EXTRA_RULES (never reachable from generate())
        n, nxt = EXTRA_RULES[s.rule](pc, q, xc, key)
    return n, nxt, chain


EXTRA_RULES: dict = {}  # name -> fn(p [B,G+1,V], q [B,G,V], x [B,G], key) -> (n, next); for tests of the tests


# ======================================================================================================
# prefill and the decode loop
# ======================================================================================================
def _prefill_impl(s: _Spec, gv, gd, vstate, dstate, tokens: Array, lens: Array, eos: Array) -> dict:
    TRACES["prefill"] += 1
    B, P = tokens.shape
    G = s.gamma
    verifier = nnx.merge(gv, vstate)
    pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    zeros = jnp.zeros((B,), jnp.int32)

    def encode(model, cap):
        _, k, v = model.forward(tokens, pos, _causal(P), None, compute_logits=False)
        return KVCache.init(model.cfg, B, cap).write(k, v, zeros).with_lengths(lens - 1)

    W = s.window
    seq = jnp.full((B, W + P + s.max_new + G + 1), s.pad, jnp.int32)
    seq = seq.at[:, W: W + P].set(jnp.where(jnp.arange(P)[None] < lens[:, None], tokens, s.pad))
    carry = dict(
        vcache=encode(verifier, s.vcap), seq=seq, slen=lens, L0=lens, done=jnp.zeros((B,), bool), eos=eos,
        rounds=jnp.zeros((), jnp.int32), drafter_calls=jnp.zeros((), jnp.int32),
        row_rounds=zeros, hist=jnp.zeros((G + 1,), jnp.int32), accept_counts=jnp.zeros((max(G, 1),), jnp.int32),
    )
    if s.dkind in ("ar", "block"):
        drafter = nnx.merge(gd, dstate)
        Pn = 2 if s.dkind == "ar" else G + 1
        t_last = _rows_at(tokens, lens - 1)
        carry.update(dcache=encode(drafter, s.dcap),
                     pend=jnp.zeros((B, Pn), jnp.int32).at[:, 0].set(t_last), pend_n=jnp.ones((B,), jnp.int32))
    return carry


def _decode_impl(s: _Spec, gv, gd, vstate, dstate, carry: dict, key: Array):
    TRACES["decode"] += 1
    verifier = nnx.merge(gv, vstate)
    drafter = nnx.merge(gd, dstate) if s.dkind != "none" else None
    B, G, K, N, W = s.batch, s.gamma, s.num_drafts, s.max_new, s.window
    rows = jnp.arange(B)
    vmask = _block_diag(K, np.tril(np.ones((G + 1, G + 1), bool)))
    j = jnp.arange(G + 1)

    def body(c):
        c = dict(c)
        key, kd, ka = jax.random.split(c["key"], 3)
        slen, done = c["slen"], c["done"]
        active = ~done
        t_last = _rows_at(c["seq"], W + slen - 1)
        q = None
        # ---- draft
        if s.dkind == "none":
            drafts = jnp.zeros((B, 1, 0), jnp.int32)
        elif s.dkind == "ar":
            drafts, q, dcache, d_committed = _draft_ar(s, drafter, c["dcache"], c["pend"], c["pend_n"], kd)
        elif s.dkind == "block":
            drafts, q, dcache = _draft_block(s, drafter, c["dcache"], c["pend"], c["pend_n"], kd)
        else:
            drafts, q = _draft_bidir(s, drafter, c["seq"], slen, kd)
        # ---- verify: K chains, one forward against the shared prefix cache
        vc = c["vcache"]
        L = vc.lengths
        vt = jnp.concatenate([jnp.broadcast_to(t_last[:, None, None], (B, K, 1)), drafts], axis=2)
        vpos = L[:, None] + jnp.tile(j, K)[None]
        logits, kv, vv = verifier.forward(vt.reshape(B, K * (G + 1)), vpos, vmask, vc)
        p = _p_verifier(s, logits.reshape(B, K, G + 1, -1))
        # ---- select + accept
        n, nxt, chain = _accept(s, p, q, drafts, ka)
        # ---- commit
        x = jnp.concatenate([_rows_at(drafts, chain), jnp.zeros((B, 1), jnp.int32)], axis=1)
        emitted = jnp.where(j[None] < n[:, None], x, jnp.where(j[None] == n[:, None], nxt[:, None], s.pad))
        m = n + 1
        is_eos = (emitted == c["eos"]) & (j[None] < m[:, None])  # eos -1 (none) never matches
        hit_eos = jnp.any(is_eos, axis=1)
        m = jnp.where(hit_eos, jnp.argmax(is_eos, axis=1) + 1, m)
        count = slen - c["L0"]
        m = jnp.where(active, jnp.minimum(m, N - count), 0)
        c["done"] = done | (active & (hit_eos | (count + m >= N)))
        c["seq"] = _write_rows(c["seq"], emitted, W + slen)
        c["slen"] = slen + m
        kv = kv.reshape(kv.shape[:2] + (K, G + 1) + kv.shape[3:])[:, rows, chain]
        vv = vv.reshape(vv.shape[:2] + (K, G + 1) + vv.shape[3:])[:, rows, chain]
        c["vcache"] = vc.write(kv, vv, L).with_lengths(L + m)
        if s.dkind == "block":
            c["dcache"], c["pend"], c["pend_n"] = dcache, emitted, jnp.where(c["done"], 0, m)
        elif s.dkind == "ar":
            # x_1..x_min(n, G-1) are accepted and already in the drafter cache; the rest is pending
            cached = jnp.where(c["done"], 0, jnp.minimum(n, G - 1))
            c["dcache"] = dcache.with_lengths(d_committed + cached)
            c["pend"] = _read_rows(jnp.concatenate([emitted, jnp.zeros((B, 2), jnp.int32)], 1), cached, 2)
            c["pend_n"] = jnp.where(c["done"], 0, m - cached)
        # ---- statistics (per active row-round; n is the accepted draft length before EOS/budget truncation)
        c["rounds"] = c["rounds"] + 1
        c["drafter_calls"] = c["drafter_calls"] + {"none": 0, "ar": G, "block": s.steps, "bidir": s.steps}[s.dkind]
        c["row_rounds"] = c["row_rounds"] + active.astype(jnp.int32)
        c["hist"] = c["hist"] + jnp.sum(jax.nn.one_hot(n, G + 1, dtype=jnp.int32) * active[:, None], axis=0)
        if G > 0:
            c["accept_counts"] = c["accept_counts"] + jnp.sum(
                (jnp.arange(G)[None] < n[:, None]) & active[:, None], axis=0, dtype=jnp.int32)
        c["key"] = key
        return c

    def cond(c):
        return jnp.any(~c["done"]) & (c["rounds"] <= N)

    carry = dict(carry, key=key)
    c = jax.lax.while_loop(cond, body, carry)
    count = c["slen"] - c["L0"]
    out = _read_rows(c["seq"], W + c["L0"], N)
    out = jnp.where(jnp.arange(N)[None] < count[:, None], out, s.pad)
    stats = {k: c[k] for k in ("rounds", "drafter_calls", "row_rounds", "hist", "accept_counts")}
    return out, count, stats


def _carry_shardings(carry_shapes: dict, placement):
    """Shardings of the decode carry: KV caches by their logical axes (cache_batch, kv_heads), the rest replicated."""
    from specdiff_jax import sharding as shd

    mesh, rules = placement
    rep = shd.replicated(mesh)
    out = {}
    for k, v in carry_shapes.items():
        if isinstance(v, KVCache):
            out[k] = KVCache(shd.cache_sharding(mesh, rules, v.k.shape), shd.cache_sharding(mesh, rules, v.v.shape), rep)
        else:
            out[k] = jax.tree.map(lambda _: rep, v)
    return out


def _compiled(s: _Spec, gv, gd, placement=None, vstate=None, dstate=None):
    """(prefill, decode) jitted for this static spec; prefill is shared by every setting it does not read.

    placement: None (whatever the inputs' placement is) or (mesh, logical axis rules): then both are jitted with
    in/out shardings: parameters as placed by `Decoder` (vstate/dstate), KV caches by logical axes, the rest
    replicated.
    """
    ps = dataclasses.replace(s, method="", rule="", num_drafts=1, steps=1, temperature=0.0, top_k=0, top_p=1.0,
                             draft_temperature=0.0, vocab=0, v_exclude=(), mask_id=-1, logit_shift=False)
    pkey = ("prefill", ps, gv, gd, placement)
    dkey = ("decode", s, gv, gd, placement)
    if placement is None:
        if pkey not in _COMPILED:
            _COMPILED[pkey] = jax.jit(lambda vs, ds, t, ln, e: _prefill_impl(ps, gv, gd, vs, ds, t, ln, e))
        if dkey not in _COMPILED:
            _COMPILED[dkey] = jax.jit(lambda vs, ds, c, k: _decode_impl(s, gv, gd, vs, ds, c, k))
        return _COMPILED[pkey], _COMPILED[dkey]
    from specdiff_jax import sharding as shd

    rep = shd.replicated(placement[0])
    if pkey not in _COMPILED or dkey not in _COMPILED:
        B, P = s.batch, s.bucket
        vsh, dsh = jax.tree.map(lambda x: x.sharding, vstate), jax.tree.map(lambda x: x.sharding, dstate)
        shapes = jax.eval_shape(lambda vs, ds: _prefill_impl(ps, gv, gd, vs, ds, jnp.zeros((B, P), jnp.int32),
                                                             jnp.ones((B,), jnp.int32), jnp.int32(0)), vstate, dstate)
        csh = _carry_shardings(shapes, placement)
        _COMPILED[pkey] = jax.jit(lambda vs, ds, t, ln, e: _prefill_impl(ps, gv, gd, vs, ds, t, ln, e),
                                  in_shardings=(vsh, dsh, rep, rep, rep), out_shardings=csh)
        _COMPILED[dkey] = jax.jit(lambda vs, ds, c, k: _decode_impl(s, gv, gd, vs, ds, c, k),
                                  in_shardings=(vsh, dsh, csh, rep), out_shardings=rep)
    return _COMPILED[pkey], _COMPILED[dkey]


# ======================================================================================================
# validation, the Decoder object and generate()
# ======================================================================================================
def _bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


class Decoder:
    """Validated decode settings for one verifier (+ drafter), with jitted `prefill` and `decode`.

    Compiled kernels are cached process-wide per static shape (method, rule, batch, prompt bucket,
    max_new_tokens, gamma, K, T, filters, ...), so building Decoders and calling them again does not
    recompile. Typical timing use:
        dec = Decoder(verifier, drafter, method="specdiff2", max_new_tokens=128, ...)
        state = dec.prefill(prompts)            # jitted; block_until_ready to time it
        out = dec.decode(state, seed=0)         # jitted decode loop -> GenerateOutput
    """

    def __init__(self, verifier, drafter=None, *, method: str, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, gamma: int = 16, num_drafts: int = 1,
                 denoise_steps: int = 1, draft_temperature: float = 1.0, acceptance: str = "auto",
                 eos_id: int | None = None, draft_window: int = 512, mesh=None, rules=None):
        vcfg = verifier.cfg
        if method not in METHODS:
            raise DecodeError(f"method={method!r} is unknown; choose one of {METHODS}")
        if vcfg.attention != "causal":
            raise DecodeError(f"the verifier is a {vcfg.attention} model (a diffusion drafter?); the verifier must "
                              "be a causal LM: pass the verifier and the drafter in that order")
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise DecodeError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        if not isinstance(temperature, (int, float)) or temperature < 0 or not math.isfinite(temperature):
            raise DecodeError(f"temperature={temperature!r} must be >= 0 (0 = greedy)")
        if not isinstance(draft_temperature, (int, float)) or not 0 <= draft_temperature < math.inf:
            raise DecodeError(f"draft_temperature={draft_temperature!r} must be >= 0 (0 = argmax drafting)")
        if not _is_int(top_k) or top_k < 0:
            raise DecodeError(f"top_k={top_k!r} must be an integer >= 0 (0 = off)")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise DecodeError(f"top_p={top_p!r} must be in (0, 1] (1 = off)")
        for name, val, hi in (("gamma", gamma, MAX_GAMMA), ("num_drafts", num_drafts, MAX_DRAFTS),
                              ("denoise_steps", denoise_steps, MAX_GAMMA)):
            if not _is_int(val) or not 1 <= val <= hi:
                raise DecodeError(f"{name}={val!r} is out of range: must be an integer in [1, {hi}]")
        if eos_id is None:
            eos_id = vcfg.eos_token_id
        if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < vcfg.vocab_size):
            raise DecodeError(f"eos_id={eos_id!r} must be a token id in [0, {vcfg.vocab_size})")

        dkind = "none"
        if method in DRAFTER_METHODS:
            if drafter is None:
                raise DecodeError(f"method={method!r} needs a drafter model (drafter=...); method='ar' needs none")
            dcfg = drafter.cfg
            if dcfg.num_sampleable != vcfg.num_sampleable:
                raise DecodeError(
                    f"drafter/verifier vocabulary mismatch: the drafter samples {dcfg.num_sampleable} ids, the "
                    f"verifier {vcfg.num_sampleable}; they must share one tokenizer (set sample_vocab_size to the "
                    "tokenizer size in both model configs if only the padded embedding rows differ)")
            if method == "sps":
                if dcfg.attention != "causal":
                    raise DecodeError(f"method='sps' needs a causal AR drafter; this drafter is {dcfg.attention} "
                                      "(use method='specdiff' or 'specdiff2' for diffusion drafters)")
                if num_drafts != 1 or denoise_steps != 1:
                    raise DecodeError("method='sps' drafts one chain autoregressively: num_drafts and "
                                      "denoise_steps must be 1")
                dkind = "ar"
            else:
                if dcfg.mask_token_id is None or dcfg.attention == "causal":
                    raise DecodeError(
                        f"method={method!r} needs a diffusion drafter with a mask token (attention block_causal or "
                        f"bidirectional and mask_token_id set); got attention={dcfg.attention}, "
                        f"mask_token_id={dcfg.mask_token_id}. Use method='sps' for a causal AR drafter")
                if denoise_steps > gamma:
                    raise DecodeError(f"denoise_steps={denoise_steps} must be <= gamma={gamma} "
                                      "(each step commits at least one position)")
                if method == "specdiff" and num_drafts > 1 and denoise_steps > 1:
                    raise DecodeError("method='specdiff' with num_drafts > 1 needs denoise_steps=1 (multi_draft "
                                      "verification assumes i.i.d. drafts); use method='specdiff2' for T > 1")
                dkind = "block" if dcfg.attention == "block_causal" else "bidir"
        try:
            rule = acc.resolve_acceptance(method, acceptance, temperature=temperature, num_drafts=num_drafts,
                                          denoise_steps=denoise_steps)
        except acc.AcceptanceError as e:
            raise DecodeError(str(e)) from None
        if method == "ar":
            gamma, num_drafts, denoise_steps = 0, 1, 1
        self.verifier, self.drafter = verifier, drafter
        self.method, self.rule, self.dkind = method, rule, dkind
        self.max_new_tokens, self.gamma, self.num_drafts, self.denoise_steps = max_new_tokens, gamma, num_drafts, denoise_steps
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.draft_temperature = float(draft_temperature)
        self.eos_id = eos_id
        self.pad_id = vcfg.pad_token_id if vcfg.pad_token_id is not None else 0
        self.draft_window = draft_window
        self._gv, self._vstate = nnx.split(verifier)
        self._gd, self._dstate = nnx.split(drafter) if dkind != "none" else (None, None)
        self._placement = None
        if mesh is not None:  # parameters sharded by their logical axes; kernels jitted with in/out shardings
            from specdiff_jax import sharding as shd
            from specdiff_jax.sharding import DEFAULT_AXIS_RULES

            rules = tuple(rules) if rules is not None else DEFAULT_AXIS_RULES
            self._placement = (mesh, rules)
            self._vstate = shd.place_state(self._vstate, mesh, rules)
            if self._dstate is not None:
                self._dstate = shd.place_state(self._dstate, mesh, rules)

    # ----------------------------------------------------------------------------------------------
    def _spec(self, prompts) -> tuple[_Spec, np.ndarray, np.ndarray]:
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise DecodeError("prompts must be a non-empty list of token-id lists, e.g. [[1, 2, 3]]")
        vcfg = self.verifier.cfg
        vocab_limit = vcfg.vocab_size if self.drafter is None else min(vcfg.vocab_size, self.drafter.cfg.vocab_size)
        for b, pr in enumerate(prompts):
            if not isinstance(pr, (list, tuple)) or not all(_is_int(t) for t in pr):
                raise DecodeError(f"prompt {b} must be a list of integer token ids, got {type(pr).__name__}")
            if len(pr) == 0:
                raise DecodeError(f"prompt {b} is empty: every prompt needs at least one token (e.g. a BOS id)")
            bad = [t for t in pr if not 0 <= t < vocab_limit]
            if bad:
                raise DecodeError(f"prompt {b} has token id {bad[0]} outside the vocabulary [0, {vocab_limit})")
        B = len(prompts)
        longest = max(len(pr) for pr in prompts)
        N, G = self.max_new_tokens, self.gamma
        limit = vcfg.max_seq_len
        if self.dkind in ("ar", "block"):
            limit = min(limit, self.drafter.cfg.max_seq_len)
        need = longest + N + G
        if need > limit:
            raise DecodeError(
                f"prompt length {longest} + max_new_tokens {N} + gamma {G} = {need} exceeds the models' "
                f"max_seq_len {limit}; shorten the prompt or lower max_new_tokens / gamma")
        P = min(_bucket(longest), limit - N - G)
        window = 0
        if self.dkind == "bidir":
            dmax = self.drafter.cfg.max_seq_len
            if dmax <= G:
                raise DecodeError(f"gamma={G} must be below the drafter's max_seq_len={dmax}")
            window = max(1, min(self.draft_window, P + N, dmax - G))
        tokens = np.full((B, P), self.pad_id, np.int32)
        for b, pr in enumerate(prompts):
            tokens[b, : len(pr)] = pr
        lens = np.asarray([len(pr) for pr in prompts], np.int32)
        dcfg = self.drafter.cfg if self.drafter is not None else None
        spec = _Spec(
            method=self.method, rule=self.rule, dkind=self.dkind, batch=B, bucket=P, max_new=N, gamma=G,
            num_drafts=self.num_drafts, steps=self.denoise_steps, temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, draft_temperature=self.draft_temperature,
            pad=int(self.pad_id), vocab=vcfg.num_sampleable,
            v_exclude=(vcfg.mask_token_id,) if vcfg.mask_token_id is not None else (),
            mask_id=-1 if dcfg is None or dcfg.mask_token_id is None else dcfg.mask_token_id,
            logit_shift=bool(dcfg.logit_shift) if dcfg is not None else False,
            vcap=P + N + G, dcap=P + N + G if self.dkind in ("ar", "block") else 0, window=window,
        )
        return spec, tokens, lens

    def check(self, prompts) -> None:
        """Validate `prompts` (token ids, lengths against the models' capacity) without compiling or running."""
        self._spec(prompts)

    def prefill(self, prompts) -> dict:
        """Validate, pad to the bucket and encode the prompts (jitted). Returns the decode state."""
        spec, tokens, lens = self._spec(prompts)
        pre, _ = self._kernels(spec)
        eos = jnp.asarray(-1 if self.eos_id is None else self.eos_id, jnp.int32)  # traced: no recompile per EOS id
        carry = pre(self._vstate, self._dstate, jnp.asarray(tokens), jnp.asarray(lens), eos)
        return {"spec": spec, "carry": carry}

    def decode_raw(self, state: dict, seed: int = 0):
        """The jitted decode loop on a prefill state: device arrays (tokens [B, N], lengths [B], stats)."""
        spec = state["spec"]
        _, dec = self._kernels(spec)
        key = jax.random.key(seed) if _is_int(seed) else seed
        return dec(self._vstate, self._dstate, state["carry"], key)

    def _kernels(self, spec: _Spec):
        return _compiled(spec, self._gv, self._gd, self._placement, self._vstate, self._dstate)

    def decode(self, state: dict, seed: int = 0) -> GenerateOutput:
        return self.output(self.decode_raw(state, seed))

    def output(self, raw) -> GenerateOutput:
        """The GenerateOutput (host arrays + statistics) of a `decode_raw` result."""
        tokens, lengths, st = jax.device_get(raw)
        return GenerateOutput(np.asarray(tokens), np.asarray(lengths), self._stats(st, np.asarray(lengths)))

    def __call__(self, prompts, seed: int = 0) -> GenerateOutput:
        return self.decode(self.prefill(prompts), seed)

    def _stats(self, st: dict, lengths: np.ndarray) -> dict[str, Any]:
        G = self.gamma
        row_rounds = np.asarray(st["row_rounds"])
        hist = np.asarray(st["hist"])[: G + 1]
        acc_counts = np.asarray(st["accept_counts"])[:G]
        reach = np.array([hist[j:].sum() for j in range(G)], np.int64)  # rounds in which draft j+1 was judged
        total_rr = int(row_rounds.sum())
        return {
            "method": self.method, "acceptance": self.rule, "gamma": G, "num_drafts": self.num_drafts,
            "denoise_steps": self.denoise_steps,
            "verifier_calls": int(st["rounds"]),  # verifier forwards in the decode loop (prefill excluded)
            "drafter_calls": int(st["drafter_calls"]),
            "row_verifier_calls": row_rounds.tolist(),
            "tokens": int(np.sum(lengths)),
            "tokens_per_verifier_call": float(np.sum(lengths)) / max(total_rr, 1),
            "mean_accepted": float(np.dot(np.arange(G + 1), hist)) / max(total_rr, 1),
            "accepted_hist": hist.tolist(),
            "accept_counts": acc_counts.tolist(),
            "alpha": (acc_counts / np.maximum(reach, 1)).tolist(),
        }


def generate(verifier, prompts, *, method: str, drafter=None, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, gamma: int = 16, num_drafts: int = 1, denoise_steps: int = 1,
             draft_temperature: float = 1.0, acceptance: str = "auto", eos_id: int | None = None,
             seed: int = 0, mesh=None, rules=None) -> GenerateOutput:
    """Generate up to `max_new_tokens` ids per prompt with `method` in ar | sps | specdiff | specdiff2.

    verifier, drafter: `Transformer`s (e.g. from `load_pretrained`). prompts: list of B token-id lists (ragged).
    temperature/top_k/top_p filter the verifier (0 = greedy); the drafter uses draft_temperature with the same
    top_k/top_p. gamma: draft length; num_drafts: K drafts (specdiff2: self-selection; specdiff: multi_draft);
    denoise_steps: T diffusion steps per draft. acceptance: auto | greedy | pq | delta | multi_draft (combinations
    that would not be lossless are refused). eos_id: ends a row (None = the verifier config's eos_token_id).
    Returns GenerateOutput: tokens int32[B, max_new_tokens] (padded after each row's end), lengths int32[B]
    (tokens up to and including EOS), stats (verifier_calls, tokens_per_verifier_call, accepted_hist, alpha, ...).
    mesh, rules: run under this device mesh (parameters sharded by the logical axis rules, default the config's
    defaults; KV caches by cache_batch / kv_heads); None = the parameters' own placement.
    """
    dec = Decoder(verifier, drafter, method=method, max_new_tokens=max_new_tokens, temperature=temperature,
                  top_k=top_k, top_p=top_p, gamma=gamma, num_drafts=num_drafts, denoise_steps=denoise_steps,
                  draft_temperature=draft_temperature, acceptance=acceptance, eos_id=eos_id, mesh=mesh, rules=rules)
    return dec(prompts, seed)
