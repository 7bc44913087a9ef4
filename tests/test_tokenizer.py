"""Tokenizers: our sentencepiece BPE (trained here and the committed assets/tiny one) and HF tokenizer.json."""

import hashlib
import json
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specdiff_jax.tokenizer import (HFTokenizer, SentencePieceTokenizer, TokenizerError, load_tokenizer,
                                    train_tokenizer)

REPO = Path(__file__).resolve().parents[1]
ASSET_DIR = REPO / "assets" / "tiny"

ODD_TEXTS = [
    "def f(x):\n\tif x:\t# tab-indented\n\t\treturn x  \n",
    "line one\r\nline two\r\n\r\n  trailing   \n\n\n",
    "\x0c\x0b\x1b\x00 control chars",
    "caf\u00e9 cafe\u0301 \u00a0nbsp \u200bzero-width \ufeffbom",
    "emoji \U0001f40d\U0001f600 cjk \u4e2d\u6587 rtl \u05e9\u05dc\u05d5\u05dd \U0010ffff",
    "<mask> <eos> <pad> <unk> literal special names",
    "\u2581 sentencepiece's own space symbol \u2581\u2581",
    "x = 1234567890 + 0.5e-10\n" * 3,
    "",
    " ",
    "        \n    ",
]


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    """A tokenizer trained here on json/ and email/ of the stdlib (about 0.5 MB)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8") for d in ("json", "email") for p in sorted((stdlib / d).glob("*.py"))]
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(texts, out, vocab_size=768), out


@pytest.fixture(scope="module")
def asset_tok():
    if not (ASSET_DIR / "tokenizer.model").exists():
        pytest.skip("assets/tiny/tokenizer.model not trained yet (bash scripts/prepare_data.sh)")
    import specdiff_jax

    return specdiff_jax.load_tokenizer("assets/tiny" if Path("assets/tiny").is_dir() else ASSET_DIR)


def _unseen_stdlib_files(limit=8):
    """Stdlib files the default corpus puts in its validation split (by content hash), i.e. unseen in training."""
    from specdiff_jax.data.corpus import _split_of, _walk_py

    out = []
    for p in _walk_py(Path(sysconfig.get_paths()["stdlib"]), exclude_tests=True):
        data = p.read_bytes()
        if _split_of(hashlib.sha256(data).hexdigest(), 0.02) == "validation" and 1000 < len(data) < 100_000:
            out.append(data.decode("utf-8"))
            if len(out) == limit:
                break
    assert out, "no validation-split stdlib file found"
    return out


def test_special_ids_and_files(small_tok):
    tok, out = small_tok
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.unk_id, tok.eos_id, tok.mask_id) == (768, 0, 1, 2, 3)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (cfg["pad_id"], cfg["eos_id"], cfg["mask_id"], cfg["vocab_size"]) == (0, 2, 3, 768)
    assert (out / "tokenizer.vocab").read_text(encoding="utf-8").splitlines()[3].startswith("<mask>\t")
    again = load_tokenizer(out)
    assert again.encode("import json\n") == tok.encode("import json\n")
    assert load_tokenizer(out / "tokenizer.model").vocab_size == 768


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_round_trip_odd_text(small_tok, text):
    tok, _ = small_tok
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not {tok.pad_id, tok.eos_id, tok.mask_id} & set(ids)  # special names in text stay plain text


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_round_trip_any_text(small_tok, text):
    tok, _ = small_tok
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.text(), st.binary().map(lambda b: b.decode("latin-1")),
                 st.binary().map(lambda b: b.decode("utf-8", errors="replace"))))
def test_encode_gives_plain_ids_in_the_vocabulary_and_round_trips(small_tok, text):
    """Any text (also text from arbitrary bytes): ids in [0, vocab_size), never pad / eos / mask, exact inverse."""
    tok, _ = small_tok
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert not {tok.pad_id, tok.eos_id, tok.mask_id} & set(ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, text]) == [ids, ids]


def test_round_trip_unseen_source_small(small_tok):
    tok, _ = small_tok
    for text in _unseen_stdlib_files(3):
        assert tok.decode(tok.encode(text)) == text


def test_asset_tokenizer(asset_tok):
    tok = asset_tok
    cfg = json.loads((ASSET_DIR / "tokenizer_config.json").read_text())
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.mask_id) == (
        cfg["vocab_size"], cfg["pad_id"], cfg["eos_id"], cfg["mask_id"])
    assert (tok.pad_id, tok.eos_id, tok.mask_id) == (0, 2, 3)
    chars = tokens = 0
    for text in _unseen_stdlib_files():
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        chars, tokens = chars + len(text), tokens + len(ids)
    # Measured ~2.9 chars/token on the validation split with vocab 4096; far below means a broken model.
    assert chars / tokens > 2.4
    for text in ODD_TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_train_bad_input(tmp_path):
    with pytest.raises(TokenizerError, match="vocab_size=100 is too small"):
        train_tokenizer(["x"], tmp_path, vocab_size=100)
    with pytest.raises(TokenizerError, match="no training text"):
        train_tokenizer([], tmp_path, vocab_size=512)


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="cannot load sentencepiece model"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------- HF tokenizer.json


def _make_hf_tokenizer(out: Path, *, specials=("<|endoftext|>", "<|im_end|>", "<|mask|>")) -> Path:
    """A tiny byte-level BPE tokenizer.json in the Qwen2 style, built offline with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"] * 20
    tok.train_from_iterator(corpus, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out


def test_hf_tokenizer_with_config(tmp_path):
    d = _make_hf_tokenizer(tmp_path / "hf")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": {"content": "<|endoftext|>", "special": True},
        "mask_token": "<|mask|>", "bos_token": None}))
    tok = load_tokenizer(d)
    assert isinstance(tok, HFTokenizer)
    assert (tok.eos_id, tok.pad_id, tok.mask_id) == (1, 0, 2)  # special tokens take the first ids, in order
    from tokenizers import Tokenizer
    assert tok.vocab_size == Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    text = "def add(a, b):\n\treturn a + b  # caf\u00e9 \U0001f40d\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert load_tokenizer(d / "tokenizer.json").encode(text) == ids


def test_hf_tokenizer_fallback_names(tmp_path):
    d = _make_hf_tokenizer(tmp_path / "hf", specials=("<|endoftext|>", "<|mask|>"))
    tok = load_tokenizer(d)  # no tokenizer_config.json: well-known names
    assert (tok.eos_id, tok.pad_id, tok.mask_id) == (0, 0, 1)
    d2 = _make_hf_tokenizer(tmp_path / "hf2", specials=("<|endoftext|>",))
    assert load_tokenizer(d2).mask_id is None


def test_hf_tokenizer_config_naming_missing_token(tmp_path):
    d = _make_hf_tokenizer(tmp_path / "hf")
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(TokenizerError, match="eos_token='</s>'"):
        load_tokenizer(d)
