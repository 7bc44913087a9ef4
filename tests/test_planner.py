"""The cost model, the `auto` planner and adaptive gamma.

The planner must fall back to `ar` for a drafter that is never accepted and speculate with one that always is;
`auto` and adaptive gamma are exactly lossless (greedy output equals `ar` token for token); the cost model's disk
cache is keyed so that another device or another model never reuses it.
"""

import dataclasses

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


def _one_position(r1: float, rounds: int) -> list:
    return [(OPT, "block", planner.Rates([r1], rounds))]  # gamma 1 only: t = 1.13 + 0.23 + 0.3 ms, ar 1.3 ms


def test_choose_keeps_ar_when_the_gain_is_inside_the_cost_models_error():
    """E = 1.37 tokens per 1.66 ms round against 1 per 1.3 ms: +7.3% predicted, measured on many rounds."""
    cm = dataclasses.replace(cpu_like_cost(), error=0.12)
    best, table = planner.choose(cm, _one_position(0.37, 10**6), batch=1, max_gamma=16)
    spec = table[1]
    assert spec["gain"] == pytest.approx(1.37 / 1.66 * 1.3 - 1.0) and spec["gain"] > 0.07
    assert best["method"] == "ar" and "< margin 12%" in best["reason"] and "+7%" in best["reason"]
    best, _ = planner.choose(dataclasses.replace(cm, error=0.05), _one_position(0.37, 10**6), batch=1, max_gamma=16)
    assert best["method"] == "specdiff2" and "> margin 5%" in best["reason"]
    best, _ = planner.choose(cm, _one_position(0.37, 10**6), batch=1, max_gamma=16, margin=0.0)
    assert best["method"] == "specdiff2"  # an explicit margin overrides the cost model's


def test_choose_discounts_acceptance_measured_on_few_rounds():
    """E = 1.5 (+17.5% predicted): on 10 rounds its lower bound 1.5 - 1.645 * sqrt(0.25 / 10) is below ar's
    speed; on 1000 rounds it clears a 5% margin."""
    cm = dataclasses.replace(cpu_like_cost(), error=0.05)
    best, table = planner.choose(cm, _one_position(0.5, 10), batch=1, max_gamma=16)
    assert table[1]["expected_tokens_low"] == pytest.approx(1.5 - 1.645 * np.sqrt(0.25 / 10))
    assert best["method"] == "ar" and table[1]["gain"] > 0.15 and table[1]["gain_low"] < 0
    best, _ = planner.choose(cm, _one_position(0.5, 1000), batch=1, max_gamma=16)
    assert best["method"] == "specdiff2"


def test_expected_tokens_low_is_the_histograms_standard_error():
    """The bound from P(n >= j) alone equals mean - z * std / sqrt(rounds) of the per-round token counts."""
    hist = np.array([30, 20, 10, 25, 15])  # rounds accepting 0..4 drafts
    n = np.repeat(np.arange(5), hist)
    rate = [float(np.mean(n >= j)) for j in range(1, 5)]
    for g in (1, 2, 4):
        x = 1 + np.minimum(n, g)
        want = x.mean() - 1.645 * x.std() / np.sqrt(len(x))
        assert planner.expected_tokens_low(rate, g, len(x)) == pytest.approx(want)
    assert planner.expected_tokens_low(rate, 4, None) == planner.expected_tokens(rate, 4)  # rounds unknown


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
    monkeypatch.setattr(cost, "_decode_timer", lambda *a, **k: lambda: (2.0 * a[-1], a[-1]))
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


def _fake_decodes(monkeypatch, call=7.0, step=1.5, rest=(0.4, 0.1, 0.05), sampled=(0.2, 0.03), off=None):
    """Decode calls timed in closed form: call + rounds * round, with a round = the modelled forwards + `rest`
    (a, b, c) [+ `sampled` (per round, per AR draft token) at temperature > 0]; `off` scales one (method, gamma, K)."""
    a, b, c = rest

    def fake_call_ms(verifier, drafter, method, gamma, batch, ctx, n=64, *, num_drafts=1, temperature=0.0):
        if method == "ar":
            return call + n * (step + (sampled[0] if temperature > 0 else 0.0)), n
        kind = "ar" if method == "sps" else "block"
        r = (1.0 + 0.1 * (num_drafts * (gamma + 1) - 1)) + _DRAFT_MS[kind](gamma, num_drafts) \
            + a + b * (gamma + 1) + c * (num_drafts - 1) * (gamma + 1)
        if temperature > 0:
            r += sampled[0] + (sampled[1] * gamma if kind == "ar" else 0.0)
        if off and off[0] == (method, gamma, num_drafts):
            r *= off[1]
        return call + 10 * r, 10

    monkeypatch.setattr(cost, "time_forward", lambda m, b_, q, *a_, **k: 1e-3 * (1.0 + 0.1 * (q - 1)))
    monkeypatch.setattr(cost, "_decode_timer", lambda *a_, **k: lambda: fake_call_ms(*a_, **k))


# the drafters' modelled forwards under the fake time_forward (0.1 ms per query above 1 ms)
_DRAFT_MS = {"block": lambda g, k: 1.0 + 0.1 * (2 * g), "ar": lambda g, k: (1.0 + 0.1) + (g - 1) * 1.0}


def test_cost_model_splits_a_call_into_per_call_and_per_step_costs(models, tmp_path, monkeypatch):
    """Closed form: the fit recovers the per-call cost, the fixed part of an ar step (the step less the verifier
    forward), the rest of a round with its K term, and sampling's costs; then it predicts rounds it never timed
    (K = 4 at other gammas) exactly, and its held-out error is the floor."""
    monkeypatch.setenv("SPECDIFF_JAX_CACHE", str(tmp_path))
    call, step, rest, sampled = 7.0, 1.5, (0.4, 0.1, 0.05), (0.2, 0.03)
    _fake_decodes(monkeypatch, call, step, rest, sampled)
    cm = cost.measure(models["v"], {"block": models["block"], "ar": models["v"]}, batch=1, ctx=32)
    assert cm.call_ms == pytest.approx(call) and cm.fixed_ms == pytest.approx(step - 1.0)
    assert cm.overhead["block"] == pytest.approx(rest) and cm.overhead["ar"] == pytest.approx(rest[:2] + (0.0,))
    assert (cm.sampled_round_ms, cm.sampled_draft_ms) == pytest.approx(sampled)
    assert cm.error == pytest.approx(cost.MIN_ERROR)
    a, b, c = rest
    for g, k in ((2, 1), (16, 4), (8, 4), (3, 2)):
        want = (1.0 + 0.1 * (k * (g + 1) - 1)) + _DRAFT_MS["block"](g, k) + a + b * (g + 1) + c * (k - 1) * (g + 1)
        assert cm.round_ms("block", g, k) == pytest.approx(want)
    assert cm.round_ms("none", 0, temperature=1.0) == pytest.approx(step + sampled[0])
    assert cm.round_ms("ar", 4, temperature=1.0, draft_temperature=1.0) == pytest.approx(
        cm.round_ms("ar", 4) + sampled[0] + 4 * sampled[1])
    assert cm.call_ms_per_round(64, 2.0) == pytest.approx(call * 2.0 / 64)


def test_cost_model_error_is_measured_on_held_out_decodes(models, tmp_path, monkeypatch):
    """A held-out decode 20% slower than the fitted model predicts: the model says its error is 20%."""
    monkeypatch.setenv("SPECDIFF_JAX_CACHE", str(tmp_path))
    method, g, k = cost.VALIDATION_POINTS["block"]
    _fake_decodes(monkeypatch, off=((method, g, k), 1.2))
    cm = cost.measure(models["v"], {"block": models["block"]}, batch=1, ctx=32)
    assert cm.error == pytest.approx(1.0 - 1.0 / 1.2)  # modelled / measured - 1


def test_cost_model_slopes_are_never_negative(models, tmp_path, monkeypatch):
    """Noise that makes gamma 8 look cheaper than gamma 2 outside the forwards: the slope is 0, not negative, so
    long drafts are never predicted cheaper than their forwards."""
    monkeypatch.setenv("SPECDIFF_JAX_CACHE", str(tmp_path))
    _fake_decodes(monkeypatch, rest=(2.0, -0.1, 0.05))
    cm = cost.measure(models["v"], {"block": models["block"]}, batch=1, ctx=32)
    a, b, c = cm.overhead["block"]
    assert b == 0.0 and c >= 0.0 and a > 0.0
    assert cm.round_overhead_ms("block", 64, 4) >= cm.round_overhead_ms("block", 2, 1)


def test_cost_model_times_its_decodes_in_turn(monkeypatch):
    """All decodes are compiled before any is timed, then timed one call each in turn (a load change mid-way
    slows every setting alike instead of the ones timed last)."""
    events = []

    def fake_timer(verifier, drafter, method, gamma, *a, **k):
        events.append(("compile", gamma))
        return lambda: events.append(("time", gamma)) or (float(gamma), 1)

    monkeypatch.setattr(cost, "_decode_timer", fake_timer)
    settings = {"x": ("none", "ar", 1, 1, 0.0, 16), "y": ("none", "ar", 2, 1, 0.0, 16)}
    out = cost._time_decodes(None, {}, settings, 1, 64, repeats=3)
    assert events == [("compile", 1), ("compile", 2)] + [("time", 1), ("time", 2)] * 3
    assert out == {"x": (1.0, 1), "y": (2.0, 1)}
