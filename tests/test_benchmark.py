"""Smoke test of the decode benchmark: two prompts, two methods, files and schema, greedy equality with ar."""

import json

import pytest
from flax import nnx

from eval.benchmark import BenchError, load_bench_config, main
from specdiff_jax import ModelConfig, Transformer
from specdiff_jax.checkpoint import save_pretrained
from specdiff_jax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = load_tokenizer("assets/tiny")
    d = tmp_path_factory.mktemp("bench_models")
    base = dict(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, max_seq_len=256,
                hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64)
    save_pretrained(Transformer(ModelConfig(num_layers=2, **base), rngs=nnx.Rngs(0)), d / "verifier")
    save_pretrained(Transformer(ModelConfig(num_layers=1, attention="block_causal", mask_token_id=tok.mask_id,
                                            **base), rngs=nnx.Rngs(1)), d / "drafter_base")
    return d


def test_benchmark_smoke(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDIFF_JAX_CACHE", str(tmp_path / "cache"))  # cost models and acceptance profiles
    out = tmp_path / "out"
    rc = main(["--config", "configs/bench/tiny.yaml", "--out", str(out),
               f"verifier={model_dir / 'verifier'}", f"specdiff_drafter={model_dir / 'drafter_base'}",
               "methods=[ar, specdiff, auto]", "humaneval_prompts=2", "max_prompt_tokens=40", "max_new_tokens=12",
               "temperatures=[0.0]", "repeats=1", "specdiff_gamma=4", "progress_bar=false", "sweep_gamma=[2, 4]",
               "sweep_temperatures=[0.0]", "auto_max_gamma=4", "scaling_batches=[1, 2]", "scaling_prefixes=[16, 32]"])
    assert rc == 0
    for name in ("results.json", "results.md", "config.yaml", "speedup_T0.png", "alpha.png",
                 "acceleration_compute.png"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"config", "hardware", "rows"}
    assert [r["method"] for r in res["rows"]] == ["ar", "specdiff", "auto", "specdiff", "specdiff"]
    assert [r["sweep"] for r in res["rows"]] == [False, False, False, True, True]
    assert [r["gamma"] for r in res["rows"][3:]] == [2, 4]
    for r in res["rows"]:
        assert r["predicted_tokens_per_s"] > 0 and 0 <= r["verify_share"] and 0 <= r["draft_share"]
        assert isinstance(r["temperature"], float) and r["batch"] == 1
        assert r["tokens_per_s"] > 0 and r["speedup_vs_ar"] > 0
        assert r["greedy_matches_ar"] is True
    ar, sd, auto = res["rows"][:3]
    assert auto["plan"]["method"] in ("ar", "specdiff2") and auto["choice"]
    assert {b["method"] for b in res["best_settings"]} == {"ar", "specdiff", "auto"}
    assert "1" in res["cost_models"] or 1 in res["cost_models"]
    assert ar["gamma"] is None and ar["num_drafts"] is None and ar["speedup_vs_ar"] == 1.0
    assert sd["gamma"] == 4 and sd["num_drafts"] == 1 and sd["tokens_per_verifier_call"] >= 1.0
    assert len(sd["alpha"]) == 4 and sum(sd["accepted_hist"]) > 0
    assert any("max_prompt_tokens" in n for n in res["notes"])  # the prompts were cut, and it says so
    assert [(r["batch"], r["prefix"]) for r in res["scaling"]] == [(1, 16), (2, 16), (1, 32)]
    assert all(r["tokens_per_s"] > 0 and r["step_over_forward"] > 0 for r in res["scaling"])
    md = (out / "results.md").read_text()
    assert "| specdiff |" in md and "## The auto planner's choices" in md and "## Cost model" in md


@pytest.mark.parametrize("override, needle", [
    (["gama=4"], "did you mean"),
    (["methods=[specdiff]"], "must include 'ar'"),
    (["methods=[ar, fast]"], "unknown method 'fast'"),
    (["repeats=0"], "repeats"),
])
def test_bad_config(override, needle):
    with pytest.raises(BenchError, match=needle):
        load_bench_config("configs/bench/tiny.yaml", override)


def test_missing_verifier_exits_cleanly(tmp_path, capsys):
    rc = main(["--out", str(tmp_path), "verifier=/nonexistent/verifier", "progress_bar=false"])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
