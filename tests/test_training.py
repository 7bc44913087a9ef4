"""Training loop, objectives and sharding: exact resume, cross-topology restore, divergence, bad input."""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from specdiff_jax import objectives
from specdiff_jax.config import ConfigError
from specdiff_jax.config.run import MeshConfig, load_config
from specdiff_jax.model import Transformer
from specdiff_jax.sharding import logical_to_spec, mesh_shape
from specdiff_jax.training import Hooks, TrainingDiverged, TrainingError, restore_checkpoint, train
from tests.conftest import (B, DRAFTER, L, MASK, POISON, TINY, TINY_MODEL, dataset, make_rows, ov, records,
                            tiny_config, val_batches)

ROOT = Path(__file__).resolve().parent.parent


# --- exact resume -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["mdlm"])
def resumed(request, tmp_path_factory):
    """An uninterrupted run, and the same run SIGTERMed after step 3 and resumed.

    mdlm is the stricter case (its loss depends on the step's RNG as well as params, optimizer and data); the ar
    objective trains in the 8-device and divergence tests.
    """
    cfg = load_config(None, ov(*(DRAFTER if request.param == "mdlm" else [])))
    toks, seg = make_rows()
    full_dir = tmp_path_factory.mktemp(f"full_{request.param}")
    full = train(cfg, full_dir, train_data=dataset(toks, seg), val_batches=val_batches())

    def sigterm_at_3(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    part_dir = tmp_path_factory.mktemp(f"part_{request.param}")
    first = train(cfg, part_dir, train_data=dataset(toks, seg), val_batches=val_batches(),
                  hooks=Hooks(on_step_end=sigterm_at_3))
    first.saved_3 = (part_dir / "checkpoints" / "3").is_dir()
    second = train(cfg, part_dir, train_data=dataset(toks, seg), val_batches=val_batches())
    return cfg, full, first, second, full_dir, part_dir


def test_sigterm_saves_and_resume_is_exact(resumed):
    cfg, full, first, second, _, part_dir = resumed
    assert first.status == "interrupted" and first.step == 3
    assert sorted(first.losses) == [1, 2, 3]
    assert first.saved_3 and first.checkpoint == str(part_dir / "checkpoints" / "3")
    assert second.status == "completed" and sorted(second.losses) == [4, 5, 6]
    for s in (1, 2, 3):
        assert first.losses[s] == full.losses[s]
    for s in (4, 5, 6):  # exact: params, optimizer, step, rng and data position all restored
        assert second.losses[s] == full.losses[s], (s, second.losses[s], full.losses[s])
    assert second.val == full.val
    assert full.losses[6] < full.losses[1]


def test_outputs_of_a_run(resumed):
    cfg, full, _, _, full_dir, _ = resumed
    recs = records(full_dir)
    train_recs = [r for r in recs if "loss" in r]
    val_recs = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in val_recs] == [3, 6]
    assert val_recs[-1]["val_loss"] == pytest.approx(full.val["loss"])
    assert val_recs[-1]["val_bits_per_token"] == pytest.approx(full.val["loss"] / math.log(2))
    assert "tokens_per_s" not in train_recs[0]  # the first step compiles: not a throughput figure
    assert all(r["tokens_per_s"] > 0 and r["step_time"] > 0 for r in train_recs[1:])
    assert list((full_dir / "tb").glob("events.out.tfevents*"))
    # keep=2: only the two newest checkpoints remain
    assert sorted(int(p.name) for p in (full_dir / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6]
    # the resolved config round-trips
    assert load_config(full_dir / "config.yaml") == cfg
    # the export loads and equals the final parameters
    from specdiff_jax import load_pretrained

    m = load_pretrained(full_dir / "export")
    assert m.cfg == cfg.model
    state, data_state, meta = restore_checkpoint(full_dir, cfg)
    assert meta["step"] == 6 and data_state is not None
    exported = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_with_another_model_is_refused_clearly(resumed):
    cfg, _, _, _, full_dir, _ = resumed
    import dataclasses

    other = cfg.replace(model=dataclasses.replace(cfg.model, num_layers=2))
    with pytest.raises(TrainingError, match=r"holds a checkpoint of another run \(model keys num_layers differ\)"):
        train(other, full_dir, train_data=dataset(*make_rows()), val_batches=[])


def test_init_from_an_exported_model(resumed, tmp_path):
    cfg, full, _, _, full_dir, _ = resumed
    import dataclasses

    warm = cfg.replace(train=dataclasses.replace(cfg.train, init_from=str(full_dir / "export")))
    r = train(warm, tmp_path / "warm", train_data=dataset(*make_rows()), val_batches=[])
    assert r.status == "completed" and sorted(r.losses) == [1, 2, 3, 4, 5, 6]
    assert r.losses[1] < full.losses[1] - 0.1  # starts from the trained weights, not a fresh init
    bigger = cfg.replace(model=dataclasses.replace(cfg.model, hidden_size=64),
                         train=dataclasses.replace(cfg.train, init_from=str(full_dir / "export")))
    with pytest.raises(ConfigError, match=r"init_from=.* is a model of another shape .*hidden_size"):
        train(bigger, tmp_path / "bigger", train_data=dataset(*make_rows()), val_batches=[])


# --- cross-topology restore ---------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    import test_training as t
    from specdiff_jax.config.run import load_config
    from specdiff_jax.training import train
    assert jax.device_count() == 8
    cfg = load_config(None, t.ov("train.steps=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                                 "checkpoint.export=false", "data.val_batches=0"))
    toks, seg = t.make_rows()
    r = train(cfg, {workdir!r}, train_data=t.dataset(toks, seg), val_batches=[])
    from specdiff_jax.training import restore_checkpoint
    state, _, _ = restore_checkpoint({workdir!r}, cfg)
    specs = {{jax.tree_util.keystr(p): str(x.sharding.spec) for p, x in jax.tree_util.tree_leaves_with_path(state)}}
    leaves = {{jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}}
    np.savez({out!r}, **leaves)
    import json; open({specs!r}, "w").write(json.dumps(specs))
""")


@pytest.mark.multidevice
def test_checkpoint_from_8_devices_restores_on_1_bit_exact(tmp_path):
    workdir, out, specs = tmp_path / "run", tmp_path / "leaves.npz", tmp_path / "specs.json"
    code = _CHILD.format(tests=str(ROOT / "tests"), workdir=str(workdir), out=str(out), specs=str(specs))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(specs.read_text())
    # the 8-device run really was sharded: fsdp on embed, tensor on heads/mlp/vocab
    assert sharded["['params']['embed_tokens']"] == str(P("tensor", "fsdp"))
    assert sharded["['params']['layers'][0]['mlp']['up_proj']"] == str(P("fsdp", "tensor"))
    assert sharded["['params']['layers'][0]['self_attn']['k_proj']"] == str(P("fsdp", "tensor"))
    cfg = load_config(None, ov("train.steps=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                               "checkpoint.export=false", "data.val_batches=0"))
    one = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    state, _, meta = restore_checkpoint(workdir, cfg, mesh=one)
    assert meta["step"] == 2 and int(state["step"]) == 2
    want = np.load(out)
    got = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}
    assert set(got) == set(want.files)
    for k in want.files:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# --- divergence and bad input -------------------------------------------------------------------------


def test_nan_loss_stops_naming_step_and_last_good_checkpoint(tmp_path, monkeypatch):
    real = objectives.ar_loss

    def poisoned(model, batch, rng=None, **kw):
        loss, m = real(model, batch, rng, **kw)
        bad = jnp.any(batch["tokens"] == POISON)
        loss = jnp.where(bad, jnp.nan, loss)
        return loss, {**m, "loss": loss}

    monkeypatch.setitem(objectives.OBJECTIVES, "ar", poisoned)
    toks, seg = make_rows()
    toks[4 * B: 5 * B, 5] = POISON  # unshuffled: the 5th batch, i.e. step 5
    cfg = load_config(None, ov("train.steps=8", "data.val_batches=0"))
    with pytest.raises(TrainingDiverged) as e:
        train(cfg, tmp_path, train_data=dataset(toks, seg, shuffle=False), val_batches=[])
    msg = str(e.value)
    assert "step 5" in msg and str(tmp_path / "checkpoints" / "4") in msg and "nan" in msg
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    state, _, meta = restore_checkpoint(tmp_path, cfg)
    assert meta["step"] == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    assert not (tmp_path / ".lock").exists()


def test_seq_len_above_max_refused_before_work(tmp_path):
    with pytest.raises(ConfigError, match=r"data.seq_len=128.*max_seq_len=64"):
        load_config(None, ov("data.seq_len=128"))
    cfg = load_config(None, TINY)
    import dataclasses

    bad = cfg.replace(data=dataclasses.replace(cfg.data, seq_len=128))
    with pytest.raises(ConfigError, match="max_seq_len"):
        train(bad, tmp_path / "w", train_data=[], val_batches=[])
    assert not (tmp_path / "w").exists()


def test_busy_workdir_refused(tmp_path):
    (tmp_path / ".lock").write_text(str(os.getppid()))  # a live process that is not us
    with pytest.raises(TrainingError, match="in use by process"):
        train(load_config(None, TINY), tmp_path, train_data=[], val_batches=[])


# --- objectives ---------------------------------------------------------------------------------------


def _drafter_cfg(**kw):
    return tiny_config(**{"attention": "block_causal", "mask_token_id": 63, "block_size": 4, **kw})


def test_mdlm_loss_closed_form():
    # Hand-made logits: loss = sum over masked valid tokens of (-log softmax[target]) / t, over valid tokens.
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    tokens = jnp.array([[0, 1, 2]])
    masked = jnp.array([[True, True, False]])
    t = jnp.array([[0.5, 0.25, 0.9]])
    valid = jnp.array([[True, True, True]])
    loss, n = jax.jit(objectives.mdlm_loss_from_logits)(logits, tokens, masked, t, valid)
    assert int(n) == 3
    np.testing.assert_allclose(float(loss), (math.log(2) / 0.5 + -math.log(0.8) / 0.25) / 3, rtol=1e-6)
    # A zero model predicts uniformly: loss = log(V) * sum_masked(1 / t) / valid tokens, with the drawn noise.
    cfg = _drafter_cfg()
    g, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    zeros = jax.tree.map(jnp.zeros_like, state)
    toks, seg = make_rows(2)
    batch = {"tokens": jnp.asarray(toks % 63), "segment_ids": jnp.asarray(seg)}
    rng = jax.random.PRNGKey(5)

    @jax.jit
    def run(s, batch, rng):
        loss, m = objectives.mdlm_loss(nnx.merge(g, s), batch, rng)
        nz = objectives.mdlm_noise(rng, batch["tokens"], batch["segment_ids"], mask_id=63, block_size=4)
        return loss, m, nz

    loss, m, nz = run(zeros, batch, rng)
    w = np.where(np.asarray(nz["masked"]), 1 / np.asarray(nz["t"]), 0).sum()
    assert w > 0
    np.testing.assert_allclose(float(loss), math.log(64) * w / int((seg != 0).sum()), rtol=1e-5)
    assert int(m["tokens"]) == int((seg != 0).sum())


def test_mdlm_noise_structure():
    toks, seg = make_rows(8)
    noise = jax.jit(objectives.mdlm_noise, static_argnames=("mask_id", "block_size", "t_min"))
    nz = noise(jax.random.PRNGKey(0), jnp.asarray(toks), jnp.asarray(seg), mask_id=MASK, block_size=8, t_min=1e-3)
    block, t, masked, noisy = (np.asarray(nz[k]) for k in ("block", "t", "masked", "noisy"))
    for b in range(8):  # blocks are runs of <= 8 positions with one rate each; the first may be cut by the shift
        ids, counts = np.unique(block[b], return_counts=True)
        assert (counts[1:-1] == 8).all() and counts.max() <= 8
        for i in ids:
            assert len(np.unique(t[b][block[b] == i])) == 1
    assert not masked[seg == 0].any()
    assert (noisy[masked] == MASK).all() and (noisy[~masked] == toks[~masked]).all()
    # stratified rates: the B * num_blocks rates are one per stratum of [t_min, 1]
    rates = np.unique(np.round(t, 7))
    n = 8 * ((L - 1 + 7) // 8 + 1)
    strata = np.floor((rates - 1e-3) / (1 - 1e-3) * n).astype(int)
    assert len(set(strata)) == len(strata)


def test_mdlm_two_stream_equals_inference_layout():
    """Every block's logits equal the inference call m([clean prefix ; noisy block], prefix_len=p)."""
    cfg = _drafter_cfg(num_layers=2)
    g, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(1)))
    T = 10
    toks = jax.random.randint(jax.random.PRNGKey(1), (1, T), 0, 63)
    seg = jnp.ones((1, T), jnp.int32)

    @jax.jit
    def two_stream(s, toks, seg):
        rng = jax.random.PRNGKey(2)
        nz = objectives.mdlm_noise(rng, toks, seg, mask_id=63, block_size=4)
        pos, mask = objectives.two_stream_layout(seg, nz["block"], document_masking=False)
        logits, _, _ = nnx.merge(g, s).forward(jnp.concatenate([toks, nz["noisy"]], 1), pos, mask)
        # mdlm_loss takes its logits without the clean half's LM head: the same numbers
        want, _ = objectives.mdlm_loss_from_logits(logits[:, T:], toks, nz["masked"], nz["t"], seg != 0)
        got, _ = objectives.mdlm_loss(nnx.merge(g, s), {"tokens": toks, "segment_ids": seg}, rng,
                                      document_masking=False)
        return logits[:, T:], nz, want, got

    @functools.partial(jax.jit, static_argnums=2)
    def inference(s, x, p):
        return nnx.merge(g, s)(x, prefix_len=p)

    logits, nz, want, got = two_stream(state, toks, seg)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    checked = 0
    for b in range(1):
        blk = np.asarray(nz["block"][b])
        for k in np.unique(blk):
            idx = np.where(blk == k)[0]
            p, e = int(idx[0]), int(idx[-1]) + 1
            ref = inference(state, jnp.concatenate([toks[b:b + 1, :p], nz["noisy"][b:b + 1, p:e]], 1), p)
            np.testing.assert_allclose(np.asarray(logits[b, p:e]), np.asarray(ref[0, p:e]), atol=1e-5)
            checked += 1
    assert checked >= 3


def test_ar_document_masking_equals_separate_documents():
    cfg = tiny_config()
    g, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(3)))
    a = jax.random.randint(jax.random.PRNGKey(0), (1, 8), 0, 64)
    b = jax.random.randint(jax.random.PRNGKey(1), (1, 8), 0, 64)
    packed = {"tokens": jnp.concatenate([a, b[:, :5], jnp.zeros((1, 3), jnp.int32)], 1),
              "segment_ids": jnp.array([[1] * 8 + [2] * 5 + [0] * 3])}
    loss, met = jax.jit(lambda s, x: objectives.ar_loss(nnx.merge(g, s), x))(state, packed)
    assert int(met["tokens"]) == 7 + 4

    @jax.jit
    def nll(s, x):  # per-position next-token nll of a document decoded alone from position 0
        lp = jax.nn.log_softmax(nnx.merge(g, s)(x)[:, :-1])
        return -jnp.take_along_axis(lp, x[:, 1:, None], -1)[..., 0]

    want = (nll(state, a).sum() + nll(state, b)[:, :4].sum()) / 11
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)


def test_gradient_accumulation_equals_one_big_batch():
    from specdiff_jax.config.run import TrainConfig
    from specdiff_jax.training import lr_schedule, make_optimizer, make_train_step

    cfg = _drafter_cfg(attention="causal", mask_token_id=None)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    g = nnx.graphdef(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tc = TrainConfig(steps=10, warmup_steps=0, lr=1e-2)
    tx = make_optimizer(tc)
    ar = objectives.Objective("ar", functools.partial(objectives.ar_loss, document_masking=True))
    step = jax.jit(make_train_step(g, ar, tx, lr_schedule(tc)))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0), "rng": jax.random.PRNGKey(0)}
    toks, seg = make_rows(4)  # every row has the same number of targets: the mean of means is the mean
    toks = toks % 64
    one, m1 = step(state, {"tokens": toks[None], "segment_ids": seg[None]})
    two, m2 = step(state, {"tokens": toks.reshape(2, 2, L), "segment_ids": seg.reshape(2, 2, L)})
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
    assert int(m1["tokens"]) == int(m2["tokens"])
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    # Adam's first update is about lr * sign(g): summation-order noise shows only where g is ~0
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(two["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(params)))
    assert moved > 1e-3  # the update happened


# --- sharding rules -----------------------------------------------------------------------------------


def test_logical_specs_and_divisibility_fallback():
    rules = MeshConfig().logical_axis_rules
    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    assert logical_to_spec(("vocab", "embed"), rules, mesh, (256, 32)) == P("tensor", "fsdp")
    assert logical_to_spec(("vocab", "embed"), rules, mesh, (255, 32)) == P(None, "fsdp")  # 255 % 2: replicate
    assert logical_to_spec(("norm",), rules, mesh, (32,)) == P(None)
    assert logical_to_spec(("batch", "length"), rules, mesh, (8, 16)) == P(("data", "fsdp"), None)
    assert logical_to_spec(("batch", "length"), rules, mesh, (6, 16)) == P(None, None)
    one = AbstractMesh((1, 1, 1), ("data", "fsdp", "tensor"))
    assert logical_to_spec(("vocab", "embed"), rules, one, (256, 32)) == P(None, None)
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="needs 8 devices but 4"):
        mesh_shape(MeshConfig(data=2, fsdp=2, tensor=2), 4)


# --- the command-line program -------------------------------------------------------------------------

CLI_TINY = [f"model.{k}={v}" for k, v in TINY_MODEL.items() if k != "vocab_size"] + [
    "data.seq_len=32", "data.batch_size=2", "train.steps=2", "train.warmup_steps=1", "train.progress_bar=false",
    "train.eval_every=2", "checkpoint.save_every=2"]


@pytest.mark.parametrize("argv, expected", [
    (["--config", "configs/nope.yaml", "--workdir", "{tmp}/w"], "nope.yaml' does not exist; pass an existing YAML file"),
    (["--config", "configs/models/tiny_verifier.yaml", "--workdir", "{tmp}/w", "train.stepz=3"],
     "unknown config key 'train.stepz' (from command line); did you mean train.steps"),
    (["--config", "configs/models/tiny_verifier.yaml", "--workdir", "{tmp}/w", "data.seq_len=4096"],
     "data.seq_len=4096 is invalid: exceeds the model's max_seq_len=1024"),
    (["--config", "configs/models/tiny_verifier.yaml"], "no work dir: pass --workdir DIR"),
    (["--config", "configs/models/tiny_verifier.yaml", "--workdir", "{tmp}/w", "workdir={tmp}/v"],
     "'workdir' is overridden twice"),
])
def test_cli_bad_input_exits_2_with_one_line(argv, expected, tmp_path, capsys, monkeypatch):
    from train.pretrain import main

    monkeypatch.chdir(ROOT)
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "w").exists()


def test_cli_trains_a_drafter_end_to_end_on_a_fresh_corpus(tmp_path, capsys, monkeypatch):
    """Corpus prepared on first use, real tokenizer and Grain pipeline, mdlm objective, export."""
    from specdiff_jax import load_pretrained
    from train.pretrain import main

    src = tmp_path / "src"
    src.mkdir()
    for i in range(16):
        (src / f"mod_{i}.py").write_text(f"def f_{i}(x):\n    return x * {i} + {i % 3}\n" * (4 + i))
    monkeypatch.chdir(ROOT)
    rc = main(["--config", "configs/models/tiny_drafter.yaml", "--workdir", str(tmp_path / "w"),
               f"data.data_dir={tmp_path / 'data'}", f"data.source_dirs=[{src}]", "data.val_fraction=0.3",
               "data.val_batches=1", *CLI_TINY])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "done: 2 steps, validation loss" in out
    m = load_pretrained(tmp_path / "w" / "export")
    assert m.cfg.attention == "block_causal" and m.cfg.mask_token_id == 3 and m.cfg.vocab_size == 4096
    assert [r["step"] for r in records(tmp_path / "w") if "val_loss" in r] == [2]
