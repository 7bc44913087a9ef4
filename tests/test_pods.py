"""Pod ergonomics: calibration data sharded by data.num_shards (not by the process count), mesh settings of the
decode benchmark, and work / data directories through etils.epath (local paths take the same code path as gs://)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from specdiff_jax.config import ConfigError
from specdiff_jax.config.run import load_config

ROOT = Path(__file__).resolve().parent.parent
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


# --- the benchmark's mesh settings -----------------------------------------------------------------------
_BENCH_MESH = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    import jax
    from eval import benchmark as bm
    from specdiff_jax import load_pretrained
    assert jax.device_count() == 8
    models = {"verifier": load_pretrained("assets/tiny/verifier"),
              "specdiff": load_pretrained("assets/tiny/drafter_base")}
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    out = {}
    for mesh in ("[]", "[-1,4,2]"):
        cfg = bm.load_bench_config(None, [f"mesh={mesh}", "max_new_tokens=16", "methods=[ar,specdiff]"])
        dec = bm._decoder({"method": "specdiff", "temperature": 0.0, "settings": {"gamma": 4}}, models, cfg, 1)
        sh = dec._vstate["layers"][0]["self_attn"]["q_proj"].get_value().sharding
        out[mesh] = {"tokens": dec(prompts).tokens.tolist(), "spec": str(getattr(sh, "spec", None)),
                     "mesh": dict(dec._placement[0].shape) if dec._placement else None}
    open(sys.argv[1], "w").write(json.dumps(out))
""")


@pytest.mark.multidevice
def test_benchmark_mesh_settings_shard_the_decoder_on_8_devices(tmp_path):
    """bench.mesh=[data, fsdp, tensor] reaches the Decoder's sharded decoding (parameters split by their logical
    axes on 8 fake CPU devices); greedy tokens equal the unsharded kernel's (itself tested equal to AR greedy)."""
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-c", _BENCH_MESH, str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["[]"]["mesh"] is None and r["[-1,4,2]"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert r["[-1,4,2]"]["spec"] == "P('fsdp', 'tensor')"  # split over fsdp and tensor
    assert r["[]"]["tokens"] == r["[-1,4,2]"]["tokens"]


_GEN_MESH = textwrap.dedent("""
    import json, os, sys, types
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    from pathlib import Path
    import jax, numpy as np
    from specdiff_jax import load_pretrained
    from specdiff_jax.config.run import load_config
    from specdiff_jax.data import generation as gen
    assert jax.device_count() == 4
    cfg = load_config(None, ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "generate.batch_size=4",
                             "generate.max_new_tokens=8", "generate.temperature=0.0", "generate.progress_bar=false"])
    v = load_pretrained("assets/tiny/verifier")
    prompts = [types.SimpleNamespace(ids=[5 + i, 6, 7 + i]) for i in range(6)]
    rows = [(i, 0) for i in range(6)]
    mesh = gen.decode_mesh(cfg)
    out = {"axes": dict(mesh.shape), "placed": []}
    Decoder = gen.Decoder
    def recording(*a, **k):  # the Decoder the generation builds: where its verifier's parameters live
        dec = Decoder(*a, **k)
        sh = dec._vstate["layers"][0]["self_attn"]["q_proj"].get_value().sharding
        out["placed"].append(len(sh.device_set))
        return dec
    gen.Decoder = recording
    for name, m in (("one", None), ("mesh", mesh)):
        work = Path(sys.argv[1]) / name
        work.mkdir()
        gen._sample_chunks(cfg.generate, v, types.SimpleNamespace(eos_id=None), prompts, rows, work, mesh=m)
        out[name] = {p.name: np.load(p)["tokens"].tolist() for p in sorted(work.glob("chunk_*.npz"))}
    open(Path(sys.argv[1]) / "out.json", "w").write(json.dumps(out))
""")


@pytest.mark.multidevice
def test_data_generation_decodes_on_the_run_mesh(tmp_path):
    """With more than one device, train.generate_data decodes on the run's mesh (the verifier split by its
    logical axes, as its dry run plans); greedy completions equal one device's, chunk by chunk."""
    proc = subprocess.run([sys.executable, "-c", _GEN_MESH, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "out.json").read_text())
    assert r["axes"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert r["placed"] == [1, 4]  # the verifier's weights on one device, then split over the mesh
    assert len(r["one"]) == 2 and r["one"] == r["mesh"]


def test_benchmark_mesh_setting_is_checked():
    from eval.benchmark import BenchError, load_bench_config

    for bad in ("[1,2]", "[0,1,1]", "[-1,-1,2]"):
        with pytest.raises(BenchError, match=r"mesh=.*\[data, fsdp, tensor\]"):
            load_bench_config(None, [f"mesh={bad}"])


# --- remote work dirs: every project path through etils.epath -----------------------------------------------
@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
    """`gs://bucket/...` served from a local directory through etils.epath's backend mock: epath calls reach the
    files, while the builtin open() or pathlib on such a path would write under a local `gs:` directory (the test
    runs in an empty cwd and checks none appears)."""
    from etils.epath import testing

    root = tmp_path / "bucket"
    root.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def remap(p):
        s = str(p)
        return str(root / s[len("gs://bucket/"):]) if s.startswith("gs://bucket/") else s

    def fwd(fn, path, *a, **k):
        return fn(remap(path), *a, **k)

    def two(fn, src, dst, *a, **k):
        return fn(remap(src), remap(dst), *a, **k)

    ops = {n: fwd for n in ("exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rmtree",
                            "stat", "walk")}
    with testing.mock_epath(**ops, copy=two, rename=two, replace=two):
        yield root
    assert not any(cwd.iterdir()), f"a path reached the local file system as text: {list(cwd.iterdir())}"


def test_work_dir_files_go_through_epath_on_a_gs_path(fake_bucket):
    """The project's own files of a work dir and a model dir (lock, metrics log, resolved config, evaluation JSON,
    model config and metadata) on `gs://bucket/run`: written and read back through etils.epath only."""
    from specdiff_jax import rundir
    from specdiff_jax.checkpoint import load_metadata
    from specdiff_jax.config import ModelConfig
    from specdiff_jax.config.run import save_config
    from tests.conftest import tiny_config

    run = rundir.as_path("gs://bucket/run")
    run.mkdir(parents=True)
    with rundir.WorkdirLock("gs://bucket/run"):
        assert (fake_bucket / "run" / rundir.LOCK_FILE).read_text().strip().isdigit()
    assert not (fake_bucket / "run" / rundir.LOCK_FILE).exists()
    log = rundir.MetricsLog(run, tensorboard=False)  # TensorBoard's writer has its own gs:// client
    log.write(1, {"loss": 2.0}, "")
    log.write(2, {"loss": 1.5}, "")
    again = rundir.MetricsLog("gs://bucket/run", tensorboard=False)  # a resumed run continues the remote log
    again.write(3, {"loss": 1.0}, "val_")
    lines = (fake_bucket / "run" / rundir.METRICS_FILE).read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3] and "val_loss" in lines[2]
    assert not rundir.has_checkpoint("gs://bucket/run")
    save_config(load_config(None, [f"data.tokenizer={ROOT / 'assets/tiny'}"]), "gs://bucket/run/config.yaml")
    assert (fake_bucket / "run" / "config.yaml").read_text().startswith("# Resolved run configuration")
    rundir.write_json("gs://bucket/run", "calibration_eval.json", {"a": 1})
    assert json.loads((fake_bucket / "run" / "calibration_eval.json").read_text()) == {"a": 1}
    cfg = tiny_config()
    rundir.as_path("gs://bucket/model").mkdir()
    cfg.save("gs://bucket/model/model_config.json")
    assert ModelConfig.load("gs://bucket/model/model_config.json") == cfg
    (fake_bucket / "model" / "metadata.json").write_text('{"step": 7}')
    assert load_metadata("gs://bucket/model") == {"step": 7}
