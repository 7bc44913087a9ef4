"""The drafter per decoding temperature: the manifest lookup (`specdiff_jax.assets`), the planner's choice among
tagged candidates, eval.generate / the benchmark using it when no drafter is named, and the manifest's per-drafter
fields written by scripts/write_manifest.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from flax import nnx

from specdiff_jax import assets
from specdiff_jax.model import Transformer
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent


def _manifest(tmp_path: Path, served: dict[str, float | None]) -> Path:
    models = {name: {"path": f"assets/tiny/{name}", **({} if t is None else {"serves_temperature": t})}
              for name, t in served.items()}
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"models": models}))
    return tmp_path


def test_drafter_for_temperature_takes_the_nearest_served_temperature(tmp_path):
    d = _manifest(tmp_path, {"verifier": None, "drafter_base": None, "drafter_streak_t0": 0.0,
                             "drafter_streak_t1": 1.0})
    assert assets.drafters_by_temperature(d) == {0.0: d / "drafter_streak_t0", 1.0: d / "drafter_streak_t1"}
    assert assets.drafter_for_temperature(0.0, d) == d / "drafter_streak_t0"
    assert assets.drafter_for_temperature(1.0, d) == d / "drafter_streak_t1"
    assert assets.drafter_for_temperature(0.3, d) == d / "drafter_streak_t0"
    assert assets.drafter_for_temperature(0.5, d) == d / "drafter_streak_t1"  # a tie goes to the higher one
    assert assets.drafter_for_temperature(1.7, d) == d / "drafter_streak_t1"


def test_drafter_for_temperature_refuses_what_it_cannot_answer(tmp_path):
    with pytest.raises(FileNotFoundError, match="MANIFEST.json"):
        assets.drafter_for_temperature(0.0, tmp_path)
    d = _manifest(tmp_path, {"drafter_base": None})
    with pytest.raises(FileNotFoundError, match="serves_temperature"):
        assets.drafter_for_temperature(0.0, d)
    with pytest.raises(Exception, match="temperature"):
        assets.drafter_for_temperature(-1.0, d)


def test_planner_profiles_the_candidate_tagged_for_the_temperature():
    cfg = tiny_config(attention="block_causal", mask_token_id=3)
    t0, t1, plain = (Transformer(cfg, rngs=nnx.Rngs(i)) for i in range(3))
    assets.tag(t0, 0.0)
    assets.tag(t1, 1.0)
    assert assets.pick_for_temperature([t1, t0], 0.0) is t0
    assert assets.pick_for_temperature([t0, t1], 1.0) is t1
    assert assets.pick_for_temperature([plain, t1], 0.0) is t1  # tagged drafters win over untagged ones
    assert assets.pick_for_temperature([plain, Transformer(cfg, rngs=nnx.Rngs(4))], 0.0) is plain  # else the first
    # the tag survives split/merge (the kernel works on split states)
    g, s = nnx.split(t0)
    assert nnx.merge(g, s).serves_temperature == 0.0


def test_embedded_candidates_only_for_the_embedded_verifier_architecture(tmp_path):
    other = Transformer(tiny_config(), rngs=nnx.Rngs(0))
    assert assets.embedded_candidates(other, 0.0) == []  # a different verifier never gets the embedded drafters
    assert assets.embedded_candidates(other, 0.0, tmp_path) == []  # no manifest: none


def _write_manifest_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import write_manifest
    finally:
        sys.path.pop(0)
    return write_manifest


def test_write_manifest_serving_fields_come_from_the_report_row():
    wm = _write_manifest_module()
    assert wm.parse_serve(["0=drafter_streak_t0", "1=runs_t1"]) == {0.0: "drafter_streak_t0", 1.0: "runs_t1"}
    with pytest.raises(SystemExit, match="TEMPERATURE=RUN"):
        wm.parse_serve(["zero=x"])
    assert (wm.asset_name(0.0), wm.asset_name(1.0), wm.asset_name(0.5)) == \
        ("drafter_streak_t0", "drafter_streak_t1", "drafter_streak_t0p5")
    report = {"kernel": [
        {"drafter": "streak_t0", "draft_temperature": 1.0, "tokens_per_verifier_call": 9.0, "tau_ci95": [8, 10]},
        {"drafter": "streak_t0", "draft_temperature": 0.0, "tokens_per_verifier_call": 4.0, "tau_ci95": [3.5, 4.5],
         "prompts": 96, "gamma": 16, "alpha": [0.5]},
        {"drafter": "streak_t1", "draft_temperature": 1.0, "tokens_per_verifier_call": 2.0, "tau_ci95": [1.9, 2.1]}]}
    f0 = wm.serving_fields("drafter_streak_t0", 0.0, {"data": {"dataset": "/nonexistent"}}, report)
    assert f0["serves_temperature"] == 0.0
    assert f0["calibration_report"]["tau"] == 4.0 and f0["calibration_report"]["tau_ci95"] == [3.5, 4.5]
    assert f0["calibration_report"]["draft_temperature"] == 0.0 and f0["calibration_data"]["sampling"] is None
    f1 = wm.serving_fields("drafter_streak_t1", 1.0, None, report)
    assert f1["calibration_report"]["tau"] == 2.0
    assert wm.serving_fields("drafter_streak_t1", 1.0, None, None)["calibration_report"] is None


def test_auto_plan_profiles_only_the_drafter_serving_the_run_temperature(monkeypatch):
    """planner.plan with two tagged block drafters measures acceptance of the one serving the temperature."""
    from specdiff_jax.decode import planner
    from tests.test_planner import cpu_like_cost

    cfg = tiny_config(attention="block_causal", mask_token_id=3)
    t0, t1 = assets.tag(Transformer(cfg, rngs=nnx.Rngs(0)), 0.0), assets.tag(Transformer(cfg, rngs=nnx.Rngs(1)), 1.0)
    seen = []

    def fake_profile(verifier, drafter, opt, prompts, **kw):
        seen.append(drafter)
        return [0.9] * kw["gamma"]

    monkeypatch.setattr(planner, "profile", fake_profile)
    v = Transformer(tiny_config(), rngs=nnx.Rngs(2))
    for temp, want in ((0.0, t0), (1.0, t1)):
        seen.clear()
        plan = planner.plan(v, [t1, t0] if temp == 0 else [t0, t1], prompts=[[5, 6, 7]], temperature=temp,
                            cost_model=cpu_like_cost(), max_gamma=8)
        assert seen and all(d is want for d in seen)
        assert plan.drafter is want


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory):
    """A verifier and two tiny drafters, recorded as serving T=0 and T=1 in a MANIFEST.json beside them."""
    from specdiff_jax.checkpoint import save_pretrained

    d = tmp_path_factory.mktemp("served")
    save_pretrained(Transformer(tiny_config(num_layers=2, eos_token_id=1), rngs=nnx.Rngs(0)), d / "verifier")
    for i, name in enumerate(("drafter_streak_t0", "drafter_streak_t1")):
        save_pretrained(Transformer(tiny_config(attention="block_causal", mask_token_id=3, eos_token_id=1,
                                                block_size=4), rngs=nnx.Rngs(10 + i)), d / name)
    _manifest(d, {"verifier": None, "drafter_streak_t0": 0.0, "drafter_streak_t1": 1.0})
    return d


def test_benchmark_by_temperature_loads_the_drafter_serving_each_temperature(served_dir):
    from eval.benchmark import _load_models, load_bench_config
    from specdiff_jax.decode.cost import fingerprint
    from specdiff_jax.hf_checkpoint import load_pretrained

    cfg = load_bench_config("configs/bench/tiny.yaml", [f"verifier={served_dir / 'verifier'}",
                                                        "methods=[ar, specdiff2]", "temperatures=[0.0, 1.0]",
                                                        "sweep_temperatures=[]"])
    assert cfg.specdiff2_drafter == "by_temperature"
    models, notes = _load_models(cfg)
    for t, name in ((0.0, "drafter_streak_t0"), (1.0, "drafter_streak_t1")):
        assert fingerprint(models[("specdiff2", t)]) == fingerprint(load_pretrained(served_dir / name))
        assert models[("specdiff2", t)].serves_temperature == t
        assert any(name in n and f"temperature {t:g}" in n for n in notes), notes


def test_generate_without_a_drafter_uses_the_one_serving_its_temperature(served_dir):
    import argparse

    from eval.generate import _manifest_drafters
    from specdiff_jax.decode.cost import fingerprint
    from specdiff_jax.hf_checkpoint import load_pretrained

    for t, name in ((0.0, "drafter_streak_t0"), (1.0, "drafter_streak_t1"), (0.7, "drafter_streak_t1")):
        args = argparse.Namespace(method="specdiff2", verifier=str(served_dir / "verifier"), temperature=t,
                                  dtype=None)
        [d] = _manifest_drafters(args, None)
        assert fingerprint(d) == fingerprint(load_pretrained(served_dir / name)), (t, name)
    args = argparse.Namespace(method="ar", verifier=str(served_dir / "verifier"), temperature=0.0, dtype=None)
    assert _manifest_drafters(args, None) == []
