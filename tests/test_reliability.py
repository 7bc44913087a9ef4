"""Bad input to every command (docs/RELIABILITY.md): each is refused before any work with one line that names the
input and the fix, and exit status 2 (no traceback).

The commands run in-process through their `main()` on tiny models saved here: a verifier, a block-causal and an AR
drafter, a verifier of another vocabulary, damaged copies (truncated parameters, a binary model_config.json), a
tokenizer trained here and a small calibration dataset. Nothing here compiles a decode or train step: every
refusal happens before that.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

# orbax leaves a background callback behind when a restore of a damaged checkpoint fails; harmless
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

from specdiff_jax.checkpoint import save_pretrained
from specdiff_jax.config import ConfigError, ModelConfig
from specdiff_jax.model import Transformer
from tests.conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parent.parent
BINARY = bytes(range(256)) * 4  # not UTF-8: 0x80.. bytes, NUL, ...
PROMPT, NEW = 6, 10  # the calibration dataset's rows


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Paths of everything the commands are pointed at (a dict)."""
    from specdiff_jax.data import verifier_data as vd
    from specdiff_jax.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("reliability")
    texts = [f.read_text(encoding="utf-8") for f in sorted(Path(json.__file__).parent.glob("*.py"))]
    tok = train_tokenizer(texts, tmp / "tok", vocab_size=512)
    base = {**TINY_MODEL, "vocab_size": 512, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    models = {
        "verifier": ModelConfig(**base),
        "drafter": ModelConfig(**base, attention="block_causal", mask_token_id=tok.mask_id, block_size=4),
        "ar_drafter": ModelConfig(**base),
        "verifier_600": ModelConfig(**{**base, "vocab_size": 600}),
    }
    p = {"tmp": tmp, "tok": tmp / "tok", "binary": tmp / "binary.bin"}
    for i, (name, cfg) in enumerate(models.items()):
        save_pretrained(Transformer(cfg, rngs=nnx.Rngs(i)), tmp / name)
        p[name] = tmp / name
    p["binary"].write_bytes(BINARY)
    # damaged copies of the verifier
    p["truncated"] = tmp / "truncated"
    shutil.copytree(p["verifier"], p["truncated"])
    for f in (p["truncated"] / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    p["binary_config"] = tmp / "binary_config"
    shutil.copytree(p["verifier"], p["binary_config"])
    (p["binary_config"] / "model_config.json").write_bytes(BINARY)
    p["drafter_binary_config"] = tmp / "drafter_binary_config"
    shutil.copytree(p["drafter"], p["drafter_binary_config"])
    (p["drafter_binary_config"] / "model_config.json").write_bytes(BINARY)
    p["drafter_truncated"] = tmp / "drafter_truncated"
    shutil.copytree(p["drafter"], p["drafter_truncated"])
    for f in (p["drafter_truncated"] / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    # an HF-looking directory whose config.json is binary
    (tmp / "hf_binary").mkdir()
    (tmp / "hf_binary" / "config.json").write_bytes(BINARY)
    (tmp / "hf_binary" / "model.safetensors").write_bytes(b"")
    p["hf_binary"] = tmp / "hf_binary"
    # calibration data: verifier completions with their sampling provenance
    r = np.random.default_rng(0)
    recs = [{"prompt": r.integers(4, 500, PROMPT).tolist(), "completion": r.integers(4, 500, NEW).tolist(),
             "prompt_index": i, "sample_index": 0, "source": f"synthetic/{i}", "split": "validation" if i < 2 else
             "train"} for i in range(8)]
    vd.write_dataset(tmp / "calib", recs, {"sampling": {"prompt_tokens": PROMPT, "max_new_tokens": NEW}})
    p["calib"] = tmp / "calib"
    p["calib_long"] = tmp / "calib_long"  # the same rows, declared longer than the drafter's max_seq_len
    shutil.copytree(p["calib"], p["calib_long"])
    meta = next(p["calib_long"].rglob("metadata.json"))
    d = json.loads(meta.read_text())
    d["provenance"]["sampling"] = {"prompt_tokens": 60, "max_new_tokens": 40}
    meta.write_text(json.dumps(d))
    return p


def fails(main, argv, capsys) -> str:
    """Run a command's main(argv): it must exit 2 with one line `error: ...`; returns that line."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, (rc, err[-2000:])
    assert "Traceback" not in err and lines and lines[-1].startswith("error: "), err[-2000:]
    return lines[-1]


# --- convert --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, expected", [
    ("from_missing", "does not exist"),
    ("from_binary_config", "config.json: not valid UTF-8 JSON"),
    ("to_binary_model_config", "model_config.json' is not UTF-8 JSON"),
    ("to_truncated", "truncated or corrupted"),
    ("to_wrong_flag", "unrecognized arguments: --dtpye"),
])
def test_convert_bad_input(w, case, expected, capsys):
    from specdiff_jax.convert import main

    out = w["tmp"] / f"convert_{case}"
    argv = {"from_missing": ["--from-hf", w["tmp"] / "nope"],
            "from_binary_config": ["--from-hf", w["hf_binary"]],
            "to_binary_model_config": ["--to-hf", w["binary_config"]],
            "to_truncated": ["--to-hf", w["truncated"]],
            "to_wrong_flag": ["--to-hf", w["verifier"], "--dtpye", "float32"]}[case]
    if case == "to_wrong_flag":  # argparse: usage + one error line, status 2
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv + ["--out", out]])
        assert e.value.code == 2 and expected in capsys.readouterr().err
    else:
        assert expected in fails(main, argv + ["--out", out], capsys)
    assert not out.exists()


# --- pretrain -------------------------------------------------------------------------------------------------


def test_pretrain_bad_input(w, capsys):
    from specdiff_jax.training import train
    from train.pretrain import main

    wd = w["tmp"] / "pretrain"
    cfgs = ["--config", ROOT / "configs/models/tiny_verifier.yaml", "--workdir", wd, f"data.tokenizer={w['tok']}"]
    line = fails(main, cfgs + [f"train.init_from={w['tmp'] / 'nope'}"], capsys)
    assert "train.init_from=" in line and "does not exist; set it to a model directory" in line
    line = fails(main, ["--config", w["binary"], "--workdir", wd], capsys)
    assert "binary.bin' is not UTF-8 text" in line
    assert not wd.exists()
    # a tokenizer with more ids than the model's vocabulary
    from specdiff_jax.config.run import load_config

    cfg = load_config(None, [f"data.tokenizer={w['tok']}", "model.vocab_size=256", "data.seq_len=32",
                             "model.max_seq_len=64"])
    with pytest.raises(ConfigError, match=r"tokenizer at data.tokenizer=.* has 512 ids but model.vocab_size=256"):
        train(cfg, wd)
    # the mdlm objective without a mask token
    with pytest.raises(ConfigError, match=r"mask_token_id=None is invalid: .*needs a mask token"):
        load_config(None, [f"data.tokenizer={w['tok']}", "model.attention=block_causal", "train.objective=mdlm"])
    assert not wd.exists()


# --- generate_data --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist; set generate.verifier"),
    ("truncated", "truncated or corrupted"),
    ("binary_config", "model_config.json' is not UTF-8 JSON"),
    ("not_causal", "is a block_causal model; the verifier must be a causal LM"),
    ("small_vocab", "the tokenizer has 512 ids but the verifier"),
    ("capacity", "generate.prompt_tokens + generate.max_new_tokens = 80 exceeds the verifier's max_seq_len=64"),
    ("temperature", "generate.temperature=-1.0 is invalid: must be >= 0"),
    ("top_p", r"generate.top_p=1.5 is invalid: must be in (0, 1]"),
    ("top_k", "generate.top_k=-2 is invalid: must be >= 0"),
    ("typo", "unknown config key 'generate.temprature' (from command line); did you mean generate.temperature"),
    ("binary_config_file", "binary.bin' is not UTF-8 text"),
])
def test_generate_data_bad_input(w, case, expected, capsys):
    from train.generate_data import main

    out = w["tmp"] / f"gen_{case}"
    kv = {"data.tokenizer": w["tok"], "data.data_dir": w["tmp"] / "no_corpus", "generate.out_dir": out,
          "generate.verifier": w["verifier"], "generate.prompt_tokens": 8, "generate.max_new_tokens": 8,
          "generate.progress_bar": "false"}
    kv.update({"missing": {"generate.verifier": w["tmp"] / "nope"}, "truncated": {"generate.verifier": w["truncated"]},
               "binary_config": {"generate.verifier": w["binary_config"]},
               "not_causal": {"generate.verifier": w["drafter"]},
               "small_vocab": {"generate.verifier": w["verifier"], "data.tokenizer": w["tok"]},
               "capacity": {"generate.prompt_tokens": 40, "generate.max_new_tokens": 40},
               "temperature": {"generate.temperature": -1.0}, "top_p": {"generate.top_p": 1.5},
               "top_k": {"generate.top_k": -2}, "typo": {"generate.temprature": 0.5}}.get(case, {}))
    if case == "small_vocab":  # a verifier of 256 ids for the 512-id tokenizer
        small = w["tmp"] / "verifier_256"
        if not small.exists():
            save_pretrained(Transformer(ModelConfig(**{**_cfg(w["verifier"]), "vocab_size": 256}),
                                        rngs=nnx.Rngs(0)), small)
        kv["generate.verifier"] = small
    argv = ["--config", w["binary"]] if case == "binary_config_file" else []
    line = fails(main, argv + [f"{k}={v}" for k, v in kv.items()], capsys)
    assert expected in line, line
    assert not out.exists()  # refused before the work dir is made


def _cfg(model_dir: Path) -> dict:
    return json.loads((model_dir / "model_config.json").read_text())


def test_generate_data_prompts_file_bad_input(w, tmp_path):
    """generate.prompts_file: binary, a malformed line, an empty prompt (read before any sampling)."""
    from specdiff_jax.data import verifier_data as vd
    from specdiff_jax.tokenizer import load_tokenizer

    tok, evals = load_tokenizer(w["tok"]), vd.eval_set(None, humaneval=False)
    f = tmp_path / "prompts.jsonl"
    f.write_bytes(BINARY)
    with pytest.raises(ValueError, match=r"generate.prompts_file=.*prompts.jsonl' is not UTF-8 text"):
        vd.prompts_from_file(str(f), tok, evals, prompt_tokens=8)
    f.write_text('{"text": "def a(): pass"}\n{"txt": "oops"}\n')
    with pytest.raises(ValueError, match=r"line 2 of generate.prompts_file=.* is not a JSON object with a \"text\""):
        vd.prompts_from_file(str(f), tok, evals, prompt_tokens=8)
    f.write_text('{"text": "def a(): pass"}\n{"text": ""}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2 .*empty"):
        vd.prompts_from_file(str(f), tok, evals, prompt_tokens=8)
    f.write_text('{"text": "def a(): pass"}\n')
    assert len(vd.prompts_from_file(str(f), tok, evals, prompt_tokens=8)) == 1  # the same file, fixed, is fine


# --- calibrate ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, expected", [
    ("init_missing", "is not a model directory (no model_config.json)"),
    ("init_binary_config", "model_config.json' is not UTF-8 JSON"),
    ("init_truncated", "truncated or corrupted"),
    ("init_causal", "calibration needs a diffusion drafter with a mask token"),
    ("verifier_missing", "does not exist; set it to the verifier's model directory"),
    ("verifier_not_causal", "is a block_causal model; the verifier must be a causal LM"),
    ("verifier_vocab", "drafter/verifier vocabulary mismatch: the drafter samples 512 ids, the verifier 600"),
    ("data_missing", "no verifier-completions dataset under"),
    ("capacity", "the generated rows have 100 tokens but the drafter's max_seq_len is 64"),
    ("gamma", "calibrate.gamma=0 is invalid: must be a positive integer"),
    ("temperature", "calibrate.temperature=0.0 is invalid: must be > 0"),
    ("loss_typo", "calibrate.loss='streek' (from command line) has the wrong type: expected 'streak'"),
    ("key_typo", "unknown config key 'calibrate.stried' (from command line); did you mean calibrate.stride"),
    ("binary_config_file", "binary.bin' is not UTF-8 text"),
])
def test_calibrate_bad_input(w, case, expected, capsys):
    from train.calibrate import main

    wd = w["tmp"] / f"calib_{case}"
    kv = {"data.tokenizer": w["tok"], "train.init_from": w["drafter"], "calibrate.data_dir": w["calib"],
          "calibrate.verifier": w["verifier"], "data.batch_size": 4, "data.val_batches": 1, "train.steps": 2,
          "train.progress_bar": "false", "calibrate.gamma": 4, "calibrate.windows_per_row": 2}
    kv.update({"init_missing": {"train.init_from": w["tmp"] / "nope"},
               "init_binary_config": {"train.init_from": w["drafter_binary_config"]},
               "init_truncated": {"train.init_from": w["drafter_truncated"]},
               "init_causal": {"train.init_from": w["ar_drafter"]},
               "verifier_missing": {"calibrate.verifier": w["tmp"] / "nope", "calibrate.loss": "kd_first"},
               "verifier_not_causal": {"calibrate.verifier": w["drafter"], "calibrate.loss": "kd_first"},
               "verifier_vocab": {"calibrate.verifier": w["verifier_600"], "calibrate.loss": "kd_first"},
               "data_missing": {"calibrate.data_dir": w["tmp"] / "nope"},
               "capacity": {"calibrate.data_dir": w["calib_long"]},
               "gamma": {"calibrate.gamma": 0}, "temperature": {"calibrate.temperature": 0.0},
               "loss_typo": {"calibrate.loss": "streek"}, "key_typo": {"calibrate.stried": 2}}.get(case, {}))
    config = w["binary"] if case == "binary_config_file" else ROOT / "configs/calibrate/tiny.yaml"
    line = fails(main, ["--config", config, "--workdir", wd, "--no-eval"] + [f"{k}={v}" for k, v in kv.items()],
                 capsys)
    assert expected in line, line
    if case != "init_truncated":  # the drafter's parameters are read by the training loop, after its set-up
        assert not wd.exists()
    else:
        assert not (wd / "checkpoints").exists() or not any((wd / "checkpoints").iterdir())


# --- generate -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, expected", [
    ("verifier_missing", "--verifier"), ("truncated", "truncated or corrupted"),
    ("binary_config", "is not UTF-8 JSON"), ("verifier_is_a_drafter", "the verifier must be a causal LM"),
    ("vocab", "drafter/verifier vocabulary mismatch"), ("no_mask", "needs a diffusion drafter with a mask token"),
    ("empty_ids", "--prompt-ids is empty"), ("empty_text", "--prompt encodes to no tokens"),
    ("capacity", "prompt length 3 + max_new_tokens 100 + gamma 0 = 103 exceeds the models' max_seq_len 64"),
    ("gamma", "gamma=0 is out of range"), ("num_drafts", "num_drafts=0 is out of range"),
    ("denoise_steps", "denoise_steps=0 is out of range"), ("temperature", "temperature=-1.0 must be >= 0"),
    ("draft_temperature", "draft_temperature=nan must be >= 0"), ("top_k", "top_k=-1 must be an integer >= 0"),
    ("top_p", "top_p=1.5 must be in (0, 1]"), ("non_utf8_prompt", "--prompt is not valid UTF-8 text"),
    ("binary_tokenizer", "cannot load a tokenizer from"), ("typo", "unrecognized arguments: --gama"),
])
def test_generate_bad_input(w, case, expected, capsys):
    from eval.generate import main

    v, d = str(w["verifier"]), str(w["drafter"])
    base = ["--verifier", v, "--method", "ar", "--prompt-ids", "5,6,7", "--max-new-tokens", "8"]
    sd = ["--verifier", v, "--drafter", d, "--method", "specdiff", "--prompt-ids", "5,6,7", "--max-new-tokens", "8"]
    argv = {
        "verifier_missing": ["--verifier", str(w["tmp"] / "nope"), *base[2:]],
        "truncated": ["--verifier", str(w["truncated"]), *base[2:]],
        "binary_config": ["--verifier", str(w["binary_config"]), *base[2:]],
        "verifier_is_a_drafter": ["--verifier", d, *base[2:]],
        "vocab": ["--verifier", str(w["verifier_600"]), *sd[2:]],
        "no_mask": ["--verifier", v, "--drafter", str(w["ar_drafter"]), *sd[4:]],
        "empty_ids": ["--verifier", v, "--method", "ar", "--prompt-ids", ""],
        "empty_text": ["--verifier", v, "--method", "ar", "--prompt", "", "--tokenizer", str(w["tok"])],
        "capacity": [*base[:-1], "100"],
        "gamma": [*sd, "--gamma", "0"], "num_drafts": [*sd, "--num-drafts", "0"],
        "denoise_steps": [*sd, "--denoise-steps", "0"], "temperature": [*base, "--temperature", "-1"],
        "draft_temperature": [*sd, "--draft-temperature", "nan"], "top_k": [*base, "--top-k", "-1"],
        "top_p": [*base, "--top-p", "1.5"],
        "non_utf8_prompt": ["--verifier", v, "--method", "ar", "--prompt", "caf\udce9", "--tokenizer", str(w["tok"])],
        "binary_tokenizer": ["--verifier", v, "--method", "ar", "--prompt", "x", "--tokenizer", str(w["binary"])],
        "typo": [*base, "--gama", "4"],
    }[case]
    assert expected in fails(main, argv, capsys)


# --- benchmark ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, expected", [
    ("verifier_truncated", "truncated or corrupted"),
    ("verifier_is_a_drafter", "ar at temperature 0, batch 1: the verifier is a block_causal model"),
    ("vocab", "drafter/verifier vocabulary mismatch"),
    ("no_mask", "specdiff at temperature 0, batch 1 [gamma=4, num_drafts=1, denoise_steps=1, draft_temperature=0.0]"
                ": method='specdiff' needs a diffusion drafter with a mask token"),
    ("sps_not_causal", "method='sps' needs a causal AR drafter"),
    ("capacity", "ar at temperature 0, batch 1: prompt length 8 + max_new_tokens 60 + gamma 0 = 68 exceeds"),
    ("gamma", "gamma=0 is out of range"), ("num_drafts", "num_drafts=0 is out of range"),
    ("denoise_steps", "denoise_steps=0 is out of range"), ("temperature", "temperature=-1.0 must be >= 0"),
    ("draft_temperature", "draft_temperature=-1.0 must be >= 0"),
    ("empty_prompt", "prompt val/0 (validation) encodes to no tokens"),
    ("binary_validation_file", "is not a UTF-8 JSONL file"),
    ("binary_config", "benchmark config"), ("typo", "unknown config key 'bench.specdiff_gama' (from command line); did you mean bench.specdiff_gamma"),
])
def test_benchmark_bad_input_is_refused_before_any_timing(w, case, expected, capsys, monkeypatch, tmp_path):
    import eval.benchmark as bench

    ran = []
    monkeypatch.setattr(bench, "run_jax_method", lambda *a, **k: ran.append(a) or pytest.fail("a job ran"))
    monkeypatch.setattr(bench, "run_hf", lambda *a, **k: ran.append(a) or pytest.fail("a job ran"))
    out = tmp_path / "out"
    kv = {"verifier": w["verifier"], "tokenizer": w["tok"], "specdiff_drafter": w["drafter"],
          "specdiff2_drafter": w["drafter"], "sps_drafter": w["ar_drafter"], "methods": "[ar, specdiff]",
          "humaneval_prompts": 1, "max_prompt_tokens": 8, "max_new_tokens": 8, "temperatures": "[0.0]",
          "repeats": 1, "specdiff_gamma": 4, "progress_bar": "false"}
    vf = tmp_path / "val.jsonl"
    kv.update({"verifier_truncated": {"verifier": w["truncated"]}, "verifier_is_a_drafter": {"verifier": w["drafter"]},
               "vocab": {"verifier": w["verifier_600"]}, "no_mask": {"specdiff_drafter": w["ar_drafter"]},
               "sps_not_causal": {"methods": "[ar, sps]", "sps_drafter": w["drafter"]},
               "capacity": {"max_new_tokens": 60}, "gamma": {"specdiff_gamma": 0},
               "num_drafts": {"methods": "[ar, specdiff2]", "specdiff2_num_drafts": 0},
               "denoise_steps": {"denoise_steps": 0}, "temperature": {"temperatures": "[0.0, -1.0]"},
               "draft_temperature": {"specdiff_draft_temperature": -1.0},
               "empty_prompt": {"humaneval_prompts": 0, "validation_prompts": 1, "validation_file": vf},
               "binary_validation_file": {"humaneval_prompts": 0, "validation_prompts": 1,
                                          "validation_file": w["binary"]},
               "typo": {"specdiff_gama": 4}}.get(case, {}))
    vf.write_text('{"text": ""}\n')
    config = w["binary"] if case == "binary_config" else ROOT / "configs/bench/tiny.yaml"
    line = fails(bench.main, ["--config", config, "--out", out] + [f"{k}={v}" for k, v in kv.items()], capsys)
    assert expected in line, line
    assert not ran and not (out / "results.json").exists()
