"""Timing model forwards the way the fused decode kernel runs them (benchmarks and cost curves).

`time_forward(model, batch, queries, cache_cap, cache_len)` is the seconds of one `Transformer.forward` of
`queries` tokens per row against a KV cache of `cache_cap` entries (`cache_len` of them valid; cache_cap 0 = no
cache). The forwards run back to back in one jitted `fori_loop`, each feeding its argmax to the next, so per-call
dispatch overhead, which the fused decode loop does not pay, is amortised away.

`ForwardProbe` splits that into an ahead-of-time compile (safe to run from a thread pool: XLA compiles release the
GIL, so many shapes compile at once on a many-core host) and the timing itself. `random_model` builds a model with
random weights directly on the default device in its parameter dtype (cost does not depend on the values).
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
        kk, kv = jax.random.split(jax.random.PRNGKey(self.queries))
        return dataclasses.replace(c, k=jax.random.normal(kk, c.k.shape, c.k.dtype),
                                   v=jax.random.normal(kv, c.v.shape, c.v.dtype)).with_lengths(
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
