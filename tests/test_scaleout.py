"""Scale-out: mesh shapes (ICI x DCN), multi-process settings, the sharded data stream, 8-device equivalence of the
train step and the decode kernel, and a 2-process run that a single process continues with the same losses."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from specdiff_jax import distributed
from specdiff_jax.config import ConfigError
from specdiff_jax.config.run import MeshConfig, load_config
from specdiff_jax.data import pipeline
from specdiff_jax.data.sharded import ShardedStream
from specdiff_jax.sharding import abstract_mesh, mesh_shape, mesh_shapes

ROOT = Path(__file__).resolve().parent.parent
V, L, B = 256, 32, 8
TINY = [
    f"model.vocab_size={V}", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=4",
    "model.num_kv_heads=2", "model.head_dim=8", "model.intermediate_size=64", "model.max_seq_len=64",
    "model.eos_token_id=1", "model.pad_token_id=0", f"data.seq_len={L}", f"data.batch_size={B}",
    "data.val_batches=0", "train.warmup_steps=0", "train.lr=3e-3", "train.log_every=1", "train.progress_bar=false",
    "checkpoint.export=false",
]


class WordTokenizer:
    """Text of space-separated integers -> those ids (no vocabulary files needed)."""

    eos_id, pad_id, vocab_size = 1, 0, V

    def encode(self, text):
        return [int(t) for t in text.split()]


def documents(n=96):
    """Document i is the token 4 + i repeated 5..27 times: any batch row says which documents it holds."""
    return [{"text": " ".join([str(4 + i)] * (5 + (7 * i) % 23))} for i in range(n)]


def stream(num_shards, process_index=0, process_count=1, batch_size=B, docs=None):
    docs = documents() if docs is None else docs
    return ShardedStream(
        lambda i, n, b: pipeline.packed_dataset(docs, WordTokenizer(), seq_len=L, batch_size=b, seed=3,
                                                shard_index=i, shard_count=n),
        num_shards=num_shards, batch_size=batch_size, process_index=process_index, process_count=process_count)


# --- configuration ------------------------------------------------------------------------------------


def test_mesh_shapes_within_and_across_slices():
    assert mesh_shapes(MeshConfig(data=-1, fsdp=4, tensor=1, dcn_data=2), 16) == ((2, 4, 1), (2, 1, 1))
    assert mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=4, dcn_fsdp=4), 64) == (1, 16, 4)
    with pytest.raises(ConfigError, match="needs 12 devices but 8 are available per slice"):
        mesh_shape(MeshConfig(data=3, fsdp=4, tensor=1, dcn_data=2), 16)
    with pytest.raises(ConfigError, match="ask for 3 slices"):
        mesh_shape(MeshConfig(dcn_data=3), 16)
    m = abstract_mesh(MeshConfig(data=-1, fsdp=8, tensor=4), 256)  # no devices needed
    assert dict(m.shape) == {"data": 8, "fsdp": 8, "tensor": 4}
    with pytest.raises(ConfigError, match=r"mesh.dcn_data=0 is invalid"):
        load_config(None, [*TINY, "mesh.dcn_data=0"])


def test_distributed_settings_from_config_and_environment():
    assert distributed.settings(MeshConfig(), env={}) is None  # one process: nothing to start
    cfg = MeshConfig(coordinator_address="10.0.0.2:1234", num_processes=4, process_id=3)
    assert distributed.settings(cfg, env={}) == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4,
                                                 "process_id": 3}
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed.settings(MeshConfig(), env=env) == {"coordinator_address": "h:1", "num_processes": 2,
                                                           "process_id": 1}
    assert distributed.settings(MeshConfig(), env={"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == {}  # TPU pod: no args
    assert distributed.settings(MeshConfig(), env={"TPU_WORKER_HOSTNAMES": "w0"}) is None  # one host
    assert distributed.settings(MeshConfig(distributed="off"), env=env) is None
    assert distributed.settings(MeshConfig(), env={**env, "SPECDIFF_DISTRIBUTED": "off"}) is None
    with pytest.raises(ConfigError, match="process count or id is not"):
        distributed.settings(MeshConfig(coordinator_address="h:1"), env={})


def test_sharded_stream_is_the_same_global_batches_for_any_process_count():
    one = iter(stream(2))
    parts = [iter(stream(2, p, 2)) for p in range(2)]
    for _ in range(3):
        g = next(one)
        local = [next(it) for it in parts]
        np.testing.assert_array_equal(g["tokens"], np.concatenate([x["tokens"] for x in local]))
        seen = [set(np.unique(x["tokens"])) - {0, 1} for x in local]
        assert seen[0] and seen[1] and not seen[0] & seen[1]  # disjoint documents
    state = one.get_state()
    assert state["num_shards"] == 2 and len(state["shards"]) == 2
    want = [next(one) for _ in range(2)]
    again = iter(stream(2))
    again.set_state(json.loads(json.dumps(state)))
    for w in want:
        np.testing.assert_array_equal(next(again)["tokens"], w["tokens"])
    with pytest.raises(ConfigError, match="resume with data.num_shards=2"):
        iter(stream(4)).set_state(state)
    with pytest.raises(ConfigError, match="multiple of the process count"):
        stream(3, 0, 2)


# --- 8 fake devices: data, fsdp and tensor layouts equal 1 device --------------------------------------

FAST = "--xla_backend_optimization_level=0"  # halves the CPU compile time of these children; same math

_EQUIV = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = {flags!r}
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import Mesh
    sys.path.insert(0, {tests!r})
    from test_scaleout import TINY, B
    from specdiff_jax.config import ModelConfig
    from specdiff_jax.config.run import load_config
    from specdiff_jax.decode import generate
    from specdiff_jax.model import Transformer
    from specdiff_jax import sharding as shd
    from specdiff_jax.training import programs
    assert jax.device_count() == 8

    import time
    T = {{}}
    rows = np.random.default_rng(0).integers(2, 256, (B, 32)).astype(np.int32)  # one batch, repeated
    rows[:, 1::2] = rows[:, 0::2] // 2 + 1
    batch = {{"tokens": rows[None], "segment_ids": np.ones_like(rows)[None]}}  # [A=1, B, L]
    LAYOUTS = {{"1 device": None, "data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (1, 1, 8)}}
    out = {{"loss": {{}}, "tokens": {{}}}}
    for name, shape in LAYOUTS.items():
        mesh = ["mesh.data=-1"] if shape is None else ["mesh.data=%d" % shape[0], "mesh.fsdp=%d" % shape[1],
                                                         "mesh.tensor=%d" % shape[2]]
        cfg = load_config(None, [*TINY, *mesh, "train.steps=2", "checkpoint.save_every=100"])
        t0 = time.time()
        mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1] if shape is None else None)
        prog = programs(cfg, mesh)  # the train step as train() runs it: jitted with in/out shardings
        frozen = (None,) if getattr(prog, "frozen_sh", "absent") is None else ()  # LoRA-era signature
        state, losses = prog.init(), []
        for _ in range(2):
            state, m = prog.train_step(state, jax.device_put(batch, prog.batch_sh), *frozen)
            losses.append(float(m["loss"]))
        out["loss"][name] = losses
        if shape == (1, 8, 1):
            out["fsdp_spec"] = str(state["params"]["layers"][0]["mlp"]["up_proj"].sharding.spec)
        T["train " + name] = round(time.time() - t0, 1)

    def model(cfg, seed):  # sharp random models: argmax ties are far below float error
        g, st = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))
        return nnx.merge(g, jax.tree.map(lambda x: 20.0 * x, st))
    common = dict(vocab_size=256, hidden_size=32, head_dim=8, intermediate_size=64, max_seq_len=128, eos_token_id=1,
                  pad_token_id=0)
    verifier = model(ModelConfig(num_layers=1, num_heads=4, num_kv_heads=2, **common), 0)
    drafter = model(ModelConfig(num_layers=1, num_heads=2, num_kv_heads=1, attention="block_causal",
                                mask_token_id=3, block_size=8, **common), 1)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(4, 256, n).tolist() for n in (5, 9, 3, 12, 7, 6, 10, 4)]
    for name, shape in LAYOUTS.items():
        mesh = None if shape is None else Mesh(np.array(jax.devices()).reshape(shape), ("data", "fsdp", "tensor"))
        t0 = time.time()
        g = generate(verifier, prompts, method="specdiff", drafter=drafter, max_new_tokens=16, gamma=4, mesh=mesh)
        out["tokens"][name] = g.tokens.tolist()
        T["generate " + name] = round(time.time() - t0, 1)
        if shape == (1, 1, 8):  # the parameters really were split
            from specdiff_jax.decode import Decoder
            d = Decoder(verifier, drafter, method="specdiff", max_new_tokens=16, gamma=4, mesh=mesh)
            out["q_spec"] = str(d._vstate["layers"][0]["self_attn"]["q_proj"].get_value().sharding.spec)
    ar = generate(verifier, prompts, method="ar", max_new_tokens=16)
    out["ar_equal"] = ar.tokens.tolist() == out["tokens"]["1 device"]
    out["seconds"] = T
    open({out!r}, "w").write(json.dumps(out))
""")


@pytest.mark.multidevice
def test_8_devices_train_step_and_greedy_generate_equal_1_device(tmp_path):
    out = tmp_path / "out.json"
    code = _EQUIV.format(tests=str(ROOT / "tests"), flags=f"--xla_force_host_platform_device_count=8 {FAST}",
                         out=str(out))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    ref = r["loss"]["1 device"]
    assert ref[1] < ref[0]  # the step updated the parameters
    for name in ("data", "fsdp", "tensor"):
        np.testing.assert_allclose(r["loss"][name], ref, rtol=0, atol=1e-5, err_msg=name)
        assert r["tokens"][name] == r["tokens"]["1 device"], name
    assert r["ar_equal"]  # the speculative kernel is lossless here too: a real comparison, not two empty outputs
    from jax.sharding import PartitionSpec as P

    assert r["q_spec"] == str(P(None, "tensor")) and r["fsdp_spec"] == str(P("fsdp", None))  # really split


# --- 2 processes (loopback coordinator) -> checkpoint -> 1 process continues ---------------------------

_WORKER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from test_scaleout import TINY, stream, Recorder
    from specdiff_jax import distributed
    from specdiff_jax.config.run import load_config
    pid = int(sys.argv[1])
    cfg = load_config(None, [*TINY, *{extra!r}, "mesh.coordinator_address=127.0.0.1:{port}", "mesh.num_processes=2",
                             "mesh.process_id=%d" % pid])
    assert distributed.initialize(cfg.mesh)
    import jax
    assert jax.process_count() == 2 and jax.device_count() == 2 and jax.local_device_count() == 1
    from specdiff_jax.training import train
    rec = Recorder(stream(cfg.data.num_shards, jax.process_index(), jax.process_count()))
    r = train(cfg, {workdir!r}, train_data=rec, val_batches=[])
    open({out!r} + str(pid), "w").write(json.dumps({{"losses": r.losses, "docs": sorted(rec.docs)}}))
""")
MULTI = ["mesh.data=1", "mesh.fsdp=2", "data.num_shards=2", "train.steps=5", "checkpoint.save_every=3",
         "checkpoint.keep=5"]


class Recorder:
    """Wraps a stream; records which documents (token values) this process's batches held."""

    def __init__(self, inner):
        self.inner, self.docs = inner, set()

    def __iter__(self):
        rec = self

        class It:
            def __init__(self):
                self.it = iter(rec.inner)

            def __next__(self):
                b = next(self.it)
                rec.docs.update(int(t) for t in np.unique(b["tokens"]) if t > 1)
                return b

            def get_state(self):
                return self.it.get_state()

            def set_state(self, s):
                self.it.set_state(s)

        return It()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multidevice
def test_two_processes_train_and_one_process_continues_with_the_same_losses(tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "result"
    code = _WORKER.format(tests=str(ROOT / "tests"), extra=MULTI, port=_free_port(), workdir=str(workdir),
                          out=str(out))
    env = {**os.environ, "XLA_FLAGS": FAST, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-2000:] for x in logs)
    res = [json.loads(Path(f"{out}{i}").read_text()) for i in range(2)]
    multi = {int(k): v for k, v in res[0]["losses"].items()}
    assert multi == {int(k): v for k, v in res[1]["losses"].items()} and sorted(multi) == [1, 2, 3, 4, 5]
    docs = [set(r["docs"]) for r in res]
    assert docs[0] and docs[1] and not docs[0] & docs[1]  # sharded by process: no document seen twice
    assert (workdir / "checkpoints" / "3").is_dir()

    # one process, one device: restore the step-3 checkpoint (params sharded over 2 processes) and continue
    cont = tmp_path / "continued"
    shutil.copytree(workdir, cont)
    shutil.rmtree(cont / "checkpoints" / "5")
    from specdiff_jax.training import train

    cfg = load_config(None, [*TINY, "mesh.data=-1", *MULTI[2:]])
    r = train(cfg, cont, train_data=stream(2), val_batches=[], devices=jax.devices()[:1])
    assert sorted(r.losses) == [4, 5]
    np.testing.assert_allclose([r.losses[4], r.losses[5]], [multi[4], multi[5]], rtol=0, atol=1e-5)
    assert abs(multi[4] - multi[3]) > 1e-4  # the curve moves: equal losses are not a coincidence
