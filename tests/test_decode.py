"""The decode kernel: exact equality with AR greedy decoding at temperature 0, ragged batches with EOS,
compilation counts and input errors.

Every method at temperature 0 must reproduce the verifier's own greedy decoding (method `ar`) token for token,
whatever the drafter proposes. Two kinds of drafter make both paths of the kernel run: random drafters (most
drafts rejected) and drafters that agree with the verifier (long accepted streaks, including full gamma-length
acceptance with the bonus token; the tests assert that such rounds happened).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specdiff_jax import decode, generate
from specdiff_jax.config import ModelConfig
from specdiff_jax.model import Transformer

N = 24  # max_new_tokens everywhere (one static shape per method setting)
BASE = dict(vocab_size=96, sample_vocab_size=90, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
            head_dim=16, intermediate_size=64, max_seq_len=128)
MASK = 95
PROMPTS4 = [[3, 17, 42], [5, 9, 60, 61, 2, 33, 70, 8, 11], [44], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
PROMPT1 = [[12, 80, 7]]


def _biased(model, c, a, b, scale=1.0):
    """Push every hidden state along one direction u and make u vote for token c in the LM head.

    A verifier with a moderate push emits c most of the time (but not always); a drafter with a strong push
    always drafts c: together they produce long accepted streaks with some rejections.
    """
    u = jax.random.normal(jax.random.key(99), (model.cfg.hidden_size,))
    u = u / jnp.linalg.norm(u)
    model.embed_tokens.set_value(model.embed_tokens.get_value() + a * u)
    model.lm_head.set_value((scale * model.lm_head.get_value()).at[:, c].add(b * u))
    return model


@pytest.fixture(scope="module")
def models():
    cfg_v = ModelConfig(**BASE)
    cfg_block = ModelConfig(**BASE, attention="block_causal", mask_token_id=MASK)
    cfg_bidir = ModelConfig(**BASE, attention="bidirectional", logit_shift=True, mask_token_id=MASK)
    return dict(
        v=Transformer(cfg_v, rngs=nnx.Rngs(0)),
        v_agree=_biased(Transformer(cfg_v, rngs=nnx.Rngs(0)), 7, 0.3, 1.0, scale=20.0),
        block=Transformer(cfg_block, rngs=nnx.Rngs(1)),
        block_agree=_biased(Transformer(cfg_block, rngs=nnx.Rngs(1)), 7, 1.0, 5.0),
        ar=Transformer(cfg_v, rngs=nnx.Rngs(2)),
        bidir=Transformer(cfg_bidir, rngs=nnx.Rngs(3)),
    )


@pytest.fixture(scope="module")
def reference(models):
    """AR greedy outputs (B=4 ragged with an EOS that rows hit at different steps, and B=1)."""
    free = generate(models["v"], PROMPTS4, method="ar", max_new_tokens=N)
    # choose an EOS id that ends some rows at different steps and leaves at least one row to its budget
    eos = None
    for tok in np.unique(free.tokens):
        first = [int(np.argmax(r == tok)) if (r == tok).any() else None for r in free.tokens]
        hit = [f for f in first if f is not None]
        if len(set(hit)) >= 2 and len(hit) < len(first) and min(hit) > 0:
            eos = int(tok)
            break
    assert eos is not None, free.tokens
    ref = {}
    for name in ("v", "v_agree"):
        ref[name, 4] = generate(models[name], PROMPTS4, method="ar", max_new_tokens=N, eos_id=eos)
        ref[name, 1] = generate(models[name], PROMPT1, method="ar", max_new_tokens=N, eos_id=eos)
    ref["eos"] = eos
    return ref


def test_reference_is_ragged(reference):
    out = reference["v", 4]
    assert len(set(out.lengths.tolist())) >= 3, out.lengths  # rows end at different steps
    assert (out.lengths < N).any() and (out.lengths == N).any()
    for b in range(4):  # EOS (if hit) is the last emitted token; padding after it
        row = out.tokens[b, : out.lengths[b]]
        assert reference["eos"] not in row[:-1]
        assert (out.tokens[b, out.lengths[b]:] == 0).all()


def test_ar_rows_are_independent(models, reference):
    """Each row of the ragged batch equals the same prompt decoded alone (batch 1)."""
    out4 = reference["v", 4]
    for b, prompt in enumerate(PROMPTS4):
        one = generate(models["v"], [prompt], method="ar", max_new_tokens=N, eos_id=reference["eos"])
        assert one.lengths[0] == out4.lengths[b]
        np.testing.assert_array_equal(one.tokens[0], out4.tokens[b])


CASES = [
    # (id, method, verifier, drafter, batch, settings, expect a full-length acceptance)
    ("sps_g4_agree", "sps", "v", "v", 4, dict(gamma=4, draft_temperature=0.0), True),
    ("sps_g4_random", "sps", "v", "ar", 4, dict(gamma=4), False),
    ("specdiff_g16_agree", "specdiff", "v_agree", "block_agree", 4, dict(gamma=16), True),
    ("specdiff_g16_random", "specdiff", "v", "block", 4, dict(gamma=16), False),
    ("specdiff2_g4_K4_T2_random", "specdiff2", "v", "block", 4, dict(gamma=4, num_drafts=4, denoise_steps=2), False),
    ("specdiff2_g4_K4_T2_agree", "specdiff2", "v_agree", "block_agree", 4,
     dict(gamma=4, num_drafts=4, denoise_steps=2), True),
    ("specdiff2_g1_K4_B1", "specdiff2", "v", "block", 1, dict(gamma=1, num_drafts=4, draft_temperature=0.0), False),
    ("specdiff_bidir_shift_g4_T2_B1", "specdiff", "v", "bidir", 1, dict(gamma=4, denoise_steps=2), False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_greedy_equals_ar(models, reference, case):
    _, method, vname, dname, batch, settings, full = case
    prompts = PROMPTS4 if batch == 4 else PROMPT1
    out = generate(models[vname], prompts, method=method, drafter=models[dname], max_new_tokens=N,
                   eos_id=reference["eos"], **settings)
    ref = reference[vname, batch]
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    st = out.stats
    G = settings["gamma"]
    hist = np.asarray(st["accepted_hist"])
    assert len(hist) == G + 1 and hist.sum() == sum(st["row_verifier_calls"])
    assert st["verifier_calls"] == max(st["row_verifier_calls"])
    assert st["tokens"] == int(ref.lengths.sum())
    assert st["tokens_per_verifier_call"] == pytest.approx(st["tokens"] / hist.sum())
    if full:
        assert st["verifier_calls"] < N  # fewer verifier calls than AR needs for the longest row
        assert hist[G] > 0, hist  # whole drafts accepted: the bonus-token path ran
        assert st["tokens_per_verifier_call"] > 2.0
    else:
        assert hist[0] > 0, hist  # rejections happened


def test_same_bucket_compiles_once(models):
    v = models["v"]
    dec = decode.Decoder(v, method="ar", max_new_tokens=N, eos_id=None)
    dec([[1, 2, 3]])
    before = decode.TRACES.copy()
    for prompt in ([4, 5, 6, 7, 8], [9] * 7, [10] * 16):  # all in the 16-token bucket
        decode.Decoder(v, method="ar", max_new_tokens=N)([prompt])
    assert decode.TRACES == before, (decode.TRACES, before)
    dec([[1] * 17])  # next bucket (32): exactly one new prefill and one new decode trace
    assert decode.TRACES["decode"] == before["decode"] + 1
    assert decode.TRACES["prefill"] == before["prefill"] + 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="specdiff"), "needs a drafter"),
    (dict(method="beam"), "method='beam' is unknown"),
    (dict(method="specdiff", drafter="ar"), "needs a diffusion drafter with a mask token"),
    (dict(method="sps", drafter="block"), "needs a causal AR drafter"),
    (dict(method="specdiff", drafter="other_vocab"), "vocabulary mismatch"),
    (dict(method="specdiff", drafter="block", gamma=0), "gamma=0 is out of range"),
    (dict(method="specdiff", drafter="block", gamma=1000), "gamma=1000 is out of range"),
    (dict(method="specdiff2", drafter="block", num_drafts=0), "num_drafts=0 is out of range"),
    (dict(method="specdiff2", drafter="block", gamma=4, denoise_steps=5), "denoise_steps=5 must be <= gamma=4"),
    (dict(method="ar", temperature=-0.5), "temperature=-0.5 must be >= 0"),
    (dict(method="ar", top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(method="ar", top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
    (dict(method="ar", max_new_tokens=0), "max_new_tokens=0"),
    (dict(method="specdiff2", drafter="block", temperature=1.0, num_drafts=4, acceptance="pq"), "not lossless"),
    (dict(method="specdiff", drafter="block", temperature=1.0, denoise_steps=2, acceptance="pq"), "not lossless"),
    (dict(method="ar", prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(method="ar", prompts=[]), "non-empty list"),
    (dict(method="ar", prompts=[[1, 500]]), "token id 500 outside the vocabulary"),
    (dict(method="ar", prompts=[[1] * 110]), "exceeds the models' max_seq_len"),
    (dict(method="specdiff", drafter="block", gamma=16, prompts=[[1] * 80], max_new_tokens=40),
     "prompt length 80 \\+ max_new_tokens 40 \\+ gamma 16 = 136 exceeds"),
])
def test_bad_inputs_raise_clear_errors(models, kwargs, match):
    kwargs = dict(kwargs)
    prompts = kwargs.pop("prompts", [[1, 2, 3]])
    d = kwargs.pop("drafter", None)
    if d == "other_vocab":
        drafter = Transformer(ModelConfig(**{**BASE, "vocab_size": 100, "sample_vocab_size": 99},
                                          attention="block_causal", mask_token_id=99), rngs=nnx.Rngs(5))
    else:
        drafter = models[d] if d else None
    kwargs.setdefault("max_new_tokens", N)
    with pytest.raises(decode.DecodeError, match=match):
        generate(models["v"], prompts, drafter=drafter, **kwargs)


def test_cli_generates_and_fails_cleanly(models, reference, tmp_path, capsys):
    from eval.generate import main
    from specdiff_jax.checkpoint import save_pretrained

    save_pretrained(models["v"], tmp_path / "v")
    eos = reference["eos"]
    assert main(["--verifier", str(tmp_path / "v"), "--method", "ar", "--prompt-ids", ",".join(map(str, PROMPT1[0])),
                 "--max-new-tokens", str(N), "--eos-id", str(eos), "--json"]) == 0
    import json

    got = json.loads(capsys.readouterr().out)
    ref = reference["v", 1]
    assert got["ids"] == ref.tokens[0, : ref.lengths[0]].tolist()
    assert got["stats"]["verifier_calls"] == ref.lengths[0]
    for argv, msg in [
        (["--method", "specdiff", "--prompt-ids", "1,2"], "needs --drafter"),
        (["--method", "ar", "--prompt-ids", "1,x"], "must be comma-separated integers"),
        (["--method", "ar", "--prompt-ids", "1", "--top-p", "2"], "top_p=2.0 must be in (0, 1]"),
        (["--method", "ar", "--prompt-ids", "1", "--gamma", "abc"], "invalid int value"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["--verifier", str(tmp_path / "v")] + argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1 and "Traceback" not in err, err
