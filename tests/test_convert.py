"""HF <-> specdiff-jax conversion: round-trip parity with transformers (Levanter pattern), Dream drafters,
our model-directory format, every mapped config field, bad input and the CLI. Tiny random models are made offline;
nothing is downloaded.

The parity tests need the `hf` extra (torch + transformers). Without it (neither installed) the module is skipped;
with it installed but unusable (one of the two missing, an import error, a missing model class) the module fails:
an installed extra must never turn parity into a silent skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

HF_EXTRA = ("torch", "transformers")


def hf_extra_status() -> tuple[str, str | None]:
    """("absent", None) when no package of the hf extra is installed, ("ok", None) when parity can run, else
    ("broken", why)."""
    import importlib
    from importlib import metadata

    installed = []
    for dist in HF_EXTRA:
        try:
            metadata.distribution(dist)
            installed.append(dist)
        except metadata.PackageNotFoundError:
            pass
    if not installed:
        return "absent", None
    if len(installed) < len(HF_EXTRA):
        return "broken", f"only {installed} of the hf extra {list(HF_EXTRA)} is installed"
    try:
        for mod in HF_EXTRA:
            importlib.import_module(mod)
        tf = importlib.import_module("transformers")
        for cls in ("Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen2Config", "LlamaConfig", "AutoModelForCausalLM"):
            getattr(tf, cls)
    except Exception as e:  # noqa: BLE001  any failure to import means parity cannot run
        return "broken", f"{type(e).__name__}: {e}"
    return "ok", None


def require_hf_extra(status: str, why: str | None) -> None:
    """Skip when the extra is absent, fail (never skip) when it is installed but parity cannot run."""
    if status == "absent":
        pytest.skip("the hf extra is not installed (pip install -e '.[hf]'): no HF parity tests",
                    allow_module_level=True)
    if status != "ok":
        pytest.fail(f"the hf extra is installed but HF parity cannot run: {why}", pytrace=False)


require_hf_extra(*hf_extra_status())
import torch  # noqa: E402
import transformers  # noqa: E402

from specdiff_jax import ModelConfig, Transformer, load_pretrained, save_pretrained  # noqa: E402
from specdiff_jax.checkpoint import CheckpointError, CheckpointNotFoundError, load_metadata  # noqa: E402
from specdiff_jax.convert import ConversionError, config_to_hf, to_hf, tokenizer_size  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN, HEADS, LAYERS, FFN = 128, 32, 4, 2, 64
TOL = 1e-4
PARITY: dict[str, float] = {}  # measured max |ours - torch|, printed at the end of the module (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if PARITY:
        print("\nparity (max abs logit diff):")
        for k, v in PARITY.items():
            print(f"  {k}: {v:.2e}")


@pytest.fixture(scope="module", autouse=True)
def _exact_matmuls():
    import jax

    # On GPUs f32 matmuls may default to TF32, which is far from 1e-4; CPUs are unaffected.
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def tokens():
    return np.random.RandomState(0).randint(0, 100, size=(2, 11)).astype(np.int32)


def make_hf(family: str, path: Path, *, kv: int = 2, tied: bool = False, theta: float = 10000.0,
            seed: int = 0, eps: float = 1e-6, **extra):
    """A tiny random HF model saved at `path`; every parameter (biases, norms too) is random."""
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=kv, rope_theta=theta, tie_word_embeddings=tied,
                  rms_norm_eps=eps, **{"max_position_embeddings": 64, **extra})
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.25 * noise)
    model.eval().save_pretrained(path)
    return model


def torch_logits(model, tokens, mask=None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": mask}
        return model(torch.as_tensor(tokens, dtype=torch.long), **kw).logits.float().numpy()


def ours(model, tokens) -> np.ndarray:
    return np.asarray(model(jnp.asarray(tokens)))


def maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# Every value of every axis (family, kv heads in {1, 2, heads}, tied/untied, two thetas), not the full product.
CASES = [
    ("qwen2", 1, True, 10000.0),
    ("qwen2", 2, False, 1e6),
    ("qwen2", HEADS, True, 1e6),
    ("llama", 1, False, 1e6),
    ("llama", 2, True, 10000.0),
    ("llama", HEADS, False, 10000.0),
]


@pytest.mark.parametrize("family,kv,tied,theta", CASES, ids=[f"{f}-kv{k}-{'tied' if t else 'untied'}-{th:g}"
                                                             for f, k, t, th in CASES])
def test_hf_roundtrip(tmp_path, tokens, family, kv, tied, theta):
    hf = make_hf(family, tmp_path / "hf", kv=kv, tied=tied, theta=theta)
    ref = torch_logits(hf, tokens)
    assert np.std(ref) > 0.5  # the random model is far from uniform, so a wrong mapping cannot hide

    m = load_pretrained(tmp_path / "hf")
    assert m.cfg.architecture == family and m.cfg.num_kv_heads == kv and m.cfg.tie_embeddings == tied
    assert m.cfg.rope_theta == theta and m.cfg.qkv_bias == (family == "qwen2")
    err_in = maxdiff(ours(m, tokens), ref)
    assert err_in < TOL

    to_hf(m, tmp_path / "back")
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(hf2).__name__ == type(hf).__name__
    err_out = maxdiff(torch_logits(hf2, tokens), ref)
    assert err_out < TOL
    PARITY[f"{family} kv={kv} tied={tied} theta={theta:g}"] = max(err_in, err_out)


def test_our_format_roundtrip_and_dtype(tmp_path, tokens):
    make_hf("qwen2", tmp_path / "hf", kv=2, tied=False)
    m = load_pretrained(tmp_path / "hf")
    save_pretrained(m, tmp_path / "ours", metadata={"step": 7, "note": "x"})
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["metadata.json", "model_config.json", "params"]
    m2 = load_pretrained(tmp_path / "ours")
    assert m2.cfg == m.cfg
    np.testing.assert_array_equal(ours(m2, tokens), ours(m, tokens))
    assert load_metadata(tmp_path / "ours") == {"step": 7, "note": "x"}
    # a relative path loads too (orbax alone cannot read item metadata through one)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        np.testing.assert_array_equal(ours(load_pretrained("ours"), tokens), ours(m, tokens))
    # saving again over the same directory replaces the parameters
    save_pretrained(m2, tmp_path / "ours")
    np.testing.assert_array_equal(ours(load_pretrained(tmp_path / "ours"), tokens), ours(m, tokens))

    mb = load_pretrained(tmp_path / "ours", dtype="bfloat16")
    assert mb.cfg.dtype == mb.cfg.param_dtype == "bfloat16"
    assert mb.embed_tokens.value.dtype == jnp.bfloat16
    lb = ours(mb, tokens)
    assert lb.dtype == np.float32
    # bf16 keeps ~3 significant digits; the logits are O(5) here
    assert maxdiff(lb, ours(m, tokens)) < 0.25

    mh = load_pretrained(tmp_path / "hf", dtype="bfloat16")
    assert mh.layers[0].mlp.up_proj.value.dtype == jnp.bfloat16


def test_sharded_checkpoint(tmp_path, tokens):
    hf = make_hf("llama", tmp_path / "hf", kv=2, tied=False)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    m = load_pretrained(tmp_path / "sharded")
    assert maxdiff(ours(m, tokens), torch_logits(hf, tokens)) < TOL


def _write_tokenizer(path: Path, n_ids: int, mask: str = "<|mask|>") -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(n_ids - 1)}, unk_token="t0"))
    tok.add_special_tokens([mask])  # gets id n_ids - 1
    tok.save(str(path / "tokenizer.json"))


def _dreamify(src: Path, dst: Path, mask_token_id: int | None) -> None:
    """Rewrite a Qwen2 checkpoint's config.json the way Dream / DiffuCoder checkpoints spell it."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    theta = cfg.pop("rope_parameters")["rope_theta"]
    cfg.pop("layer_types", None)
    cfg.update(architectures=["DreamModel"], model_type="Dream", rope_theta=theta, rope_scaling=None,
               torch_dtype="float32", auto_map={"AutoModel": "modeling_dream.DreamModel"})
    cfg.pop("dtype", None)
    if mask_token_id is not None:
        cfg["mask_token_id"] = mask_token_id
    (dst / "config.json").write_text(json.dumps(cfg))


def test_dream_drafter_matches_bidirectional_reference(tmp_path):
    hf = make_hf("qwen2", tmp_path / "qwen", kv=2, tied=False, theta=10000.0)
    mask_id, n_tok = 100, 101  # the tokenizer has 101 ids (the mask is the last); rows 101..127 are padding
    _dreamify(tmp_path / "qwen", tmp_path / "dream", mask_id)
    _write_tokenizer(tmp_path / "dream", n_tok)
    assert tokenizer_size(tmp_path / "dream") == n_tok

    m = load_pretrained(tmp_path / "dream")
    cfg = m.cfg
    assert (cfg.architecture, cfg.attention, cfg.logit_shift, cfg.mask_token_id) == ("dream", "bidirectional",
                                                                                        True, mask_id)
    assert cfg.vocab_size == VOCAB and cfg.sample_vocab_size == n_tok and cfg.num_sampleable == n_tok

    rng = np.random.RandomState(1)
    prefix = rng.randint(0, 100, size=(2, 7))
    toks = np.concatenate([prefix, np.full((2, 4), mask_id)], axis=1).astype(np.int32)
    L = toks.shape[1]
    # The reference: transformers' own Qwen2 with the causal mask replaced by a full one (sdpa honours a 4-D
    # additive mask). First check that it really does: an explicit causal mask reproduces the default ...
    tril = torch.tril(torch.ones(L, L, dtype=torch.bool))
    causal_add = torch.zeros(L, L).masked_fill(~tril, float("-inf"))[None, None].expand(2, 1, L, L)
    assert maxdiff(torch_logits(hf, toks, causal_add), torch_logits(hf, toks)) < 1e-5
    full = torch.zeros(2, 1, L, L)
    ref = torch_logits(hf, toks, full)
    # ... and a full mask makes position 0 see the last token.
    toks2 = toks.copy()
    toks2[:, -1] = 5
    assert maxdiff(torch_logits(hf, toks2, full)[:, 0], ref[:, 0]) > 1e-2

    out = ours(m, toks)
    err = maxdiff(out, ref)
    assert err < TOL
    PARITY["dream bidirectional vs transformers full-mask Qwen2"] = err
    # Logit shift: no shift inside the model; output i predicts token i+1 exactly as HF's (Dream's sampler
    # reads draft position p from output p-1). Reading the outputs one position off would be far off.
    assert maxdiff(out[:, 1:], ref[:, :-1]) > 0.5
    # q_1 (first MASK, position 7) comes from the last prefix position 6 in both.
    assert maxdiff(out[:, 6], ref[:, 6]) < TOL

    # Export keeps Dream's config fields; converting back is exact.
    to_hf(tmp_path / "dream", tmp_path / "dream_back")
    back = json.loads((tmp_path / "dream_back" / "config.json").read_text())
    assert back["architectures"] == ["DreamModel"] and back["model_type"] == "Dream"
    assert back["mask_token_id"] == mask_id and back["rope_theta"] == 10000.0
    assert (tmp_path / "dream_back" / "tokenizer.json").is_file()
    m2 = load_pretrained(tmp_path / "dream_back")
    assert m2.cfg == cfg
    np.testing.assert_array_equal(ours(m2, toks), out)


def test_block_causal_drafter_survives_hf_export(tmp_path, tokens):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=64, max_seq_len=64, attention="block_causal", block_size=4,
                      mask_token_id=63, sample_vocab_size=60)
    import flax.nnx as nnx

    m = Transformer(cfg, rngs=nnx.Rngs(3))
    with pytest.warns(UserWarning, match="block_causal"):
        to_hf(m, tmp_path / "hf")
    m2 = load_pretrained(tmp_path / "hf")
    assert m2.cfg == cfg
    t = tokens % 64
    np.testing.assert_array_equal(ours(m2, t), ours(m, t))


# --- bad input ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "hf"
    make_hf("qwen2", path, kv=2, tied=False)
    return path


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unknown_architecture(tiny_hf, tmp_path):
    d = _edit_config(tiny_hf, tmp_path / "x", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConversionError, match=r"GPT2LMHeadModel.*supported: Qwen2ForCausalLM, LlamaForCausalLM"):
        load_pretrained(d)


def test_missing_tensor(tiny_hf, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "x"
    shutil.copytree(tiny_hf, d)
    t = load_file(str(d / "model.safetensors"))
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        load_pretrained(d)


def test_unexpected_tensor(tiny_hf, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "x"
    shutil.copytree(tiny_hf, d)
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"tensors this converter does not know: model\.layers\.0\.mlp\.extra"):
        load_pretrained(d)


def test_llama_attention_bias(tmp_path, tokens):
    """LLaMA's attention_bias adds q/k/v biases (ours) and an o_proj bias (accepted only when zero)."""
    hf = make_hf("llama", tmp_path / "nonzero", kv=2, attention_bias=True)
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.o_proj\.bias is non-zero"):
        load_pretrained(tmp_path / "nonzero")
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    hf.save_pretrained(tmp_path / "zero")
    m = load_pretrained(tmp_path / "zero")
    assert m.cfg.qkv_bias and m.cfg.architecture == "llama"
    ref = torch_logits(hf, tokens)
    assert maxdiff(ours(m, tokens), ref) < TOL
    to_hf(m, tmp_path / "back")
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert hf2.config.attention_bias is True
    assert maxdiff(torch_logits(hf2, tokens), ref) < TOL


def test_shape_mismatch(tiny_hf, tmp_path):
    d = _edit_config(tiny_hf, tmp_path / "x", intermediate_size=48)
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \(64, 32\) "
                                              r"but config\.json implies \(48, 32\)"):
        load_pretrained(d)


def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


def test_neither_format(tiny_hf, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "README").write_text("hi")
    with pytest.raises(CheckpointError, match="neither a specdiff-jax model directory"):
        load_pretrained(tmp_path / "x")
    with pytest.raises(CheckpointError, match="is a file; pass the model directory"):
        load_pretrained(tiny_hf / "config.json")
    d = tmp_path / "y"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(ConversionError, match="required key 'hidden_size' is missing"):
        load_pretrained(d)
    shutil.copy(tiny_hf / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConversionError, match=r"has no \*\.safetensors files"):
        load_pretrained(d)


def test_unsupported_rope_scaling(tiny_hf, tmp_path):
    d = _edit_config(tiny_hf, tmp_path / "x",
                     rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(ConversionError, match="'yarn' is not implemented"):
        load_pretrained(d)
    d = _edit_config(tiny_hf, tmp_path / "y", rope_parameters=None, rope_theta=1e4,
                     rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(ConversionError, match="'linear' is not implemented"):
        load_pretrained(d)


def test_dream_without_mask_token(tiny_hf, tmp_path):
    _dreamify(tiny_hf, tmp_path / "d", mask_token_id=None)
    with pytest.raises(ConversionError, match="needs mask_token_id"):
        load_pretrained(tmp_path / "d")


def test_truncated_safetensors(tiny_hf, tmp_path):
    d = tmp_path / "x"
    shutil.copytree(tiny_hf, d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ConversionError, match="truncated or corrupted"):
        load_pretrained(d)


# orbax leaves a background event-loop callback behind when a restore fails; harmless
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_model_dir(tiny_hf, tmp_path):
    m = load_pretrained(tiny_hf)
    save_pretrained(m, tmp_path / "ours")
    # the config and the parameters disagree: name the parameter and both shapes
    bad = tmp_path / "bad_cfg"
    shutil.copytree(tmp_path / "ours", bad)
    c = json.loads((bad / "model_config.json").read_text())
    c["intermediate_size"] = 48
    (bad / "model_config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.down_proj has shape \(64, 32\) .* needs \(48, 32\)"):
        load_pretrained(bad)
    # truncated parameter data
    trunc = tmp_path / "trunc"
    shutil.copytree(tmp_path / "ours", trunc)
    data = [p for p in (trunc / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data
    for p in data:
        p.write_bytes(p.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_pretrained(trunc)
    # missing checkpoint metadata
    nometa = tmp_path / "nometa"
    shutil.copytree(tmp_path / "ours", nometa)
    (nometa / "params" / "_METADATA").unlink()
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_pretrained(nometa)
    # config without params
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(tmp_path / "ours" / "model_config.json", half)
    with pytest.raises(CheckpointError, match="no params/ directory"):
        load_pretrained(half)


def test_config_to_hf_fields():
    cfg = ModelConfig(architecture="llama", qkv_bias=False, rope_theta=5e5, eos_token_id=2)
    hf = config_to_hf(cfg)
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["attention_bias"] is False
    assert hf["rope_parameters"] == {"rope_type": "default", "rope_theta": 5e5} and hf["eos_token_id"] == 2
    assert hf["num_key_value_heads"] == cfg.num_kv_heads and hf["head_dim"] == cfg.head_dim


def test_a_broken_hf_extra_fails_and_an_absent_one_skips(monkeypatch):
    import sys
    from importlib import metadata

    assert hf_extra_status() == ("ok", None)
    monkeypatch.setitem(sys.modules, "transformers", None)  # installed, but `import transformers` fails
    status, why = hf_extra_status()
    assert status == "broken" and "transformers" in why
    with pytest.raises(pytest.fail.Exception, match="installed but HF parity cannot run"):
        require_hf_extra(status, why)
    monkeypatch.undo()

    def only_torch(name):
        if name == "transformers":
            raise metadata.PackageNotFoundError(name)
        return metadata.Distribution.from_name(name)

    monkeypatch.setattr(metadata, "distribution", only_torch)
    assert hf_extra_status()[0] == "broken"

    def nothing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", nothing)
    assert hf_extra_status() == ("absent", None)
    with pytest.raises(pytest.skip.Exception):
        require_hf_extra("absent", None)


# Every ModelConfig field the converter maps, each away from its default (head_dim != hidden / heads too).
NON_DEFAULT = dict(vocab_size=100, hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=16,
                   intermediate_size=80, rope_theta=5e5, rms_norm_eps=3e-3, tie_embeddings=True, max_seq_len=333,
                   eos_token_id=7, pad_token_id=5, dtype="bfloat16", param_dtype="bfloat16")


@pytest.mark.parametrize("arch", ["qwen2", "llama", "dream", "block_causal"])
def test_every_mapped_config_field_round_trips(arch):
    """ModelConfig -> config.json -> ModelConfig is the identity for every mapped field, and transformers' own
    config class reads each HF key as the value we meant (a misspelt key would survive our own round trip)."""
    from specdiff_jax.convert import config_from_hf

    kw = dict(NON_DEFAULT)
    if arch == "llama":
        kw.update(architecture="llama", qkv_bias=False)
    elif arch == "dream":
        kw.update(architecture="dream", attention="bidirectional", logit_shift=True, mask_token_id=99,
                  sample_vocab_size=97)
    elif arch == "block_causal":
        kw.update(attention="block_causal", block_size=8, mask_token_id=98, sample_vocab_size=97)
    cfg = ModelConfig(**kw)
    hf = config_to_hf(cfg)
    assert config_from_hf(json.loads(json.dumps(hf))) == cfg
    if arch == "dream":  # no transformers class; Dream's remote code reads these top-level keys
        assert (hf["rope_theta"], hf["mask_token_id"], hf["rms_norm_eps"]) == (5e5, 99, 3e-3)
        return
    tcfg = (transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config)(**hf)
    theta = tcfg.rope_parameters["rope_theta"] if getattr(tcfg, "rope_parameters", None) else tcfg.rope_theta
    got = dict(vocab_size=tcfg.vocab_size, hidden_size=tcfg.hidden_size, num_layers=tcfg.num_hidden_layers,
               num_heads=tcfg.num_attention_heads, num_kv_heads=tcfg.num_key_value_heads, head_dim=tcfg.head_dim,
               intermediate_size=tcfg.intermediate_size, rope_theta=theta, rms_norm_eps=tcfg.rms_norm_eps,
               tie_embeddings=tcfg.tie_word_embeddings, max_seq_len=tcfg.max_position_embeddings,
               eos_token_id=tcfg.eos_token_id, pad_token_id=tcfg.pad_token_id)
    assert got == {k: getattr(cfg, k) for k in got}
    if arch == "llama":
        assert tcfg.attention_bias is False


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_hf_parity_with_non_default_fields(tmp_path, tokens, family):
    """Parity both ways with rms_norm_eps far from the default and head_dim != hidden / heads: the logits depend on
    both (a converter that dropped either would be off by far more than TOL)."""
    import dataclasses

    hf = make_hf(family, tmp_path / "hf", kv=2, eps=0.05, head_dim=16, max_position_embeddings=96)
    ref = torch_logits(hf, tokens)
    m = load_pretrained(tmp_path / "hf")
    assert (m.cfg.rms_norm_eps, m.cfg.head_dim, m.cfg.max_seq_len) == (0.05, 16, 96)
    err = maxdiff(ours(m, tokens), ref)
    assert err < TOL
    from specdiff_jax.checkpoint import fill_model
    from flax import nnx

    default_eps = fill_model(dataclasses.replace(m.cfg, rms_norm_eps=1e-6), nnx.to_pure_dict(nnx.state(m, nnx.Param)))
    assert maxdiff(ours(default_eps, tokens), ref) > 100 * TOL  # the eps is visible in the logits
    to_hf(m, tmp_path / "back")
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert (hf2.config.rms_norm_eps, hf2.config.head_dim) == (0.05, 16)
    err_out = maxdiff(torch_logits(hf2, tokens), ref)
    assert err_out < TOL
    PARITY[f"{family} rms_norm_eps=0.05 head_dim=16"] = max(err, err_out)


# --- CLI -----------------------------------------------------------------------------------------------------
def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "specdiff_jax.convert", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_both_ways(tiny_hf, tmp_path, tokens):
    r = _cli("--from-hf", tiny_hf, "--out", tmp_path / "ours")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ours" / "model_config.json").is_file() and (tmp_path / "ours" / "params").is_dir()
    r = _cli("--to-hf", tmp_path / "ours", "--out", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert maxdiff(torch_logits(hf2, tokens), torch_logits(hf, tokens)) < TOL

    r = _cli("--from-hf", tmp_path / "nope", "--out", tmp_path / "o2")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "Traceback" not in r.stderr
