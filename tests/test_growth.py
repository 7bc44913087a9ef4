"""Function-preserving growth (specdiff_jax.growth, python -m train.grow): a deeper model's logits equal the
original's exactly, a wider one's to float rounding, the new weights still learn, and bad sizes are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specdiff_jax import growth
from specdiff_jax.checkpoint import load_metadata, save_pretrained
from specdiff_jax.config import ConfigError
from specdiff_jax.hf_checkpoint import load_pretrained
from specdiff_jax.model import Transformer
from tests.conftest import tiny_config
from train import grow as grow_cli

MASK = 3


def trained_like(seed: int = 0, **kw) -> Transformer:
    """A tiny block-causal drafter with every parameter random, norms and biases included (a fresh model has unit
    norms and zero biases, which would hide a growth that mishandles them)."""
    cfg = tiny_config(attention="block_causal", mask_token_id=MASK, block_size=8, **kw)
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    params = growth.params_of(model)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    noisy = [x + 0.3 * np.asarray(jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)]
    nnx.replace_by_pure_dict(state := nnx.state(model, nnx.Param), jax.tree.unflatten(tree, noisy))
    nnx.update(model, state)
    return model


def tokens(cfg, n: int = 24, rows: int = 3) -> jnp.ndarray:
    return jax.random.randint(jax.random.PRNGKey(7), (rows, n), 0, cfg.vocab_size, jnp.int32)


@pytest.mark.parametrize("old,new", [(1, 3), (2, 4), (2, 3)])
def test_deeper_model_has_exactly_the_original_logits(old, new):
    m = trained_like(num_layers=old)
    g = growth.grow_depth(m, new)
    assert g.cfg.num_layers == new and g.cfg.num_params() > m.cfg.num_params()
    x = tokens(m.cfg)
    np.testing.assert_array_equal(np.asarray(g(x)), np.asarray(m(x)))
    np.testing.assert_array_equal(np.asarray(g(x, prefix_len=10)), np.asarray(m(x, prefix_len=10)))
    src, gp = growth.params_of(m)["layers"], growth.params_of(g)["layers"]
    for i, s in enumerate(growth.depth_sources(old, new)):  # copies keep their neighbour's reading weights
        np.testing.assert_array_equal(gp[i]["self_attn"]["q_proj"], src[s]["self_attn"]["q_proj"])
        first = i == growth.depth_sources(old, new).index(s)
        assert np.any(gp[i]["mlp"]["down_proj"] != 0) == first


def test_wider_model_has_the_original_logits_to_float_rounding():
    m = trained_like(num_layers=2, rms_norm_eps=0.1)  # hidden 32, 2 heads of 16, MLP 64; an eps that matters
    g = growth.grow_width(m, 64, 4, 128, seed=1)
    assert (g.cfg.hidden_size, g.cfg.num_heads, g.cfg.num_kv_heads, g.cfg.intermediate_size) == (64, 4, 1, 128)
    assert g.cfg.rms_norm_eps == pytest.approx(0.05)
    x = tokens(m.cfg)
    a, b = np.asarray(g(x)), np.asarray(m(x))
    assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, np.max(np.abs(b)))
    both = growth.grow_width(growth.grow_depth(m, 3), 48, 3, 96)  # depth then width, non-doubling sizes
    np.testing.assert_allclose(np.asarray(both(x)), b, rtol=0, atol=1e-5 * max(1.0, np.max(np.abs(b))))


def test_grown_weights_get_a_gradient():
    """Zero output projections are not a dead end: the loss has a gradient on them at once (deeper) and on the
    weights writing into the new residual dimensions (wider)."""
    m = trained_like(num_layers=1)
    x = tokens(m.cfg)

    def grads(model):
        gd, st = nnx.split(model, nnx.Param)
        f = lambda s: jnp.mean(jax.nn.log_softmax(nnx.merge(gd, s)(x))[..., 5])  # noqa: E731
        return nnx.to_pure_dict(jax.grad(f)(st))

    deep = grads(growth.grow_depth(m, 2))["layers"][1]
    assert np.abs(np.asarray(deep["self_attn"]["o_proj"])).max() > 1e-6
    assert np.abs(np.asarray(deep["mlp"]["down_proj"])).max() > 1e-6
    wide = grads(growth.grow_width(m, 64, 4, 128))["layers"][0]
    assert np.abs(np.asarray(wide["mlp"]["down_proj"])[:, 32:]).max() > 1e-6
    assert np.abs(np.asarray(wide["self_attn"]["o_proj"])[32:, :]).max() > 1e-6  # new heads into old dims


def test_bad_sizes_are_refused():
    m = trained_like(num_layers=2)
    with pytest.raises(ConfigError, match=r"num_layers=1: must be an integer >= the model's 2 layers"):
        growth.grow_depth(m, 1)
    with pytest.raises(ConfigError, match=r"hidden_size=16: must be an integer >= the model's 32"):
        growth.grow_width(m, 16, 2, 64)
    with pytest.raises(ConfigError, match=r"num_heads=3: must be a multiple of the model's num_kv_heads=2"):
        growth.grow_width(trained_like(num_layers=1, num_heads=2, num_kv_heads=2), 64, 3, 64)


def test_grow_cli_writes_a_model_dir_that_loads(tmp_path, capsys):
    m = trained_like(num_layers=1)
    save_pretrained(m, tmp_path / "src", metadata={"step": 5})
    assert grow_cli.main(["--from", str(tmp_path / "src"), "--out", str(tmp_path / "g"), "--num-layers", "2"]) == 0
    g = load_pretrained(tmp_path / "g")
    x = tokens(m.cfg)
    np.testing.assert_array_equal(np.asarray(g(x)), np.asarray(m(x)))
    meta = load_metadata(tmp_path / "g")
    assert meta["growth"]["num_layers"] == 2 and meta["max_abs_logit_change"] == 0.0
    assert meta["source_metadata"] == {"step": 5}
    assert grow_cli.main(["--from", str(tmp_path / "src"), "--out", str(tmp_path / "h")]) == 2
    assert "nothing to grow" in capsys.readouterr().err
