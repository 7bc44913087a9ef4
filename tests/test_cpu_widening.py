"""specdiff_jax.cpu_widening: what XLA's CPU compile of a bf16 program holds beyond a TPU, from the compile's dump."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from specdiff_jax.cpu_widening import widening

D, F, B = 256, 512, 64


def _mlp(w1, w2, x):
    h = jnp.einsum("bd,df->bf", x, w1)  # bf16 in, bf16 out: the CPU multiplies in f32
    return jnp.einsum("bf,fd->bd", jax.nn.silu(h), w2)


def _dumped(dtype, tmp_path):
    args = (jax.ShapeDtypeStruct((D, F), dtype), jax.ShapeDtypeStruct((F, D), dtype),
            jax.ShapeDtypeStruct((B, D), dtype))
    jax.jit(_mlp).lower(*args).compile(compiler_options={"xla_dump_to": str(tmp_path)})
    return widening(tmp_path)


def test_bf16_weights_widened_by_the_cpu_count_nothing_at_tpu_sizes(tmp_path):
    """The CPU converts both bf16 weights to f32 for its matmuls (both copies live at its peak); at TPU sizes those
    copies do not exist, so the peak falls by both, and stays above the bf16 weights themselves."""
    r = _dumped(jnp.bfloat16, tmp_path)
    weights = 2 * D * F * 2  # the bf16 arguments, live throughout
    assert r["peak"] >= weights + 2 * D * F * 4, r  # the CPU holds f32 copies beside them
    assert r["excess"] >= 2 * D * F * 4 and r["peak_tpu"] >= weights, r
    assert r["excess"] == r["peak"] - r["peak_tpu"]


def test_an_f32_program_has_nothing_widened(tmp_path):
    r = _dumped(jnp.float32, tmp_path)
    assert r["excess"] == 0 and r["peak"] >= 2 * D * F * 4, r


def test_a_directory_without_one_dump_is_refused(tmp_path):
    with pytest.raises(ValueError, match="one compile's dump"):
        widening(tmp_path)
