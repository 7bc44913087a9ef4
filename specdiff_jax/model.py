"""One Qwen2-family transformer (Flax NNX), used functionally through `nnx.split` / `nnx.merge`.

Pre-RMSNorm blocks, rotary position embeddings, grouped-query attention, SwiGLU MLP, optional q/k/v bias
(Qwen2: yes, LLaMA: no) and optional tied embeddings. The attention layout is a config switch
(`causal`, `bidirectional`, `block_causal`, docs/METHOD.md §2); there is one implementation for all of them.

Every parameter carries `logical_axes` metadata (`vocab`, `embed`, `heads`, `kv_heads`, `mlp`, `norm`) that
`specdiff_jax.sharding` maps to mesh axes.

The functional core is `Transformer.forward(tokens, positions, block_mask, cache)`: a block of Q query tokens
attends to the first `cache.lengths[b]` entries of a KV cache (if any) and, inside the block, according to
`block_mask`. It returns logits and the block's own keys/values; writing them into a cache is a separate,
explicit step (`KVCache.write`) so that K draft chains can be scored against one shared prefix and only the
selected chain's entries copied in.

How a training forward executes (not what it computes) is set by `execution(...)` while a step is traced:
rematerialisation of each decoder layer (`nnx.remat` with a named `jax.checkpoint_policies` policy) and the
attention implementation of cache-free forwards (`plain`: the einsum path below, the reference; `xla` / `cudnn`:
`jax.nn.dot_product_attention`, cudnn being the fused flash kernel on NVIDIA GPUs; `auto`: cudnn on a GPU with a
bf16 compute dtype, plain elsewhere). Activations are constrained by logical axes (`sharding.constrain`: a no-op
outside a step's `activation_sharding`). `Transformer.token_logprobs` scores targets over vocabulary chunks
without materialising [..., V] logits. Decoding uses none of these: its path is unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from specdiff_jax.cache import KVCache
from specdiff_jax.config import ModelConfig, jax_dtype
from specdiff_jax.sharding import constrain

Array = jax.Array
NEG_INF = -1e30  # finite "minus infinity" for masked scores and logits: fully masked rows stay NaN-free

# train.remat: which intermediates of a decoder layer the backward pass keeps (the rest is recomputed)
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: every intermediate kept
    "full": jax.checkpoint_policies.nothing_saveable,  # only each layer's input kept
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # matmul outputs kept, elementwise recomputed
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # projections
}
ATTENTION_IMPLS = ("auto", "plain", "xla", "cudnn")
ACT = ("batch", "length", "embed")  # logical axes of the residual stream [B, L, D]


@dataclasses.dataclass(frozen=True)
class Execution:
    remat: str = "none"
    attention: str = "plain"


_EXECUTION: contextvars.ContextVar = contextvars.ContextVar("execution", default=Execution())


@contextlib.contextmanager
def execution(remat: str = "none", attention: str = "plain"):
    """Rematerialisation policy (REMAT_POLICIES) and attention implementation (ATTENTION_IMPLS) of the forwards
    traced in this context."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat policy {remat!r}: choose one of {tuple(REMAT_POLICIES)}")
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {attention!r}: choose one of {ATTENTION_IMPLS}")
    token = _EXECUTION.set(Execution(remat, attention))
    try:
        yield
    finally:
        _EXECUTION.reset(token)


def _attention_impl(cdt) -> str:
    impl = _EXECUTION.get().attention
    if impl == "auto":
        return "cudnn" if jax.default_backend() == "gpu" and cdt == jnp.bfloat16 else "plain"
    return impl


def _param(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, *, std: float | None = 0.02, ones=False):
    dt = jax_dtype(cfg.param_dtype)
    if ones:
        value = jnp.ones(shape, dt)
    elif std is None:
        value = jnp.zeros(shape, dt)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dt)
    return nnx.Param(value, logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.weight = _param(rngs, (cfg.hidden_size,), ("norm",), cfg, ones=True)
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: Array) -> Array:
        # Statistics in f32 whatever the compute dtype, as HF Qwen2 does.
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (self.weight.value.astype(jnp.float32) * xf).astype(x.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding, HF "rotate_half" convention. x: [B, T, N, D], positions: int32[B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(jnp.concatenate([ang, ang], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([ang, ang], -1))[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    rot = jnp.concatenate([-x2, x1], -1)
    return (xf * cos + rot * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.q_proj = _param(rngs, (d, h * hd), ("embed", "heads"), cfg)
        self.k_proj = _param(rngs, (d, kv * hd), ("embed", "kv_heads"), cfg)
        self.v_proj = _param(rngs, (d, kv * hd), ("embed", "kv_heads"), cfg)
        self.o_proj = _param(rngs, (h * hd, d), ("heads", "embed"), cfg)
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (h * hd,), ("heads",), cfg, std=None)
            self.k_bias = _param(rngs, (kv * hd,), ("kv_heads",), cfg, std=None)
            self.v_bias = _param(rngs, (kv * hd,), ("kv_heads",), cfg, std=None)

    def __call__(self, x, positions, block_mask, cache_k, cache_v, cache_lengths):
        """x [B, Q, D]; cache_k/v [B, kv_heads, S, head_dim] (one layer of a KVCache) or None.
        Returns (out [B, Q, D], the block's k and v [B, Q, kv_heads, head_dim])."""
        cfg = self.cfg
        B, Q, _ = x.shape
        h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        g = h // kv
        cdt = x.dtype

        def proj(w, name, axis):
            y = x @ w.value.astype(cdt)
            if cfg.qkv_bias:
                y = y + getattr(self, name).value.astype(cdt)
            return constrain(y, ("batch", "length", axis))

        q = proj(self.q_proj, "q_bias", "heads").reshape(B, Q, kv, g, hd)
        k = proj(self.k_proj, "k_bias", "kv_heads").reshape(B, Q, kv, hd)
        v = proj(self.v_proj, "v_bias", "kv_heads").reshape(B, Q, kv, hd)
        q = rope(q.reshape(B, Q, h, hd), positions, cfg.rope_theta).reshape(B, Q, kv, g, hd)
        k = rope(k, positions, cfg.rope_theta)

        scale = 1.0 / math.sqrt(hd)
        impl = _attention_impl(cdt) if cache_k is None else "plain"
        if impl != "plain":  # jax.nn.dot_product_attention: same math, fused kernel where the backend has one
            mask = jnp.broadcast_to(block_mask[:, None], (block_mask.shape[0], 1, Q, Q))
            out = jax.nn.dot_product_attention(q.reshape(B, Q, h, hd), k, v, mask=mask, scale=scale,
                                               implementation=impl)
            out = constrain(out.reshape(B, Q, h * hd), ("batch", "length", "heads"))
            return constrain(out @ self.o_proj.value.astype(cdt), ACT), k, v
        # Heads-major layout with the g query heads of a kv head and the Q queries merged into one M = g*Q
        # dimension: every score/value product is then one plain batched matmul per (row, kv head) over a
        # contiguous [S, head_dim] cache slice (no transposes of the cache, few and large matmuls on CPU).
        qm = q.transpose(0, 2, 3, 1, 4).reshape(B, kv, g * Q, hd)
        kb, vb = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, kv, Q, hd]
        s_blk = jnp.einsum("bkmd,bksd->bkms", qm, kb, preferred_element_type=jnp.float32) * scale
        s_blk = jnp.where(jnp.tile(block_mask, (1, g, 1))[:, None], s_blk, NEG_INF)  # [B|1, 1, g*Q, Q]
        if cache_k is None:
            p = jax.nn.softmax(s_blk, axis=-1)
            out = jnp.einsum("bkms,bksd->bkmd", p.astype(cdt), vb)
        else:
            # Scores against the cache [B, kv, g*Q, S]; one softmax over cache + block without concatenating
            # (copying) the cache-sized score arrays.
            S = cache_k.shape[2]
            s_c = jnp.einsum("bkmd,bksd->bkms", qm, cache_k.astype(cdt), preferred_element_type=jnp.float32)
            valid = jnp.arange(S)[None, :] < cache_lengths[:, None]  # [B, S]
            s_c = jnp.where(valid[:, None, None, :], s_c * scale, NEG_INF)
            m = jnp.maximum(jnp.max(s_c, axis=-1, keepdims=True), jnp.max(s_blk, axis=-1, keepdims=True))
            e_c, e_b = jnp.exp(s_c - m), jnp.exp(s_blk - m)
            inv = 1.0 / (jnp.sum(e_c, axis=-1, keepdims=True) + jnp.sum(e_b, axis=-1, keepdims=True))
            out = jnp.einsum("bkms,bksd->bkmd", (e_c * inv).astype(cdt), cache_v.astype(cdt)) + jnp.einsum(
                "bkms,bksd->bkmd", (e_b * inv).astype(cdt), vb)
        out = out.reshape(B, kv, g, Q, hd).transpose(0, 3, 1, 2, 4)
        out = constrain(out.reshape(B, Q, h * hd), ("batch", "length", "heads"))
        return constrain(out @ self.o_proj.value.astype(cdt), ACT), k, v


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), cfg)

    def __call__(self, x):
        cdt = x.dtype
        hidden = ("batch", "length", "mlp")
        gate = jax.nn.silu(constrain(x @ self.gate_proj.value.astype(cdt), hidden))
        up = constrain(x @ self.up_proj.value.astype(cdt), hidden)
        return constrain((gate * up) @ self.down_proj.value.astype(cdt), ACT)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg, rngs)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, block_mask, cache_k, cache_v, cache_lengths):
        a, k, v = self.self_attn(self.input_layernorm(x), positions, block_mask, cache_k, cache_v, cache_lengths)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ACT), k, v


def layout_mask(cfg: ModelConfig, length: int, prefix_len: int | None = None) -> Array:
    """Static self-attention mask bool[1, T, T] of a layout (True = may attend).

    block_causal: positions < prefix_len are causal, positions >= prefix_len (the block) attend to everything
    before the block and to the whole block. Default prefix_len = length - cfg.block_size.
    """
    i = jnp.arange(length)[:, None]
    j = jnp.arange(length)[None, :]
    if cfg.attention == "causal":
        m = j <= i
    elif cfg.attention == "bidirectional":
        m = jnp.ones((length, length), bool)
    else:
        p = max(length - cfg.block_size, 0) if prefix_len is None else prefix_len
        m = (j <= i) | ((i >= p) & (j >= p))
    return m[None]


class Transformer(nnx.Module):
    """Qwen2-family decoder. Construct with `Transformer(cfg, rngs=nnx.Rngs(seed))`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg)

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        tokens: Array,
        positions: Array,
        block_mask: Array,
        cache: KVCache | None = None,
        *,
        compute_logits: bool = True,
        logits_from: int = 0,
    ) -> tuple[Array | None, Array, Array]:
        """Run a block of tokens.

        tokens: int32[B, Q]; positions: int32[B, Q] (rotary positions);
        block_mask: bool[B or 1, Q, Q], which block tokens each block token may attend to;
        cache: optional KVCache; every query also attends to cache entries [0, cache.lengths[b]).
        Returns (logits float32[B, Q - logits_from, V] or None, k, v) with k, v: [num_layers, B, Q, kv_heads,
        head_dim], the block's keys/values (not written anywhere). `logits_from` skips the LM head on the first
        block positions (XLA does not drop an unused slice of it by itself).
        """
        x, k_all, v_all = self.hidden_states(tokens, positions, block_mask, cache)
        if not compute_logits:
            return None, k_all, v_all
        return self.logits(x[:, logits_from:]), k_all, v_all

    def hidden_states(self, tokens: Array, positions: Array, block_mask: Array,
                      cache: KVCache | None = None) -> tuple[Array, Array, Array]:
        """`forward` without the final norm and LM head: (last layer's output [B, Q, D] in the compute dtype, k, v).

        Without a cache each layer is rematerialised by the policy of the enclosing `execution` context.
        """
        cdt = jax_dtype(self.cfg.dtype)
        x = constrain(jnp.take(self.embed_tokens.value, tokens, axis=0).astype(cdt), ACT)
        policy = REMAT_POLICIES[_EXECUTION.get().remat]
        if cache is None and policy is not None:
            return _remat_scan(self.layers, x, positions, block_mask, policy)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            ck = None if cache is None else cache.k[i]
            cv = None if cache is None else cache.v[i]
            cl = None if cache is None else cache.lengths
            x, k, v = layer(x, positions, block_mask, ck, cv, cl)
            ks.append(k)
            vs.append(v)
        return x, jnp.stack(ks), jnp.stack(vs)

    def head_weight(self) -> Array:
        """The LM head [D, V] (the embedding's transpose when tied)."""
        return self.embed_tokens.value.T if self.cfg.tie_embeddings else self.lm_head.value

    def logits(self, x: Array) -> Array:
        """Final norm + LM head on hidden states [..., D] -> float32 logits [..., V]."""
        x = self.norm(x)
        logits = jnp.einsum("...d,dv->...v", x, self.head_weight().astype(x.dtype),
                            preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab")) if logits.ndim == 3 else logits

    def token_logprobs(self, x: Array, targets: Array, *, chunk: int, temperature: float = 1.0,
                       allowed: Array | None = None) -> tuple[Array, Array]:
        """log softmax(logits / temperature)[target] and whether the target is the argmax, from hidden states.

        x: [..., D] (before the final norm), targets int32[...]; allowed: bool[V] (others get NEG_INF logits) or
        None. Returns (f32[...], bool[...]). With chunk > 0 the LM head runs over vocabulary chunks of that size in
        a rematerialised scan with an online logsumexp, so neither pass holds more than [..., chunk] logits;
        chunk = 0 computes the full logits (the reference).
        """
        if chunk <= 0:
            z = self.logits(x) / temperature
            if allowed is not None:
                z = jnp.where(allowed, z, NEG_INF)
            logp = jax.nn.log_softmax(z, axis=-1)
            picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            return picked, jnp.argmax(z, axis=-1) == targets
        return _chunked_logprobs(self.norm(x), self.head_weight(), targets, chunk, temperature, allowed)

    def __call__(self, tokens: Array, prefix_len: int | None = None) -> Array:
        """Full forward without a cache: tokens int32[B, L] -> float32 logits [B, L, V].

        The layout comes from the config; for block_causal the last `cfg.block_size` positions (or those from
        `prefix_len` on) form the block. For logit-shifted drafters the output at i predicts token i+1.
        """
        tokens = jnp.asarray(tokens, jnp.int32)
        B, L = tokens.shape
        if L > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {L} exceeds the model's max_seq_len={self.cfg.max_seq_len}; "
                "shorten the input or raise max_seq_len in the model config"
            )
        positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        logits, _, _ = self.forward(tokens, positions, layout_mask(self.cfg, L, prefix_len))
        return logits


def _remat_scan(layers, x, positions, block_mask, policy):
    """The cache-free layer stack as one `lax.scan` over the stacked layer states, each step under
    `jax.checkpoint(policy)`: the backward pass recomputes a layer inside its loop iteration, so the recomputation
    cannot be scheduled next to the forward. (With an unrolled stack of checkpointed layers XLA is free to do that,
    and XLA's CPU scheduler does: the compiled figure then keeps every layer's intermediates, as without remat.)
    Returns (x, k [L, ...], v [L, ...]) like the unrolled stack."""
    graphdef, _ = nnx.split(layers[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.split(layer)[1] for layer in layers))

    def body(h, st):
        h, k, v = nnx.merge(graphdef, st)(h, positions, block_mask, None, None, None)
        return h, (k, v)

    x, (ks, vs) = jax.lax.scan(jax.checkpoint(body, policy=policy, prevent_cse=False), x, stacked)
    return x, ks, vs


def _chunked_logprobs(h: Array, w: Array, targets: Array, chunk: int, temperature: float, allowed):
    """`Transformer.token_logprobs` over vocabulary chunks; h: normed hidden [..., D], w: [D, V]."""
    D, V = w.shape
    n = -(-V // chunk)
    ok = jnp.ones((V,), bool) if allowed is None else allowed
    if n * chunk != V:  # pad the vocabulary to whole chunks; padded columns are never allowed
        w = jnp.pad(w, ((0, 0), (0, n * chunk - V)))
        ok = jnp.pad(ok, (0, n * chunk - V))
    ws = w.reshape(D, n, chunk).transpose(1, 0, 2)  # [n, D, chunk]
    lead = targets.shape
    axes = ("batch", "length", "vocab") if len(lead) == 2 else (None,) * (len(lead) + 1)

    @jax.checkpoint  # the backward pass recomputes each chunk's logits instead of keeping them
    def body(carry, xs):
        m, s, picked, best, arg = carry
        wc, okc, off = xs
        z = jnp.einsum("...d,dv->...v", h, wc.astype(h.dtype), preferred_element_type=jnp.float32)
        z = jnp.where(okc, constrain(z, axes) / temperature, NEG_INF)
        cmax = z.max(-1)
        m_new = jnp.maximum(m, cmax)
        s = s * jnp.exp(m - m_new) + jnp.exp(z - m_new[..., None]).sum(-1)
        idx = targets - off
        inside = (idx >= 0) & (idx < chunk)
        hit = jnp.take_along_axis(z, jnp.clip(idx, 0, chunk - 1)[..., None], axis=-1)[..., 0]
        picked = picked + jnp.where(inside, hit, 0.0)
        better = cmax > best
        arg = jnp.where(better, jnp.argmax(z, -1).astype(jnp.int32) + off, arg)
        return (m_new, s, picked, jnp.where(better, cmax, best), arg), None

    f32 = lambda v: jnp.full(lead, v, jnp.float32)  # noqa: E731
    init = (f32(NEG_INF), f32(0.0), f32(0.0), f32(-jnp.inf), jnp.zeros(lead, jnp.int32))
    offsets = jnp.arange(n, dtype=jnp.int32) * chunk
    (m, s, picked, _, arg), _ = jax.lax.scan(body, init, (ws, ok.reshape(n, chunk), offsets))
    return picked - (m + jnp.log(s)), arg == targets


def abstract_model(cfg: ModelConfig) -> Transformer:
    """A Transformer whose parameters are jax.ShapeDtypeStruct: shapes and dtypes only, nothing allocated."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
