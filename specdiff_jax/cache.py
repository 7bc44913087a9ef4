"""Fixed-capacity KV cache with per-row lengths.

Layout: k, v: [num_layers, B, S_max, kv_heads, head_dim]; lengths: int32[B]. Entries at or past
`lengths[b]` are stale: attention masks them, and later writes overwrite them. Rolling back is lowering
the length. Writes of a block at per-row offsets are one `dynamic_update_slice` per row (in place inside
`lax.while_loop`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: Array  # [L, B, S, KVH, D]
    v: Array  # [L, B, S, KVH, D]
    lengths: Array  # int32[B]

    @classmethod
    def init(cls, cfg, batch: int, capacity: int, dtype=None) -> "KVCache":
        """An empty cache for `batch` rows of `capacity` positions. dtype defaults to the compute dtype."""
        if capacity > cfg.max_seq_len:
            raise ValueError(
                f"cache capacity {capacity} exceeds the model's max_seq_len={cfg.max_seq_len}; "
                "use fewer prompt + new tokens or a model with a longer max_seq_len"
            )
        dt = dtype or {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.dtype]
        shape = (cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch,), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def write(self, k_new: Array, v_new: Array, offsets: Array) -> "KVCache":
        """Write a block at per-row offsets; lengths unchanged.

        k_new, v_new: [L, B, n, KVH, D]; offsets: int32[B]. The caller guarantees offsets + n <= capacity
        (dynamic_update_slice would clamp, silently shifting the block).
        """
        def upd(buf, new, off):  # buf [L, S, KVH, D], new [L, n, KVH, D]
            return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, off, 0, 0))

        upd_b = jax.vmap(upd, in_axes=(1, 1, 0), out_axes=1)
        return dataclasses.replace(self, k=upd_b(self.k, k_new, offsets), v=upd_b(self.v, v_new, offsets))

    def with_lengths(self, lengths: Array) -> "KVCache":
        return dataclasses.replace(self, lengths=jnp.asarray(lengths, jnp.int32))

    def append(self, k_new: Array, v_new: Array, counts: Array) -> "KVCache":
        """Write a block at each row's current length and advance the length by counts[b] (<= n)."""
        return self.write(k_new, v_new, self.lengths).with_lengths(self.lengths + counts)
