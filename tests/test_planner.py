"""The cost model, the `auto` planner and adaptive gamma.

The planner must fall back to `ar` for a drafter that is never accepted and speculate with one that always is;
`auto` and adaptive gamma are exactly lossless (greedy output equals `ar` token for token); the cost model's disk
cache is keyed so that another device or another model never reuses it.
"""

import numpy as np
import pytest
from flax import nnx

from specdiff_jax import generate
from specdiff_jax.config import ModelConfig
from specdiff_jax.decode import TRACES, Decoder, cost, planner
from specdiff_jax.model import Transformer
from tests.test_decode import BASE, MASK, PROMPTS4, _biased

N = 24


@pytest.fixture(scope="module")
def models():
    cfg_v = ModelConfig(**BASE)
    cfg_block = ModelConfig(**BASE, attention="block_causal", mask_token_id=MASK)
    return dict(
        v=Transformer(cfg_v, rngs=nnx.Rngs(0)),
        v_agree=_biased(Transformer(cfg_v, rngs=nnx.Rngs(0)), 7, 0.3, 1.0, scale=20.0),
        block=Transformer(cfg_block, rngs=nnx.Rngs(1)),
        block_agree=_biased(Transformer(cfg_block, rngs=nnx.Rngs(1)), 7, 1.0, 5.0),
    )


def cpu_like_cost(verify_slope=0.13, draft=0.2, fixed=0.3) -> cost.CostModel:
    """A synthetic cost model with the shape measured on 2-core CPUs: t(Q) = 1 + slope (Q - 1) ms."""
    qs = cost.VERIFIER_QS
    return cost.CostModel("measured", "test", 1, 64, qs, tuple(1.0 + verify_slope * (q - 1) for q in qs),
                          {"block": cost.DRAFTER_QS}, {"block": tuple(draft * (1 + 0.05 * q) for q in cost.DRAFTER_QS)},
                          fixed)


OPT = dict(method="specdiff2", num_drafts=1, draft_temperature=0.0, acceptance="greedy")


def test_choose_falls_back_to_ar_when_nothing_is_accepted():
    best, table = planner.choose(cpu_like_cost(), [(OPT, "block", [0.0] * 16)], batch=1, max_gamma=16)
    assert best["method"] == "ar"
    assert all(r["predicted_tokens_per_s"] < best["predicted_tokens_per_s"] for r in table if r["method"] != "ar")


def test_choose_speculates_when_everything_is_accepted():
    best, _ = planner.choose(cpu_like_cost(), [(OPT, "block", [1.0] * 16)], batch=1, max_gamma=16)
    assert best["method"] == "specdiff2" and best["gamma"] == 16  # every extra position pays at full acceptance
    assert best["expected_tokens"] == 17.0
    # the same drafter on hardware where verifying is expensive and acceptance moderate: a shorter draft
    rate = list(0.8 ** np.arange(1, 17))
    best, _ = planner.choose(cpu_like_cost(verify_slope=0.5), [(OPT, "block", rate)], batch=1, max_gamma=16)
    assert best["method"] == "specdiff2" and 1 < best["gamma"] < 16


def test_expected_tokens_from_profile():
    rate = [0.9, 0.5, 0.25, 0.0]
    assert planner.expected_tokens(rate, 2) == pytest.approx(2.4)
    assert planner.expected_tokens(rate, 4) == pytest.approx(2.65)


@pytest.mark.parametrize("vname, dname, expect", [("v", "block", "ar"), ("v_agree", "block_agree", "specdiff2")])
def test_auto_plans_and_equals_ar_greedy(models, vname, dname, expect, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDIFF_JAX_CACHE", str(tmp_path))
    v, d = models[vname], models[dname]
    ref = generate(v, PROMPTS4, method="ar", max_new_tokens=N, eos_id=None)
    dec = Decoder(v, [d], method="auto", max_new_tokens=N, eos_id=None, gamma=8, cost_model=cpu_like_cost())
    out = dec(PROMPTS4)
    assert dec.plan.method == expect, dec.plan.describe()
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    assert out.stats["plan"]["method"] == expect
    assert len(list((tmp_path / "acceptance").iterdir())) == len(planner.options("block", 0.0))  # profiles kept


@pytest.mark.parametrize("dname", ["block", "block_agree"])
def test_adaptive_gamma_is_lossless_and_adapts(models, dname):
    v = models["v_agree"]
    ref = generate(v, PROMPTS4, method="ar", max_new_tokens=N, eos_id=None)
    before = TRACES["decode"]
    out = generate(v, PROMPTS4, method="specdiff2", drafter=models[dname], max_new_tokens=N, eos_id=None,
                   gamma=8, adaptive_gamma=[2, 4, 8], draft_temperature=0.0)
    # every block size in one compiled kernel (0 new traces when the other drafter's case compiled this shape)
    assert TRACES["decode"] - before in (0, 1)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    rounds = out.stats["gamma_rounds"]
    assert sum(rounds.values()) == out.stats["verifier_calls"]
    if dname == "block_agree":  # long accepted streaks: the estimate rises and the largest block size is used
        assert rounds[8] > 0, rounds
    else:  # a random drafter: the smallest block size is chosen
        assert rounds[2] > rounds[8], rounds


def test_choose_gamma_follows_the_acceptance_estimate():
    import jax.numpy as jnp

    from specdiff_jax.decode.kernel import choose_gamma
    from specdiff_jax.decode.spec import KernelSpec

    s = KernelSpec(method="specdiff2", rule="greedy", dkind="block", batch=1, bucket=16, max_new=8, gamma=8,
                   num_drafts=1, steps=1, temperature=0.0, top_k=0, top_p=1.0, draft_temperature=0.0, pad=0, vocab=8,
                   v_exclude=(), mask_id=7, logit_shift=False, vcap=32, dcap=32, window=0, gammas=(2, 4, 8),
                   round_costs=(1.25, 1.5, 2.0))
    pick = lambda accepted, judged: int(choose_gamma(s, jnp.asarray([accepted, judged], jnp.float32)))  # noqa: E731
    assert pick(0.0, 10.0) == 0  # nothing accepted: the cheapest round
    assert pick(9.9, 10.0) == 2  # almost everything accepted: the longest draft
    # alpha 0.7: E[tokens] 2.19 / 1.25 = 1.75, 2.77 / 1.5 = 1.85, 3.15 / 2.0 = 1.58 -> gamma 4
    assert pick(7.0, 10.0) == 1


def test_adaptive_gamma_bad_sizes(models):
    from specdiff_jax.decode import DecodeError

    with pytest.raises(DecodeError, match="adaptive_gamma"):
        Decoder(models["v"], models["block"], method="specdiff2", max_new_tokens=N, gamma=8, adaptive_gamma=[2, 4])


def test_cost_model_cache_is_keyed_by_device_and_model(models, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDIFF_JAX_CACHE", str(tmp_path))
    calls = []
    real = cost.time_forward
    monkeypatch.setattr(cost, "time_forward", lambda *a, **k: calls.append(a[2]) or real(*a, reps=2, **k))
    monkeypatch.setattr(cost, "_call_ms", lambda *a: (2.0 * a[-1], a[-1]))
    cm = cost.measure(models["v"], batch=1, ctx=32)
    assert len(calls) == len(cost.VERIFIER_QS) and all(m > 0 for m in cm.verifier_ms)
    cost.measure(models["v"], batch=1, ctx=32)
    assert len(calls) == len(cost.VERIFIER_QS)  # reused from disk
    cost.measure(models["v_agree"], batch=1, ctx=32)  # same shapes, other weights: measured again
    assert len(calls) == 2 * len(cost.VERIFIER_QS)
    monkeypatch.setattr(cost, "device_kind", lambda: "tpu:TPU v5 lite")
    cost.measure(models["v"], batch=1, ctx=32)  # another device: measured again
    assert len(calls) == 3 * len(cost.VERIFIER_QS)
    assert len(list((tmp_path / "cost").glob("*.json"))) == 3
    assert cost.fingerprint(models["v"]) != cost.fingerprint(models["v_agree"])


def test_analytic_cost_model():
    from specdiff_jax.config.run import load_config

    q7 = load_config("configs/models/qwen2.5-7b.yaml").model
    cm = cost.analytic(q7, {"bidir": load_config("configs/models/dream-7b.yaml").model}, accelerator="h200")
    # a 7B forward is bound by reading the weights: 17 queries cost about what one does
    assert cm.verify_ms(17) / cm.verify_ms(1) < 1.1
    assert 2.5 < cm.verify_ms(1) < 4.5  # about 15 GB of bf16 weights over 4.8 TB/s: 3.2 ms
    with pytest.raises(ValueError, match="unknown"):
        cost.analytic(q7, accelerator="tpu-v9")


def test_adaptive_round_costs_come_from_the_cost_model(models):
    cm = cpu_like_cost(verify_slope=0.5)
    dec = Decoder(models["v"], models["block"], method="specdiff2", max_new_tokens=N, gamma=8,
                  adaptive_gamma=[2, 4, 8], cost_model=cm)
    assert dec._round_costs == tuple(cm.round_ms("block", g) for g in (2, 4, 8))
    assert Decoder(models["v"], models["block"], method="specdiff2", max_new_tokens=N, gamma=8,
                   adaptive_gamma=[2, 4, 8])._round_costs == (1.25, 1.5, 2.0)  # no cost model: the CPU-like slope


def test_cost_model_splits_a_call_into_per_call_and_per_step_costs(models, tmp_path, monkeypatch):
    """ar decodes timed as call_ms + rounds * step (closed form): the fit recovers both parts, the fixed part of a
    step is the step less the verifier forward, and speculative rounds are fitted with the call cost taken out."""
    monkeypatch.setenv("SPECDIFF_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(cost, "time_forward", lambda m, b, q, *a, **k: 1e-3 * (1.0 + 0.1 * (q - 1)))
    call, step = 7.0, 1.5
    spec_round = {2: 4.0, 8: 6.0}  # ms per speculative round at gamma 2 and 8, before the call's share

    def fake_call_ms(verifier, drafter, method, gamma, batch, ctx, n=64):
        if method == "ar":
            return call + n * step, n
        rounds = 10
        return call + rounds * spec_round[gamma], rounds

    monkeypatch.setattr(cost, "_call_ms", fake_call_ms)
    cm = cost.measure(models["v"], {"block": models["block"]}, batch=1, ctx=32)
    assert cm.call_ms == pytest.approx(call) and cm.fixed_ms == pytest.approx(step - 1.0)
    for g in (2, 8):  # the fitted round equals the timed round per round, the call's cost excluded
        assert cm.verify_ms(g + 1) + cm.draft_ms("block", g) + cm.round_overhead_ms("block", g + 1) == \
            pytest.approx(spec_round[g])
    assert cm.call_ms_per_round(64, 2.0) == pytest.approx(call * 2.0 / 64)
