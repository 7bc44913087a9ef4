"""Dry runs of the 7B-class configs on abstract meshes (no devices, nothing allocated): exact parameter bytes per
device, the fit check and its exit status, and the activation estimate against XLA's own figure."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np
import pytest

from specdiff_jax import dryrun, sharding as shd, training
from specdiff_jax.config.run import NoTokenizer, load_config

ROOT = Path(__file__).resolve().parent.parent
PAIRS = sorted(p.stem for p in (ROOT / "configs" / "pairs").glob("*.yaml"))
MODELS = ["qwen2.5-7b", "qwen2.5-14b", "qwen2.5-72b"]
# parameter counts of the HF checkpoints (embeddings included, untied)
PARAMS = {"qwen2.5-7b": 7.616e9, "qwen2.5-14b": 14.770e9, "qwen2.5-72b": 72.706e9}


def _cfg(path, *overrides):
    return load_config(ROOT / "configs" / path, list(overrides), tokenizer=NoTokenizer())


def _expected_param_bytes(m, n, tensor):
    """bf16 bytes per device: every matrix split over all n devices, RMSNorm scales replicated, q/k/v biases
    split over the tensor axis (they divide it in all these models)."""
    norms = (2 * m.num_layers + 1) * m.hidden_size
    biases = m.num_layers * (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
    return 2 * ((m.num_params() - norms - biases) / n + norms + biases / tensor)


def _row(report, name):
    return next(b for w, b, _ in report.rows if w == name)


def test_the_pairs_are_the_papers_models():
    assert PAIRS == [f"{d}_qwen2.5-{v}" for d in ("diffucoder7b", "dream7b") for v in ("14b", "72b", "7b")]
    for name, n in PARAMS.items():
        m = _cfg(f"models/{name}.yaml").model
        assert abs(m.num_params() / n - 1) < 1e-3, (name, m.num_params())
        assert (m.vocab_size, m.head_dim, m.rope_theta, m.qkv_bias, m.tie_embeddings) == (152064, 128, 1e6, True, False)
    d = _cfg("models/diffucoder-7b.yaml").model
    assert (d.attention, d.logit_shift, d.mask_token_id, d.num_params()) == ("bidirectional", True, 151666,
                                                                              _cfg("models/qwen2.5-7b.yaml").model.num_params())


@pytest.mark.parametrize("pair", PAIRS)
def test_decode_dry_run_of_each_pair_fits_its_slice(pair):
    cfg = _cfg(f"pairs/{pair}.yaml")
    lines = []
    r = dryrun.run(cfg, "decode", out=lines.append)
    assert r.abstract and r.fits and math.prod(r.mesh.values()) == cfg.mesh.num_devices
    n = cfg.mesh.num_devices
    v = dryrun.verifier_config(cfg)
    assert _row(r, "verifier parameters") == _expected_param_bytes(v, n, cfg.mesh.tensor)
    assert _row(r, "drafter parameters") == _expected_param_bytes(cfg.model, n, cfg.mesh.tensor)
    kv = 2 * v.num_layers * cfg.pair.batch_size * (1024 + 1024 + 32) * v.num_kv_heads * v.head_dim * 2
    kv_split = cfg.mesh.tensor if v.num_kv_heads % cfg.mesh.tensor == 0 else 1
    assert _row(r, "verifier KV cache") == kv // kv_split
    assert any("verifier.layers.*.self_attn.q_proj" in line for line in lines[0].splitlines())


@pytest.mark.parametrize("model", MODELS)
def test_train_dry_run_of_each_verifier_on_its_pod(model):
    """Each fits its pod as configured. The 72B config rematerialises and chunks the vocabulary: without remat
    every layer's gathered weights (32.7 GiB) and activations are kept for the backward pass and it does not fit
    (XLA's compiled figure at TPU sizes: 136 GiB; with both, 6.5 GiB)."""
    cfg = _cfg(f"models/{model}.yaml")
    if model == "qwen2.5-72b":
        assert (cfg.train.remat, cfg.train.vocab_chunk) == ("full", 16896)
        with pytest.raises(dryrun.DoesNotFit, match="gathered layer weights|activations"):
            dryrun.run(_cfg(f"models/{model}.yaml", "train.remat=none"), "train", out=lambda s: None)
    r = dryrun.run(cfg, "train", out=lambda s: None)
    n = cfg.mesh.num_devices
    assert r.fits and math.prod(r.mesh.values()) == n
    assert _row(r, "parameters") == _expected_param_bytes(cfg.model, n, cfg.mesh.tensor)
    assert _row(r, "optimizer state (AdamW)") == pytest.approx(2 * _row(r, "parameters"), rel=1e-3)


def test_programs_dry_run_and_refuse_clearly_when_it_does_not_fit(capsys):
    from eval.benchmark import main as bench_main
    from train.pretrain import main as pretrain_main

    mesh = shd.abstract_mesh(_cfg("models/qwen2.5-72b.yaml").mesh, 256)  # the 72B pod: no devices needed
    assert dict(mesh.shape) == {"data": 1, "fsdp": 64, "tensor": 4}
    # the 72B pair on a v5e-8 (8 x 16 GiB): its bf16 verifier alone is 16.9 GiB per device
    rc = bench_main(["--dry-run", "--config", str(ROOT / "configs/pairs/diffucoder7b_qwen2.5-72b.yaml"),
                     "mesh.device_memory_gb=16"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: the decode run needs 19.6") and "verifier parameters" in err
    rc = pretrain_main(["--config", str(ROOT / "configs/models/qwen2.5-7b.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "| layers.*.mlp.up_proj | (3584, 18944) | P('fsdp', None) |" in out
    rc = pretrain_main(["--config", str(ROOT / "configs/models/qwen2.5-7b.yaml"), "--dry-run",
                        "mesh.device_memory_gb=16"])  # 7B training on v5e chips: activations do not fit
    out, err = capsys.readouterr()
    assert rc == 2 and "DOES NOT FIT" in out and "mesh.device_memory_gb=16.00" in err and "activations" in err


@pytest.mark.parametrize("pair", ["dream7b_qwen2.5-7b", "diffucoder7b_qwen2.5-7b"])
def test_calibration_dry_run_of_a_bidirectional_7b_pair_plans_lora_on_a_v5e_8(pair, capsys):
    """The paper's recipe (LoRA streak calibration of the 7B bidirectional drafter) is planned per window as the
    kernel drafts (draft window + gamma tokens each) and fits the pair's 8 x 16 GiB slice."""
    from train.calibrate import main

    rc = main(["--config", str(ROOT / f"configs/pairs/{pair}.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "LoRA adapters (rank 32)" in out and "(draft window + gamma) = 544 queries" in out, out
    assert "device memory 16.00: fits" in out


@pytest.mark.parametrize("pair", ["dream7b_qwen2.5-72b", "diffucoder7b_qwen2.5-72b"])
def test_data_generation_dry_run_of_the_72b_pairs_fits_a_v5p_16(pair, capsys):
    """train.generate_data --dry-run plans the 72B verifier's generate calls (generate.batch_size rows of
    prompt_tokens + max_new_tokens) on the pair's 8-chip v5p-16 slice."""
    from train.generate_data import main

    rc = main(["--config", str(ROOT / f"configs/pairs/{pair}.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "[80, 32, 2048, 8, 128]" in out and "device memory 95.00: fits" in out, out


def test_calibration_dry_run_of_a_causal_model_is_refused_naming_why(capsys):
    from train.calibrate import main

    rc = main(["--config", str(ROOT / "configs/models/qwen2.5-7b.yaml"), "--dry-run", "train.objective=calibrate"])
    assert rc == 2 and "diffusion drafter with a mask token" in capsys.readouterr().err


def test_activation_estimate_is_within_a_factor_of_xla():
    """The training activation formula against XLA's temporary allocation for the same step on this CPU."""
    cfg = load_config(None, ["model.vocab_size=256", "model.hidden_size=128", "model.num_layers=2",
                             "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=32",
                             "model.intermediate_size=512", "model.max_seq_len=128", "model.eos_token_id=1",
                             "model.pad_token_id=0", "data.seq_len=64", "data.batch_size=8"])
    mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
    prog = training.programs(cfg, mesh)
    tokens = jax.ShapeDtypeStruct((1, 8, 64), np.int32)
    args = [prog.shapes, {"tokens": tokens, "segment_ids": tokens}]
    if getattr(prog, "frozen_sh", "absent") is None:  # the LoRA-era step signature
        args.append(None)
    xla = prog.train_step.lower(*args).compile().memory_analysis().temp_size_in_bytes
    est = dryrun.activation_bytes(cfg.model, mesh, cfg.mesh.logical_axis_rules, rows=8, tokens=64)
    assert 0.5 < est / xla < 2, (est, xla)


@pytest.mark.multidevice
def test_compiled_figure_is_extrapolated_over_layers_and_printed_beside_the_estimate():
    """`--compiled`: XLA's per-device figure of the real train step on 2 fake CPU devices, compiled at 1 and 2
    layers and extrapolated to 3, equals the 3-layer compile; the table shows it beside the estimate, and the fit
    check uses it."""
    from specdiff_jax.compiled_memory import measure

    cfg = load_config(None, ["model.vocab_size=256", "model.hidden_size=32", "model.num_layers=3",
                             "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=8",
                             "model.intermediate_size=64", "model.max_seq_len=64", "model.eos_token_id=1",
                             "model.pad_token_id=0", "data.seq_len=32", "data.batch_size=2", "mesh.data=1",
                             "mesh.fsdp=-1", "mesh.num_devices=2", "train.remat=full", "train.vocab_chunk=64"])
    lines = []
    r = dryrun.run(cfg, "train", out=lines.append, compiled=(1, 2))
    full = measure(cfg, (2, 3)).measured[3]
    assert r.compiled.total == pytest.approx(full["total"], rel=0.02), (r.compiled.measured, full)
    assert r.total == r.compiled.total and r.gap == pytest.approx(r.estimate / r.compiled.total - 1)
    assert "| **XLA compiled** |" in lines[0] and "at TPU sizes" not in lines[0]  # f32: the CPU compiles a TPU's
    r.budget = r.compiled.total  # the fit check reads the compiled figure, whatever the estimate says
    dryrun.check(r)
    r.budget = r.compiled.total - 1
    with pytest.raises(dryrun.DoesNotFit, match="needs"):
        dryrun.check(r)


_TINY = ["model.vocab_size=256", "model.hidden_size=32", "model.num_heads=4", "model.num_kv_heads=2",
         "model.head_dim=8", "model.intermediate_size=64", "model.max_seq_len=128", "model.eos_token_id=1",
         "model.pad_token_id=0", "data.seq_len=32", "mesh.data=1", "mesh.fsdp=-1", "mesh.num_devices=2",
         "pair.batch_size=2", "pair.prompt_tokens=16", "pair.max_new_tokens=8", "pair.gamma=4", "pair.num_drafts=2",
         "pair.draft_window=8"]


@pytest.mark.multidevice
def test_compiled_decode_figure_is_extrapolated_over_layers_and_printed_beside_the_estimate():
    """`--compiled` in decode mode: XLA's per-device figures of the real prefill and decode loop (`ar` decoding of
    a 4-layer bf16 model on 2 fake CPU devices; also at TPU sizes), compiled at 2 and 3 layers and extrapolated to
    4, equal the 4-layer
    compile (a 1-layer prefill is not on the line: its only layer is the last, whose MLP output nothing reads); the
    table prints the compiled line beside the estimate and the fit check uses it."""
    from specdiff_jax.compiled_memory import measure_decode

    cfg = load_config(None, _TINY + ["model.num_layers=4", "model.dtype=bfloat16", "model.param_dtype=bfloat16"],
                      tokenizer=NoTokenizer())
    lines = []
    r = dryrun.run(cfg, "decode", out=lines.append, compiled=(2, 3))
    plan = dryrun.decode_plan(cfg)
    full = measure_decode(cfg, plan, (3, 4)).measured["4,0"]
    assert set(r.compiled.kernels) == {"prefill", "decode"} and r.compiled.total > 0
    for k, b in r.compiled.kernels.items():
        for f in ("total", "tpu"):
            assert b[f] == pytest.approx(full[k][f], rel=0.02), (k, f, r.compiled.measured, full)
        assert b["parameters"] == _row(r, "verifier parameters")  # every parameter resident, exact
        assert b["total"] == b["parameters"] + b["inputs"] + b["output"] - b["alias"] + b["temp"]
        # bf16 on CPU: the figure at TPU sizes is lower, and still holds the parameters and the KV cache
        assert b["parameters"] + _row(r, "verifier KV cache") <= b["tpu"] < b["live"] <= b["total"], (k, b)
    assert r.compiled.kernels["prefill"]["argument"] < r.compiled.kernels["prefill"]["parameters"]  # XLA drops some
    assert r.compiled.total == max(b["total"] for b in r.compiled.kernels.values())
    assert r.total == r.compiled.tpu == max(b["tpu"] for b in r.compiled.kernels.values())  # the fit check's
    assert "| **XLA compiled** |" in lines[0] and "prefill and decode loop compiled on 2 fake CPU" in lines[0]
    assert "| XLA buffers at TPU sizes |" in lines[0]
    r.budget = r.compiled.tpu - 1
    with pytest.raises(dryrun.DoesNotFit, match="needs"):
        dryrun.check(r)


_PAIR = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
from specdiff_jax.compiled_memory import DecodePlan, compile_decode
from specdiff_jax.config.run import NoTokenizer, load_config
cfg = load_config(sys.argv[1], tokenizer=NoTokenizer())
plan = DecodePlan.from_dict(json.loads(sys.argv[2]))
points = ((2, 2), (3, 2), (2, 3), (4, 4))
print(json.dumps({f"{v},{d}": compile_decode(cfg, plan.with_layers(v, d)) for v, d in points}))
"""


@pytest.mark.multidevice
def test_compiled_decode_figure_of_a_pair_is_linear_in_both_depths(tmp_path):
    """A bidirectional drafter + verifier pair: the figures compiled at (2, 2), (3, 2) and (2, 3) (verifier,
    drafter) layers predict the (4, 4) compile, kernel by kernel."""
    import json
    import os
    import subprocess
    import sys

    from specdiff_jax.compiled_memory import extrapolate_pair
    from specdiff_jax.config.run import save_config

    verifier = dict(num_layers=4, vocab_size=256, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
                    intermediate_size=96, max_seq_len=512, eos_token_id=1, pad_token_id=0)
    (tmp_path / "verifier.yaml").write_text("model:\n" + "".join(f"  {k}: {v}\n" for k, v in verifier.items()))
    cfg = load_config(None, _TINY + ["model.num_layers=4", "model.attention=bidirectional", "model.logit_shift=true",
                                     "model.mask_token_id=3", "train.objective=calibrate",
                                     f"pair.verifier_config={tmp_path / 'verifier.yaml'}"], tokenizer=NoTokenizer())
    plan = dryrun.decode_plan(cfg)
    assert plan.drafter.attention == "bidirectional" and plan.verifier.intermediate_size == 96
    save_config(cfg, tmp_path / "run.yaml")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _PAIR, str(tmp_path / "run.yaml"), json.dumps(plan.to_dict())],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    for k in ("prefill", "decode"):
        got = extrapolate_pair(m["2,2"][k], m["3,2"][k], m["2,3"][k], (2, 3), (4, 4))
        assert m["2,2"][k]["total"] < got["total"]
        assert got["total"] == pytest.approx(m["4,4"][k]["total"], rel=0.02), (k, got, m["4,4"][k])


def test_weight_copies_the_compiled_steps_showed_are_in_the_formula():
    """Rows from shapes alone (measured against XLA's compiled 7B steps at TPU sizes, docs/SCALE_OUT.md): without
    remat every layer's fsdp-gathered weights; LoRA's merged adapted weights and their gradient; calibration's
    all-gathered LM head."""
    m = _cfg("models/qwen2.5-7b.yaml").model
    d, f, h, kv, hd = m.hidden_size, m.intermediate_size, m.num_heads, m.num_kv_heads, m.head_dim
    layer = 2 * d * h * hd + 2 * d * kv * hd + 3 * d * f  # the 2-D weights of one decoder layer
    r = dryrun.run(_cfg("models/qwen2.5-7b.yaml"), "train", out=lambda s: None)  # fsdp 32, tensor 1
    assert _row(r, "gathered layer weights") == m.num_layers * layer * 2
    r = dryrun.run(_cfg("models/qwen2.5-7b.yaml", "train.remat=full"), "train", out=lambda s: None)
    assert "gathered layer weights" not in [w for w, _, _ in r.rows]
    r = dryrun.run(_cfg("pairs/diffucoder7b_qwen2.5-7b.yaml"), "train", out=lambda s: None)  # 8 devices, LoRA
    assert _row(r, "LoRA merged weights + their gradient") == 2 * (m.num_layers * layer * 2 // 8)
    assert _row(r, "LM head, all-gathered") == d * m.vocab_size * 2
