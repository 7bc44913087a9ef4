"""The embedded default (assets/tiny/): every model in MANIFEST.json loads, matches its record and the tokenizer,
and the directory stays within its size budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import specdiff_jax

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets" / "tiny"
BUDGET_MB = 60


@pytest.fixture(scope="module")
def manifest():
    return json.loads((ASSETS / "MANIFEST.json").read_text())


def test_assets_fit_the_budget():
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert size <= BUDGET_MB * 2**20, f"assets/tiny is {size / 2**20:.1f} MiB > {BUDGET_MB} MiB"


def test_every_manifest_model_loads_and_matches_its_record(manifest):
    tok = specdiff_jax.load_tokenizer(ASSETS)
    models = manifest["models"]
    assert {"verifier", "drafter_base", "drafter_ar", "drafter_streak"} <= set(models)
    assert any(k in models for k in ("drafter_kd_first", "drafter_kd_window"))
    on_disk = {p.name for p in ASSETS.iterdir() if p.is_dir()}
    assert on_disk == set(models), "every model directory is recorded in MANIFEST.json and vice versa"
    for name, rec in models.items():
        m = specdiff_jax.load_pretrained(ROOT / rec["path"])
        assert m.cfg.num_params() == rec["parameters"], name
        assert (m.cfg.attention, m.cfg.hidden_size, m.cfg.num_layers) == \
            (rec["attention"], rec["hidden_size"], rec["num_layers"]), name
        assert m.cfg.num_sampleable == tok.vocab_size and m.cfg.eos_token_id == tok.eos_id, name
        if name.startswith("drafter") and name != "drafter_ar":
            assert m.cfg.attention == "block_causal" and m.cfg.mask_token_id == tok.mask_id, name
        assert rec["commands"], name
        assert rec["val_loss_nats_per_token"] is not None and rec["training_tokens"] > 0, name
