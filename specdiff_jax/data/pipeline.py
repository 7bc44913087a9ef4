"""Grain input pipeline: documents -> tokens + <eos> -> packed rows of seq_len -> batches, checkpointable.

    ds = packed_dataset(load_split("data", "train"), load_tokenizer("assets/tiny"), seq_len=256, batch_size=8)
    it = iter(ds)
    batch = next(it)          # {"tokens": int32[8, 256], "segment_ids": int32[8, 256]}
    state = it.get_state()    # a small dict (JSON-serialisable); it.set_state(state) resumes exactly

Order of operations: shard the documents (document i goes to shard i % shard_count) -> shuffle documents
(a different permutation each epoch) -> repeat -> tokenise and append <eos> -> concatenate and split into rows of
seq_len (grain's ConcatThenSplitIterDataset: no token is dropped or duplicated; a document that does not fit is
continued in the next row) -> batch. segment_ids number the documents within a row from 1 (a document continued
from the previous row is segment 1 of the new row); 0 marks padding, which appears only at the very end of a
finite dataset (the last row, and whole rows that pad the last batch to batch_size). Padding tokens are pad_id.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, batch_and_pad


class _Tokenize:
    """Document dict -> {"tokens": int32[n]} with <eos> appended."""

    def __init__(self, tokenizer, text_key: str):
        self._tok = tokenizer
        self._eos = int(tokenizer.eos_id)
        self._key = text_key

    def __call__(self, doc) -> dict[str, np.ndarray]:
        text = doc[self._key] if isinstance(doc, dict) else doc
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        ids = self._tok.encode(text)
        ids.append(self._eos)
        return {"tokens": np.asarray(ids, dtype=np.int32)}


def _finalize(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    seg = batch["tokens_segment_ids"].astype(np.int32)
    tokens = batch["tokens"].astype(np.int32)
    if pad_id != 0:
        tokens = np.where(seg == 0, np.int32(pad_id), tokens)
    return {"tokens": tokens, "segment_ids": seg}


def _tuples_for_slices(state):
    """JSON turns the packer's (start, stop) slices into lists; its sentinel test `!= (-1, -1)` needs tuples."""
    if isinstance(state, dict):
        return {k: ({f: tuple(v) for f, v in sub.items()} if k == "remainder_slices" else _tuples_for_slices(sub))
                for k, sub in state.items()}
    return state


class _JsonStateIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_tuples_for_slices(state))


class _JsonStateIterDataset(grain.IterDataset):
    """Makes set_state accept a state that went through JSON (as grain's and Orbax's checkpoint handlers do)."""

    def __iter__(self) -> grain.DatasetIterator:
        return _JsonStateIterator(self._parent.__iter__())


def packed_dataset(source: Sequence[Any], tokenizer, *, seq_len: int, batch_size: int, seed: int = 0,
                   shuffle: bool = True, num_epochs: int | None = None, shard_index: int | None = None,
                   shard_count: int | None = None, text_key: str = "text", num_threads: int = 1,
                   prefetch_buffer_size: int = 32) -> grain.IterDataset:
    """Packed, batched token rows from a random-access document source.

    source: len() + [i] -> a dict with `text_key` (str or bytes) or a plain str; e.g. `load_split(dir, "train")`.
    tokenizer: anything with encode(str) -> list[int], eos_id and pad_id (see specdiff_jax.tokenizer).
    num_epochs: None repeats forever. shard_index / shard_count default to jax.process_index() /
      jax.process_count(); each shard reads a disjoint subset of documents (every shard_count-th).
    num_threads / prefetch_buffer_size: grain read threads tokenising ahead (kept small: CPUs are shared).
    Returns a grain IterDataset whose elements are {"tokens": int32[batch_size, seq_len],
      "segment_ids": int32[batch_size, seq_len]}; `iter(ds)` has get_state() / set_state().
    """
    for name, v in (("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"packed_dataset: {name}={v!r} is invalid: must be a positive integer")
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs <= 0):
        raise ValueError(f"packed_dataset: num_epochs={num_epochs!r} is invalid: a positive integer, or None "
                         f"to repeat forever")
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"packed_dataset: shard_index={shard_index} is invalid for shard_count={shard_count}: "
                         f"need 0 <= shard_index < shard_count")
    n = len(source)
    if n < shard_count:
        raise ValueError(f"packed_dataset: the source has {n} document(s), fewer than shard_count={shard_count}: "
                         f"every shard needs at least one; use a larger corpus or fewer processes")
    if getattr(tokenizer, "eos_id", None) is None:
        raise ValueError(f"packed_dataset: tokenizer {tokenizer!r} has no eos_id, which separates documents")

    ds = grain.MapDataset.source(source)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds.map(_Tokenize(tokenizer, text_key))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
    it = ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len})
    it = it.map(lambda r: {"tokens": r["tokens"], "tokens_segment_ids": r["tokens_segment_ids"]})
    it = it.batch(batch_size, batch_fn=functools.partial(batch_and_pad, batch_size=batch_size, pad_value=0))
    it = it.map(functools.partial(_finalize, pad_id=int(tokenizer.pad_id)))
    return _JsonStateIterDataset(it)
