"""Shared tiny models and tiny training runs for the tests.

`tiny_config(**kw)`: the smallest model the tests build (one layer, 2 query heads / 1 kv head of 16 dims, vocabulary
64), with any field replaced. `TINY` (command-line overrides) and `ov(...)` describe a training run of such a model
on `make_rows` data that finishes in seconds; `dataset`, `val_batches` and `records` feed and read such runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import grain
import numpy as np

from specdiff_jax.config import ModelConfig

TINY_MODEL = dict(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                  intermediate_size=64, max_seq_len=64)


def tiny_config(**kw) -> ModelConfig:
    """`TINY_MODEL` with the fields in `kw` replaced."""
    return ModelConfig(**{**TINY_MODEL, **kw})


# --- a tiny training run ---------------------------------------------------------------------------------
B, L, V = 4, 32, 256  # batch rows, row length, vocabulary of the training runs
MASK, POISON = 3, 255  # the drafters' mask id; a token id the data never holds (tests plant it to poison a step)

TINY = [f"model.{k}={v}" for k, v in {**TINY_MODEL, "vocab_size": V}.items()] + [
    "model.eos_token_id=1", "model.pad_token_id=0",
    f"data.seq_len={L}", f"data.batch_size={B}", "data.val_batches=2",
    "train.steps=6", "train.warmup_steps=2", "train.lr=3e-3", "train.log_every=1", "train.eval_every=3",
    "train.progress_bar=false", "checkpoint.save_every=2", "checkpoint.keep=2",
]
DRAFTER = ["model.attention=block_causal", f"model.mask_token_id={MASK}", "model.block_size=8",
           "train.objective=mdlm"]


def ov(*extra: str) -> list[str]:
    """TINY with some keys replaced (the command line refuses a key given twice)."""
    d = dict(x.split("=", 1) for x in TINY)
    d.update(x.split("=", 1) for x in extra)
    return [f"{k}={v}" for k, v in d.items()]


def make_rows(n=48, seed=0):
    """Packed rows with two documents each and a little padding; a learnable pattern (odd = even + 1)."""
    r = np.random.default_rng(seed)
    toks = r.integers(4, V - 2, (n, L)).astype(np.int32)  # < POISON, also after +1
    toks[:, 1::2] = toks[:, 0::2] + 1
    seg = np.ones((n, L), np.int32)
    seg[:, L // 2:] = 2
    seg[:, L - 3:] = 0
    toks[:, L - 3:] = 0
    return toks, seg


def dataset(toks, seg, shuffle=True):
    rows = [{"tokens": toks[i], "segment_ids": seg[i]} for i in range(len(toks))]
    ds = grain.MapDataset.source(rows)
    if shuffle:
        ds = ds.shuffle(seed=7)
    return ds.repeat(None).batch(B).to_iter_dataset()


def val_batches():
    toks, seg = make_rows(2 * B, seed=99)
    return [{"tokens": toks[i:i + B], "segment_ids": seg[i:i + B]} for i in range(0, 2 * B, B)]


def records(workdir):
    """The metrics log of a run: one dict per line of metrics.jsonl."""
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
