"""Low-rank adapters (LoRA) for fine-tuning a pre-trained model, as pure functions on parameter dicts.

A targeted weight W f32[in, out] (our layers compute `x @ W`) is used as

    W_eff = W + (alpha / rank) * A @ B,   A [in, rank] ~ N(0, 1/in),  B [rank, out] = 0 at the start,

so a fresh adapter leaves the model unchanged. The training loop keeps the base parameters frozen (an argument of
the jitted step, never differentiated, never in the optimizer or the checkpoints) and trains only the adapter
tree; the model the objective sees is `nnx.merge(graphdef, merge(base, adapters, scale))`, so every objective and
every layout works unchanged. Exports are merged: a LoRA-calibrated drafter is an ordinary model directory.

The adapter tree mirrors the parameter tree (`nnx.to_pure_dict` of the model) on the targeted leaves only:
`{"layers": {0: {"self_attn": {"q_proj": {"a": A, "b": B}}}}}`. Its logical axes follow the base weight's: A takes
the input axis and B the output axis (the rank dimension is replicated), so adapters shard like their weights.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from specdiff_jax.config import ConfigError
from specdiff_jax.config.run import LORA_TARGETS


def target_paths(params: dict, targets: Sequence[str]) -> list[tuple]:
    """Paths (tuples of keys) of the 2-D parameters whose name is in `targets`, in a stable order.

    Raises ConfigError naming the target and the valid names when a target matches no 2-D parameter.
    """
    flat = traverse_util.flatten_dict(params)
    names = sorted({str(p[-1]) for p, v in flat.items() if len(jnp.shape(v)) == 2})
    if not targets:
        raise ConfigError(f"train.lora_targets is empty; name weights to adapt, e.g. {list(LORA_TARGETS)}")
    for t in targets:
        if t not in names:
            raise ConfigError(f"train.lora_targets names {t!r}, which is not a 2-D weight of this model; "
                              f"choose among {names}")
    return [p for p in sorted(flat, key=lambda p: tuple(str(k) for k in p))
            if str(p[-1]) in targets and len(jnp.shape(flat[p])) == 2]


def init(rng: jax.Array, params: dict, targets: Sequence[str], rank: int) -> dict:
    """Fresh adapters for `params` (arrays or ShapeDtypeStructs): A ~ N(0, 1/in), B = 0, in the weights' dtype."""
    if rank < 1:
        raise ConfigError(f"train.lora_rank={rank!r}: LoRA needs a rank >= 1 (0 = full fine-tuning)")
    flat = traverse_util.flatten_dict(params)
    out = {}
    for i, path in enumerate(target_paths(params, targets)):
        w = flat[path]
        d_in, d_out = w.shape
        if rank > min(d_in, d_out):
            raise ConfigError(f"train.lora_rank={rank} exceeds the smaller side of {'.'.join(map(str, path))} "
                              f"{tuple(w.shape)}; use a rank <= {min(d_in, d_out)}")
        a = jax.random.normal(jax.random.fold_in(rng, i), (d_in, rank), jnp.float32) / jnp.sqrt(d_in)
        out[path + ("a",)] = a.astype(w.dtype)
        out[path + ("b",)] = jnp.zeros((rank, d_out), w.dtype)
    return traverse_util.unflatten_dict(out)


def logical_axes(param_axes: dict, adapters_like: dict) -> dict:
    """Logical axes of the adapters (same tree as `adapters_like`) from the base parameters' axes tree."""
    flat_axes = traverse_util.flatten_dict(param_axes, is_leaf=lambda _, x: isinstance(x, tuple))
    out = {}
    for path in traverse_util.flatten_dict(adapters_like):
        w_in, w_out = flat_axes[path[:-1]]
        out[path] = (w_in, None) if path[-1] == "a" else (None, w_out)
    return traverse_util.unflatten_dict(out)


def merge(params: dict, adapters: dict, scale: float) -> dict:
    """`params` with every adapted weight replaced by W + scale * A @ B (computed in f32, cast back)."""
    if not adapters:
        return params
    flat = dict(traverse_util.flatten_dict(params))
    ad = traverse_util.flatten_dict(adapters)
    for path in {p[:-1] for p in ad}:
        w = flat[path]
        delta = jnp.dot(ad[path + ("a",)].astype(jnp.float32), ad[path + ("b",)].astype(jnp.float32))
        flat[path] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def num_params(adapters: dict) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(adapters))
