"""Pod ergonomics: calibration data sharded by data.num_shards (not by the process count), mesh settings of the
decode benchmark, and work / data directories through etils.epath (local paths take the same code path as gs://)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from specdiff_jax.config import ConfigError
from specdiff_jax.config.run import load_config

SEQ = 8


def _records(n=48):
    """Record i: prompt [4 + i], completion [4 + i] * 3 (any row says which record it is)."""
    return [{"prompt": [4 + i], "completion": [4 + i] * 3} for i in range(n)]


def _calib_stream(num_shards, process_index=0, process_count=1, batch_size=8):
    from specdiff_jax.calibration.run import training_stream

    cfg = load_config(None, [f"data.num_shards={num_shards}", f"data.batch_size={batch_size}",
                             f"data.seq_len={SEQ}", "data.seed=3"])
    return training_stream(cfg, _records(), process_index=process_index, process_count=process_count)


def test_calibration_rows_are_sharded_by_num_shards_and_resume_on_another_process_count():
    """Global batch t is the same whether 1 process reads the 4 shards or 2 processes read 2 each (disjoint
    records); the state saved by the 1-process stream resumes a fresh stream exactly; another num_shards is refused."""
    one = iter(_calib_stream(4))
    parts = [iter(_calib_stream(4, p, 2)) for p in range(2)]
    for _ in range(3):
        g = next(one)
        local = [next(it) for it in parts]
        np.testing.assert_array_equal(g["tokens"], np.concatenate([x["tokens"] for x in local]))
        ids = [set(x["tokens"][:, 0].tolist()) for x in local]
        assert len(ids[0]) == 4 and len(ids[1]) == 4 and not ids[0] & ids[1]
    state = one.get_state()
    assert state["num_shards"] == 4
    want = [next(one) for _ in range(2)]
    again = iter(_calib_stream(4))
    again.set_state(json.loads(json.dumps(state)))
    for w in want:
        np.testing.assert_array_equal(next(again)["tokens"], w["tokens"])
    with pytest.raises(ConfigError, match="resume with data.num_shards=4"):
        iter(_calib_stream(2)).set_state(state)
