"""LoRA fine-tuning: the adapter math against its closed form, and a LoRA run of the training loop (frozen base,
adapter-only optimizer state, merged export, exact resume, clear refusals)."""

from __future__ import annotations

import dataclasses
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from specdiff_jax import lora
from specdiff_jax.config import ConfigError
from specdiff_jax.config.run import load_config
from specdiff_jax.training import Hooks, TrainingError, restore_checkpoint, train
from tests.conftest import dataset, make_rows, ov, val_batches

RANK, ALPHA = 2, 4.0


def test_merge_matches_the_closed_form():
    r = np.random.default_rng(0)
    params = {"embed_tokens": r.normal(size=(10, 8)).astype(np.float32),
              "layers": {0: {"self_attn": {"q_proj": r.normal(size=(8, 6)).astype(np.float32),
                                           "q_bias": r.normal(size=(6,)).astype(np.float32)},
                             "mlp": {"down_proj": r.normal(size=(5, 8)).astype(np.float32)}}}}
    ad = lora.init(jax.random.PRNGKey(0), params, ["q_proj", "down_proj"], RANK)
    assert set(ad["layers"][0]["self_attn"]["q_proj"]) == {"a", "b"}
    assert ad["layers"][0]["self_attn"]["q_proj"]["a"].shape == (8, RANK)
    assert ad["layers"][0]["mlp"]["down_proj"]["b"].shape == (RANK, 8)
    fresh = lora.merge(params, ad, 3.0)  # B = 0: the model is unchanged
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    ad = jax.tree.map(lambda x: r.normal(size=x.shape).astype(np.float32), ad)
    m = lora.merge(params, ad, 3.0)
    q = ad["layers"][0]["self_attn"]["q_proj"]
    np.testing.assert_allclose(m["layers"][0]["self_attn"]["q_proj"],
                               params["layers"][0]["self_attn"]["q_proj"] + 3.0 * q["a"] @ q["b"], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(m["embed_tokens"], params["embed_tokens"])
    np.testing.assert_array_equal(m["layers"][0]["self_attn"]["q_bias"], params["layers"][0]["self_attn"]["q_bias"])
    assert lora.num_params(ad) == 8 * RANK + RANK * 6 + 5 * RANK + RANK * 8
    axes = lora.logical_axes({"layers": {0: {"self_attn": {"q_proj": ("embed", "heads")},
                                             "mlp": {"down_proj": ("mlp", "embed")}}}}, ad)
    assert axes["layers"][0]["self_attn"]["q_proj"] == {"a": ("embed", None), "b": (None, "heads")}


def test_bad_lora_settings_are_refused():
    params = {"q_proj": np.zeros((8, 6), np.float32), "norm": np.ones((8,), np.float32)}
    with pytest.raises(ConfigError, match=r"lora_targets names 'qproj'.*choose among \['q_proj'\]"):
        lora.init(jax.random.PRNGKey(0), params, ["qproj"], 2)
    with pytest.raises(ConfigError, match=r"lora_rank=7 exceeds .*q_proj \(8, 6\)"):
        lora.init(jax.random.PRNGKey(0), params, ["q_proj"], 7)
    with pytest.raises(ConfigError, match=r"train.lora_rank=2 is invalid: LoRA adapts a pre-trained model"):
        load_config(None, ov("train.lora_rank=2"))
    with pytest.raises(ConfigError, match=r"train.lora_rank=-1"):
        load_config(None, ov("train.lora_rank=-1"))


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """A base model (full training), then LoRA runs from it: uninterrupted, and SIGTERMed at 3 + resumed."""
    toks, seg = make_rows()
    base_dir = tmp_path_factory.mktemp("base")
    base_cfg = load_config(None, ov("train.steps=4"))
    base = train(base_cfg, base_dir, train_data=dataset(toks, seg), val_batches=val_batches())
    cfg = load_config(None, ov(f"train.init_from={base_dir / 'export'}", f"train.lora_rank={RANK}",
                               f"train.lora_alpha={ALPHA}", "train.lora_targets=[q_proj, v_proj, down_proj, lm_head]",
                               "train.lr=5e-2"))
    full_dir = tmp_path_factory.mktemp("lora_full")
    full = train(cfg, full_dir, train_data=dataset(toks, seg), val_batches=val_batches())

    def sigterm_at_3(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    part_dir = tmp_path_factory.mktemp("lora_part")
    first = train(cfg, part_dir, train_data=dataset(toks, seg), val_batches=val_batches(),
                  hooks=Hooks(on_step_end=sigterm_at_3))
    second = train(cfg, part_dir, train_data=dataset(toks, seg), val_batches=val_batches())
    return cfg, base_dir, full, full_dir, first, second, base


def test_lora_trains_only_the_adapters(lora_runs):
    cfg, base_dir, full, full_dir, _, _, base = lora_runs
    assert full.status == "completed" and full.val["loss"] < base.val["loss"] - 0.01, (full.val, base.val)  # same batches
    state, _, meta = restore_checkpoint(full_dir, cfg)
    assert meta["lora"] == {"rank": RANK, "alpha": ALPHA, "targets": ["q_proj", "v_proj", "down_proj", "lm_head"],
                            "base": str(base_dir / "export")}
    n_adapter = lora.num_params(state["params"])
    d, f, kv = cfg.model.hidden_size, cfg.model.intermediate_size, cfg.model.num_kv_heads * cfg.model.head_dim
    q = cfg.model.num_heads * cfg.model.head_dim
    assert n_adapter == cfg.model.num_layers * RANK * ((d + q) + (d + kv) + (f + d)) + RANK * (d + cfg.model.vocab_size)
    # the optimizer holds two Adam moments of the adapters and nothing of the (much larger) base
    moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim >= 1)
    assert moments == 2 * n_adapter < cfg.model.num_params()


def test_lora_export_is_the_merged_model(lora_runs):
    cfg, base_dir, _, full_dir, _, _, _ = lora_runs
    from specdiff_jax import load_pretrained

    base = nnx.to_pure_dict(nnx.state(load_pretrained(base_dir / "export"), nnx.Param))
    exp = nnx.to_pure_dict(nnx.state(load_pretrained(full_dir / "export"), nnx.Param))
    state, _, _ = restore_checkpoint(full_dir, cfg)
    want = lora.merge(base, jax.device_get(state["params"]), ALPHA / RANK)
    changed = set()
    for (path, a), b, w in zip(jax.tree_util.tree_leaves_with_path(exp), jax.tree.leaves(base),
                               jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-6, atol=1e-6)
        if not np.array_equal(np.asarray(a), np.asarray(b)):
            changed.add(str(path[-1].key))
    assert changed == {"q_proj", "v_proj", "down_proj", "lm_head"}  # everything else is the frozen base, bit for bit


def test_lora_resume_is_exact_and_settings_are_pinned(lora_runs):
    cfg, _, full, full_dir, first, second, _ = lora_runs
    assert first.status == "interrupted" and first.step == 3
    assert second.status == "completed"
    for s in (1, 2, 3):
        assert first.losses[s] == full.losses[s]
    for s in (4, 5, 6):  # adapters, optimizer, rng and data restored; the base reloaded from init_from
        assert second.losses[s] == full.losses[s], (s, second.losses[s], full.losses[s])
    other = cfg.replace(train=dataclasses.replace(cfg.train, lora_rank=4))
    with pytest.raises(TrainingError, match=r"LoRA settings .*'rank': 2.* this run has .*'rank': 4"):
        train(other, full_dir, train_data=dataset(*make_rows()), val_batches=[])
