"""The global training stream as a fixed number of disjoint shards, read by any number of processes.

A run's batch stream is defined by `num_shards` independent pipelines (shard i reads documents i, i + S, ...):
global batch t is the concatenation of batch t of shard 0, 1, ..., S-1 (each `batch_size / S` rows). Process p
of n reads the contiguous shards [p*S/n, (p+1)*S/n), so its rows are exactly its slice of the global batch
(`jax.make_array_from_process_local_data` puts process 0's rows first), no document is read by two processes,
and the stream does not depend on n. The iterator state is the list of all S shard states (gathered from every
process when saved), so a checkpoint written by 2 processes resumes in 1 process (or 4, any n dividing S) with
exactly the batches the original job would have seen.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np

from specdiff_jax.config import ConfigError


def _allgather_json(obj: Any, process_count: int) -> list[Any]:
    """Every process's `obj` (JSON-serialisable), in process order. A collective: all processes must call it."""
    if process_count == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: data.size] = data
    every = np.asarray(multihost_utils.process_allgather(buf)).reshape(process_count, -1)
    return [json.loads(bytes(every[i, : sizes[i]]).decode()) for i in range(process_count)]


class ShardedStream:
    """`make_shard(shard_index, shard_count, batch_size)` -> an iterable (grain IterDataset) of one shard's batches
    {"tokens", "segment_ids": int32[batch_size, L]} whose iterator has get_state()/set_state()."""

    def __init__(self, make_shard: Callable[[int, int, int], Any], *, num_shards: int, batch_size: int,
                 process_index: int = 0, process_count: int = 1):
        if num_shards < 1 or num_shards % process_count:
            raise ConfigError(f"data.num_shards={num_shards} must be a positive multiple of the process count "
                              f"({process_count}); set data.num_shards to a multiple of it (0 = the process count)")
        if batch_size % num_shards:
            raise ConfigError(f"data.batch_size={batch_size} must be divisible by data.num_shards={num_shards}")
        self.num_shards, self.process_count = num_shards, process_count
        per = num_shards // process_count
        self.own = list(range(process_index * per, (process_index + 1) * per))
        self._datasets = [make_shard(i, num_shards, batch_size // num_shards) for i in self.own]

    def __iter__(self) -> "_ShardedIterator":
        return _ShardedIterator(self, [iter(d) for d in self._datasets])


class _ShardedIterator:
    def __init__(self, stream: ShardedStream, its: list):
        self.stream, self.its = stream, its

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.its]
        return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}

    def get_state(self) -> dict:
        """{"num_shards": S, "shards": [state of shard 0..S-1]}; a collective in multi-process runs."""
        s = self.stream
        local = {str(i): it.get_state() for i, it in zip(s.own, self.its)}
        every: dict[str, Any] = {}
        for part in _allgather_json(local, s.process_count):
            every.update(part)
        return {"num_shards": s.num_shards, "shards": [every[str(i)] for i in range(s.num_shards)]}

    def set_state(self, state: dict) -> None:
        s = self.stream
        if not isinstance(state, dict) or "shards" not in state:  # a single pipeline's own state (older runs)
            if s.num_shards != 1:
                raise ConfigError(f"the checkpoint's data state is one stream but data.num_shards={s.num_shards}; "
                                  "resume with data.num_shards=1")
            self.its[0].set_state(state)
            return
        if state.get("num_shards") != s.num_shards:
            raise ConfigError(f"the checkpoint's data stream has {state.get('num_shards')} shards but "
                              f"data.num_shards={s.num_shards}; resume with data.num_shards={state.get('num_shards')} "
                              "(any process count dividing it works)")
        for i, it in zip(s.own, self.its):
            it.set_state(state["shards"][i])
