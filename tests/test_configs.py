"""Run configs: defaults file, includes, overrides, typed validation and the error messages users see."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from specdiff_jax.config import ConfigError, ModelConfig
from specdiff_jax.config.run import (
    DEFAULTS_PATH, SECTIONS, TOKENIZER_FIELDS, RunConfig, load_config, save_config, valid_keys,
)

ROOT = Path(__file__).resolve().parent.parent
NUMS = ["model.vocab_size=300", "model.eos_token_id=2", "model.pad_token_id=0"]


class StandInTokenizer:
    vocab_size, pad_id, eos_id, mask_id = 300, 0, 2, 3


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_file_lists_every_key_with_a_comment_and_matches_the_dataclasses():
    raw = yaml.safe_load(DEFAULTS_PATH.read_text())
    listed = {f"{s}.{k}" for s, sec in raw.items() if isinstance(sec, dict) for k in sec}
    listed |= {k for k, v in raw.items() if not isinstance(v, dict)}
    assert listed == set(valid_keys())
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            value = raw[name][f.name]
            if name == "model" and value == "tokenizer":
                assert f.name in TOKENIZER_FIELDS
                continue
            default = f.default
            if isinstance(default, tuple) and default and isinstance(default[0], tuple):  # rule pairs
                default = [list(r) for r in default]
                value = [[a, list(b) if isinstance(b, list) else b] for a, b in value]
                default = [[a, list(b) if isinstance(b, tuple) else b] for a, b in default]
            elif isinstance(default, tuple):  # a list of names
                default = list(default)
            assert value == default, f"{name}.{f.name}: defaults.yaml {value!r} != dataclass {default!r}"
    # every key line carries a comment
    for line in DEFAULTS_PATH.read_text().splitlines():
        if re.match(r"^\s*[a-z_]+:\s*\S", line) and not line.strip().startswith("- "):
            assert "#" in line, f"no comment on: {line}"


def test_overrides_parse_typed_values():
    cfg = load_config(None, NUMS + ["train.lr=3e-4", "model.num_layers=4", "model.qkv_bias=false",
                                    "data.source_dirs=[stdlib, /src]", "train.init_from=null", "workdir=123",
                                    "mesh.logical_axis_rules=[[batch, data], [embed, null]]"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.num_layers == 4 and cfg.model.qkv_bias is False
    assert cfg.data.source_dirs == ("stdlib", "/src")
    assert cfg.train.init_from is None
    assert cfg.workdir == "123"  # a path, kept as written
    assert cfg.mesh.logical_axis_rules == (("batch", "data"), ("embed", None))


def test_unknown_key_names_it_and_the_closest_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr' \(from command line\); did you mean "
                                          r"train\.lr"):
        load_config(None, NUMS + ["train.lrr=1"])
    f = write(tmp_path / "m.yaml", "model:\n  num_layer: 3\n")
    with pytest.raises(ConfigError, match=rf"unknown config key 'model\.num_layer' \(from {re.escape(str(f))}\); "
                                          r"did you mean model\.num_layers"):
        load_config(f, NUMS)
    with pytest.raises(ConfigError, match=r"'trian\.steps'.*did you mean train\.steps"):
        load_config(None, NUMS + ["trian.steps=3"])
    with pytest.raises(ConfigError, match=r"'model\.lr'.*did you mean train\.lr"):  # right name, wrong section
        load_config(None, NUMS + ["model.lr=3"])


def test_key_overridden_twice_on_the_command_line_is_refused():
    with pytest.raises(ConfigError, match=r"'train\.lr' is overridden twice on the command line \(train\.lr=1e-3 and "
                                          r"train\.lr=2e-3\)"):
        load_config(None, NUMS + ["train.lr=1e-3", "train.lr=2e-3"])


@pytest.mark.parametrize("override, expected", [
    ("model.num_layers=two", r"model\.num_layers='two' \(from command line\) has the wrong type: expected int, got str"),
    ("train.lr=fast", r"train\.lr='fast' .*expected float, got str"),
    ("train.progress_bar=1", r"train\.progress_bar=1 .*expected bool, got int"),
    ("train.objective=gan", r"train\.objective='gan' .*expected 'ar' \| 'mdlm'"),
    ("data.source_dirs=5", r"data\.source_dirs=5 .*expected list of str \| null"),
])
def test_type_errors_name_key_value_and_expected_type(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, NUMS + [override])


def test_bad_values_are_refused_naming_key_and_fix():
    with pytest.raises(ConfigError, match=r"data\.seq_len=4096 is invalid: exceeds the model's max_seq_len=2048"):
        load_config(None, NUMS + ["data.seq_len=4096"])
    with pytest.raises(ConfigError, match=r"train\.steps=0 is invalid"):
        load_config(None, NUMS + ["train.steps=0"])
    with pytest.raises(ConfigError, match=r"model\.attention='causal' is invalid: the mdlm objective"):
        load_config(None, NUMS + ["train.objective=mdlm"])
    with pytest.raises(ConfigError, match=r"not of the form key=value"):
        load_config(None, NUMS + ["train.lr"])
    with pytest.raises(ConfigError, match=r"mesh axis 'model' is not one of"):
        load_config(None, NUMS + ["mesh.logical_axis_rules=[[embed, model]]"])


def test_include_chain_and_precedence(tmp_path):
    write(tmp_path / "base.yaml", "model:\n  num_layers: 3\n  hidden_size: 48\ntrain:\n  lr: 1.0e-2\n")
    mid = write(tmp_path / "mid.yaml", "include: base.yaml\nmodel:\n  num_layers: 5\n")
    top = write(tmp_path / "top.yaml", "base: mid.yaml\ntrain:\n  steps: 7\n")
    cfg = load_config(top, NUMS + ["train.lr=0.5"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.train.steps, cfg.train.lr) == (5, 48, 7, 0.5)
    assert cfg.model.intermediate_size == ModelConfig().intermediate_size  # untouched keys keep the defaults
    write(tmp_path / "a.yaml", "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.yaml", NUMS)
    with pytest.raises(ConfigError, match=r"includes 'nope\.yaml', which was found neither"):
        load_config(write(tmp_path / "c.yaml", "include: nope.yaml\n"), NUMS)
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "missing.yaml", NUMS)
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "model: [\n"), NUMS)


def test_tokenizer_placeholders_and_round_trip(tmp_path):
    cfg = load_config(None, ["model.attention=block_causal", "model.mask_token_id=tokenizer", "train.objective=mdlm"],
                      tokenizer=StandInTokenizer())
    assert (cfg.model.vocab_size, cfg.model.mask_token_id, cfg.model.eos_token_id, cfg.model.pad_token_id) == \
        (300, 3, 2, 0)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert isinstance(cfg, RunConfig)
    with pytest.raises(ConfigError, match=r"model\.vocab_size.*read from the tokenizer, but "
                                          r"data\.tokenizer='/nonexistent' could not be loaded"):
        load_config(None, ["data.tokenizer=/nonexistent"])


def test_shipped_model_configs_load_with_the_shipped_tokenizer():
    from specdiff_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(ROOT / "assets" / "tiny")
    models = ROOT / "configs" / "models"
    ver = load_config(models / "tiny_verifier.yaml", tokenizer=tok)
    dra = load_config(models / "tiny_drafter.yaml", tokenizer=tok)
    ard = load_config(models / "tiny_ar_drafter.yaml", tokenizer=tok)
    assert ver.model.vocab_size == dra.model.vocab_size == ard.model.vocab_size == tok.vocab_size
    assert ver.model.attention == "causal" and ver.train.objective == "ar"
    assert 5e6 <= ver.model.num_params() <= 30e6
    assert dra.model.attention == "block_causal" and dra.model.mask_token_id == tok.mask_id
    assert dra.model.logit_shift is False and dra.train.objective == "mdlm"
    assert ard.model.attention == "causal" and ard.model.mask_token_id is None and ard.train.objective == "ar"
    shape = lambda c: {k: v for k, v in c.model.to_dict().items()  # noqa: E731
                       if k not in ("attention", "mask_token_id")}
    assert shape(ard) == shape(dra)  # same cost per forward
    assert dra.model.num_params() * 4 < ver.model.num_params()
