"""Timing model forwards the way the fused decode kernel runs them (benchmarks and cost curves).

`time_forward(model, batch, queries, cache_cap, cache_len)` is the seconds of one `Transformer.forward` of
`queries` tokens per row against a KV cache of `cache_cap` entries (`cache_len` of them valid; cache_cap 0 = no
cache). The forwards run back to back in one jitted `fori_loop`, each feeding its argmax to the next, so per-call
dispatch overhead, which the fused decode loop does not pay, is amortised away.

`ForwardProbe` splits that into an ahead-of-time compile (safe to run from a thread pool: XLA compiles release the
GIL, so many shapes compile at once on a many-core host) and the timing itself. `random_model` builds a model with
random weights directly on the default device in its parameter dtype (cost does not depend on the values).
`device_ceilings`, `peak_flops` and `train_flops_per_token` put measured times against what the device can do.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from specdiff_jax.cache import KVCache
from specdiff_jax.config import ModelConfig
from specdiff_jax.model import Transformer


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A Transformer of `cfg` with random weights, initialised by one jitted program on the default device.

    The parameters are created in `cfg.param_dtype` inside that program, so a bf16 7B model costs its 15 GB on the
    device and nothing on the host (no float32 copy is ever materialised outside the program).
    """
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed))))
    state = jax.jit(lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))[1])()
    return nnx.merge(graphdef, state)


@dataclasses.dataclass
class ForwardProbe:
    """One forward shape of one model: `compile()` (ahead of time) then `time()`."""

    model: Any
    batch: int
    queries: int
    cache_cap: int = 0  # 0 = no cache
    cache_len: int = 0
    reps: int = 32  # forwards per timed call (one fori_loop)
    compiled: Any = dataclasses.field(default=None, repr=False)
    compile_s: float | None = None
    samples: list[float] = dataclasses.field(default_factory=list)

    def _fn(self):
        g, _ = nnx.split(self.model)
        cfg, reps, q = self.model.cfg, self.reps, self.queries
        mask = jnp.ones((1, q, q), bool)

        def f(st, toks, pos, cache):
            m = nnx.merge(g, st)

            def body(_, t):
                logits = m.forward(t, pos, mask, cache)[0]
                return jnp.argmax(logits, axis=-1).astype(jnp.int32) % cfg.vocab_size

            return jax.lax.fori_loop(0, reps, body, toks)

        return jax.jit(f)

    def _cache(self):
        """A cache of random entries (not zeros: a matmul on zeros can run faster than on real data)."""
        c = KVCache.init(self.model.cfg, self.batch, self.cache_cap)
        keys = iter(jax.random.split(jax.random.PRNGKey(self.queries), 2 * len(c.k)))
        noise = lambda xs: tuple(jax.random.normal(next(keys), x.shape, x.dtype) for x in xs)  # noqa: E731
        return dataclasses.replace(c, k=noise(c.k), v=noise(c.v)).with_lengths(
            jnp.full((self.batch,), self.cache_len, jnp.int32))

    def _args(self, abstract: bool):
        st = nnx.state(self.model)
        shape = (self.batch, self.queries)
        if abstract:
            toks = pos = jax.ShapeDtypeStruct(shape, jnp.int32)
            cache = jax.eval_shape(self._cache) if self.cache_cap else None
            return st, toks, pos, cache
        toks = jnp.zeros(shape, jnp.int32)
        pos = self.cache_len + jnp.broadcast_to(jnp.arange(self.queries, dtype=jnp.int32), shape)
        return st, toks, pos, (self._cache() if self.cache_cap else None)

    def lower(self):
        """Trace and lower (call from one thread at a time); `compile()` of the result may run in a pool."""
        return self._fn().lower(*self._args(abstract=True))

    def compile(self, lowered=None) -> float:
        """Compile ahead of time; returns (and keeps) the seconds it took."""
        t0 = time.perf_counter()
        self.compiled = (lowered if lowered is not None else self.lower()).compile()
        self.compile_s = time.perf_counter() - t0
        return self.compile_s

    def time(self, repeats: int = 3) -> float:
        """Median seconds per forward over `repeats` timed calls, after one untimed call."""
        if self.compiled is None:
            self.compile()
        args = self._args(abstract=False)
        self.compiled(*args).block_until_ready()
        self.samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.compiled(*args).block_until_ready()
            self.samples.append((time.perf_counter() - t0) / self.reps)
        return statistics.median(self.samples)


def time_forward(model, batch: int, queries: int, cache_cap: int, cache_len: int, reps: int = 32) -> float:
    """Seconds per model.forward of `queries` tokens against a cache (cache_cap 0 = none), as inside the kernel.

    Median of 3 timings of `reps` forwards run back to back in one jitted fori_loop (see the module docstring).
    """
    return ForwardProbe(model, batch, queries, cache_cap, cache_len, reps).time()


# --- ceilings and throughput accounting ---------------------------------------------------------------------

# Dense bf16 peak FLOP/s by device kind (vendor datasheets, without sparsity); the first substring that matches wins.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("GH200", 989e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
    ("L40S", 362e12), ("TPU v6", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
    """The dense bf16 peak of a device kind (`jax.devices()[0].device_kind`), None when unknown (CPUs too)."""
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_kind.lower():
            return flops
    return None


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward): 6 x matmul parameters + attention, 12 x layers x heads x
    head_dim x seq_len, counted in full as the implementation computes it. The input embedding is a gather."""
    n = cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def device_ceilings(matmul_n: int = 8192, copy_mb: int = 2048, reps: int = 5) -> dict:
    """Measured ceilings of the default device: the bf16 rate of an n^3 matmul on random data (TFLOP/s) and the
    bandwidth of a device-to-device copy (GB/s, bytes read + written). Best of `reps` after a warm-up call."""
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (matmul_n, matmul_n), jnp.bfloat16)
    b = jax.random.normal(kb, (matmul_n, matmul_n), jnp.bfloat16)
    x = jax.random.normal(ka, (copy_mb * 2**20 // 4,), jnp.float32)

    def best(f, *args) -> float:
        f(*args).block_until_ready()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f(*args).block_until_ready()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    t_mm = best(jax.jit(lambda a, b: a @ b), a, b)
    t_cp = best(jax.jit(lambda x: x * 1.0001), x)  # one read, one write
    return {"matmul_n": matmul_n, "matmul_tflops": 2 * matmul_n**3 / t_mm / 1e12, "copy_bytes": 2 * x.nbytes,
            "copy_gbps": 2 * x.nbytes / t_cp / 1e9}
