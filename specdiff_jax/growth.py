"""Function-preserving growth of a trained transformer: a deeper or wider model that computes the same logits as
the original when it is made, so fine-tuning it starts where the trained model is (Net2Net-style growth).

Depth (`grow_depth`). Layer l of the original is followed by copies of itself whose two output projections
(`o_proj`, `down_proj`) are zero. A decoder layer is `x + attn(norm(x)) @ o_proj` then `x + mlp(norm(x)) @
down_proj`, so a copy adds exactly 0 to the residual stream and the grown model's logits equal the original's bit
for bit. The copy's other weights are its neighbour's (features that already mean something); the zero
projections get a gradient on the first step (their input is the copy's non-zero attention / MLP output), and
everything else in the copy from the second step on.

Width (`grow_width`). The residual stream grows from D to D' dimensions that are 0 at the start; each grown weight
is the original in its top-left block, zero where it would write into the new dimensions or from new heads / MLP
units into the old ones (output directions), and small random values where it reads the new dimensions (input
directions: they multiply zeros, and they are what carries a gradient into the new dimensions). RMSNorm averages
over D' instead of D, so every norm weight is scaled by sqrt(D / D') and `rms_norm_eps` by D / D': then
`w' * x * rsqrt(sum(x^2) / D' + eps')` = `w * x * rsqrt(sum(x^2) / D + eps)` exactly in real arithmetic (float
rounding differs at about 1e-7 relative). New query heads join the kv groups (kv heads unchanged, so with
`num_kv_heads` = 1 they share the one kv head); the head size is unchanged, so the attention scale is too.

Both work on any Qwen2-family model of this package (causal verifiers, block-causal and bidirectional drafters).
`python -m train.grow` writes a grown model directory that `train.init_from` accepts.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specdiff_jax.checkpoint import fill_model
from specdiff_jax.config import ConfigError
from specdiff_jax.model import Transformer

OUTPUT_PROJECTIONS = ("o_proj", "down_proj")  # a layer's writes into the residual stream
INPUT_STD = 0.02  # std of new weights that read the new residual dimensions (the model's init std)


def params_of(model: Transformer) -> dict:
    """The model's parameters as a pure dict of numpy arrays (keys as `nnx.to_pure_dict`)."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def depth_sources(old: int, new: int) -> list[int]:
    """For each layer of the grown stack, the original layer it starts from: originals spread evenly, each
    followed by its copies ([0, 0, 1] for 2 -> 3 layers, [0, 0, 1, 1] for 2 -> 4)."""
    return [i * old // new for i in range(new)]


def grow_depth(model: Transformer, num_layers: int) -> Transformer:
    """A model of `num_layers` >= model.cfg.num_layers layers with exactly the original's logits (module
    docstring). The first occurrence of each source layer in `depth_sources` is the original layer; the others
    are copies with zero output projections."""
    cfg = model.cfg
    if not isinstance(num_layers, int) or num_layers < cfg.num_layers:
        raise ConfigError(f"grow to num_layers={num_layers!r}: must be an integer >= the model's "
                          f"{cfg.num_layers} layers (growth adds layers, it never removes them)")
    params = params_of(model)
    old = params["layers"]
    layers, seen = {}, set()
    for i, src in enumerate(depth_sources(cfg.num_layers, num_layers)):
        layer = copy.deepcopy(old[src])
        if src in seen:
            layer["self_attn"]["o_proj"] = np.zeros_like(layer["self_attn"]["o_proj"])
            layer["mlp"]["down_proj"] = np.zeros_like(layer["mlp"]["down_proj"])
        seen.add(src)
        layers[i] = layer
    params["layers"] = layers
    return fill_model(dataclasses.replace(cfg, num_layers=num_layers), jax.tree.map(jnp.asarray, params))


def _embed(w: np.ndarray, shape: tuple, fill: str, rng: np.random.Generator) -> np.ndarray:
    """`w` in the leading corner of a new array of `shape`, the rest zero or N(0, INPUT_STD^2)."""
    out = (np.zeros(shape, w.dtype) if fill == "zero"
           else (INPUT_STD * rng.standard_normal(shape)).astype(w.dtype))
    out[tuple(slice(0, n) for n in w.shape)] = w
    return out


def _grow_attention(a: dict, d: int, d2: int, kv: int, g: int, g2: int, hd: int, rng) -> dict:
    """One layer's attention weights from D, kv x g heads to D', kv x g' heads (heads laid out [kv, g, hd])."""
    q = a["q_proj"].reshape(d, kv, g, hd)
    q = _embed(q, (d2, kv, g2, hd), "random", rng)
    q[:, :, g:] = (INPUT_STD * rng.standard_normal((d2, kv, g2 - g, hd))).astype(q.dtype)
    out = {"q_proj": q.reshape(d2, kv * g2 * hd),
           "k_proj": _embed(a["k_proj"], (d2, kv * hd), "random", rng),
           "v_proj": _embed(a["v_proj"], (d2, kv * hd), "random", rng),
           "o_proj": _embed(a["o_proj"].reshape(kv, g, hd, d), (kv, g2, hd, d2), "zero", rng)
           .reshape(kv * g2 * hd, d2)}
    if "q_bias" in a:
        out["q_bias"] = _embed(a["q_bias"].reshape(kv, g, hd), (kv, g2, hd), "zero", rng).reshape(-1)
        out["k_bias"], out["v_bias"] = a["k_bias"], a["v_bias"]
    return out


def grow_width(model: Transformer, hidden_size: int, num_heads: int, intermediate_size: int, *,
               seed: int = 0) -> Transformer:
    """A model with a wider residual stream, more query heads (same head size and kv heads) and a wider MLP whose
    logits equal the original's up to float rounding (module docstring). New input-direction weights are drawn
    from N(0, 0.02^2) with `seed`."""
    cfg = model.cfg
    d, f, h, kv, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    for key, new, old in (("hidden_size", hidden_size, d), ("num_heads", num_heads, h),
                          ("intermediate_size", intermediate_size, f)):
        if not isinstance(new, int) or new < old:
            raise ConfigError(f"grow to {key}={new!r}: must be an integer >= the model's {old} (growth never "
                              "shrinks a model)")
    if num_heads % kv:
        raise ConfigError(f"grow to num_heads={num_heads}: must be a multiple of the model's num_kv_heads={kv} "
                          "(kv heads are kept)")
    d2, g, g2 = hidden_size, h // kv, num_heads // kv
    rng = np.random.default_rng(seed)
    p = params_of(model)
    scale = math.sqrt(d / d2)

    def norm(n: dict) -> dict:  # an RMSNorm's {"weight": [D]}
        w = n["weight"]
        return {"weight": np.concatenate([w, np.ones(d2 - d, w.dtype)]) * np.asarray(scale, w.dtype)}

    out = {"embed_tokens": _embed(p["embed_tokens"], (cfg.vocab_size, d2), "zero", rng), "norm": norm(p["norm"]),
           "layers": {}}
    if "lm_head" in p:
        out["lm_head"] = _embed(p["lm_head"], (d2, cfg.vocab_size), "random", rng)
    for i, layer in p["layers"].items():
        m = layer["mlp"]
        out["layers"][i] = {
            "input_layernorm": norm(layer["input_layernorm"]),
            "post_attention_layernorm": norm(layer["post_attention_layernorm"]),
            "self_attn": _grow_attention(layer["self_attn"], d, d2, kv, g, g2, hd, rng),
            "mlp": {"gate_proj": _embed(m["gate_proj"], (d2, intermediate_size), "random", rng),
                    "up_proj": _embed(m["up_proj"], (d2, intermediate_size), "random", rng),
                    "down_proj": _embed(m["down_proj"], (intermediate_size, d2), "zero", rng)}}
    new_cfg = dataclasses.replace(cfg, hidden_size=d2, num_heads=num_heads, intermediate_size=intermediate_size,
                                  rms_norm_eps=cfg.rms_norm_eps * d / d2)
    return fill_model(new_cfg, jax.tree.map(jnp.asarray, out))
