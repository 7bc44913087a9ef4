"""Fixed-capacity KV cache with per-row lengths.

Layout: k, v: tuples of num_layers arrays [B, kv_heads, S_max, head_dim], one per layer (heads-major, so
attention reads one contiguous [S, head_dim] slice per row and kv head with no transposes; one array per layer
so that no layer's slice is copied out of a stacked buffer on every forward). lengths: int32[B]. Entries at or
past `lengths[b]` are stale: attention masks them, and later writes overwrite them. Rolling back is lowering
the length. Blocks come from `Transformer.forward` as [num_layers, B, n, kv_heads, head_dim] and are written
at per-row offsets with one `dynamic_update_slice` per row and layer (in place inside `lax.while_loop`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from specdiff_jax.config import jax_dtype

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[Array, ...]  # num_layers x [B, KVH, S, D]
    v: tuple[Array, ...]  # num_layers x [B, KVH, S, D]
    lengths: Array  # int32[B]

    @classmethod
    def init(cls, cfg, batch: int, capacity: int, dtype=None) -> "KVCache":
        """An empty cache for `batch` rows of `capacity` positions. dtype defaults to the compute dtype."""
        if capacity > cfg.max_seq_len:
            raise ValueError(
                f"cache capacity {capacity} exceeds the model's max_seq_len={cfg.max_seq_len}; "
                "use fewer prompt + new tokens or a model with a longer max_seq_len"
            )
        dt = dtype or jax_dtype(cfg.dtype)
        shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers))
        return cls(zeros, tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers)),
                   jnp.zeros((batch,), jnp.int32))

    @classmethod
    def from_block(cls, k: Array, v: Array, lengths: Array) -> "KVCache":
        """A cache holding a forward's block keys/values k, v [L, B, n, KVH, D] with per-row lengths."""
        return cls(tuple(jnp.swapaxes(x, 1, 2) for x in k), tuple(jnp.swapaxes(x, 1, 2) for x in v),
                   jnp.asarray(lengths, jnp.int32))

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the stacked k (or v): [num_layers, B, KVH, S, D]."""
        return (len(self.k),) + tuple(self.k[0].shape)

    def stacked(self) -> tuple[Array, Array]:
        """k, v stacked over layers: [num_layers, B, KVH, S, D] each (for inspection and tests)."""
        return jnp.stack(self.k), jnp.stack(self.v)

    def write(self, k_new: Array, v_new: Array, offsets: Array) -> "KVCache":
        """Write a block at per-row offsets; lengths unchanged.

        k_new, v_new: [L, B, n, KVH, D]; offsets: int32[B]. The caller guarantees offsets + n <= capacity
        (dynamic_update_slice would clamp, silently shifting the block).
        """
        def upd(buf, new, off):  # buf [KVH, S, D], new [n, KVH, D]
            return jax.lax.dynamic_update_slice(buf, jnp.swapaxes(new, 0, 1).astype(buf.dtype), (0, off, 0))

        upd_b = jax.vmap(upd)
        k = tuple(upd_b(buf, k_new[i], offsets) for i, buf in enumerate(self.k))
        v = tuple(upd_b(buf, v_new[i], offsets) for i, buf in enumerate(self.v))
        return dataclasses.replace(self, k=k, v=v)

    def with_lengths(self, lengths: Array) -> "KVCache":
        return dataclasses.replace(self, lengths=jnp.asarray(lengths, jnp.int32))

    def append(self, k_new: Array, v_new: Array, counts: Array) -> "KVCache":
        """Write a block at each row's current length and advance the length by counts[b] (<= n)."""
        return self.write(k_new, v_new, self.lengths).with_lengths(self.lengths + counts)
