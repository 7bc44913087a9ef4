"""Tokenizers: our sentencepiece BPE (trained on the corpus) and HF `tokenizer.json` files, behind one interface.

    tok = load_tokenizer("assets/tiny")        # a directory with tokenizer.model (ours) or tokenizer.json (HF)
    ids = tok.encode(text)                     # list[int], no special tokens added
    text = tok.decode(ids)                     # exact inverse for our tokenizer: decode(encode(x)) == x
    tok.vocab_size, tok.pad_id, tok.eos_id, tok.mask_id   # mask_id is None when the vocabulary has none

Our tokenizer: sentencepiece BPE with byte fallback, identity normalisation, no dummy prefix, whitespace kept as
is (runs of spaces become whitespace-only pieces, digits are split), so the round trip is exact for any text
(a literal U+2581, sentencepiece's space symbol, is routed through byte fallback).
Special ids: <pad>=0, <unk>=1, <eos>=2, <mask>=3 (control symbols: never produced by encoding text, even text
that spells "<mask>"). Training sees whole multi-line chunks of files, so pieces can contain newlines (``):\n``).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

MODEL_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
PAD, UNK, EOS, MASK = "<pad>", "<unk>", "<eos>", "<mask>"
_META = "\u2581"  # sentencepiece's whitespace symbol


class TokenizerError(ValueError):
    """A tokenizer file is missing or unusable; the message names it and the fix."""


class Tokenizer:
    """Common interface. Subclasses set vocab_size, pad_id, eos_id, mask_id."""

    vocab_size: int
    pad_id: int
    eos_id: int
    mask_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, pad_id={self.pad_id}, eos_id={self.eos_id}, "
                f"mask_id={self.mask_id})")


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(model_file)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"cannot load sentencepiece model {str(model_file)!r}: {e}; train one with "
                                 f"specdiff_jax.tokenizer.train_tokenizer or scripts/prepare_data.sh") from e
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else sp.eos_id()
        self.eos_id = sp.eos_id()
        self.unk_id = sp.unk_id()
        mask = sp.piece_to_id(MASK)
        self.mask_id = mask if mask != sp.unk_id() and sp.is_control(mask) else None
        # sentencepiece uses U+2581 for spaces, so a literal U+2581 in the input would decode as a space; it is
        # encoded through its byte-fallback pieces instead, which decode to the character itself.
        self._meta_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in _META.encode("utf-8")]
        if self.eos_id < 0:
            raise TokenizerError(f"sentencepiece model {str(model_file)!r} has no eos piece: retrain it with "
                                 f"train_tokenizer (which defines <pad>, <unk>, <eos>, <mask>)")

    def encode(self, text: str) -> list[int]:
        if _META not in text:
            return self._sp.encode(text, out_type=int)
        parts = self._sp.encode(text.split(_META), out_type=int)
        ids = parts[0]
        for p in parts[1:]:
            ids = ids + self._meta_ids + p
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if any(_META in t for t in texts):
            return [self.encode(t) for t in texts]
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


def _token_content(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


class HFTokenizer(Tokenizer):
    """A HF `tokenizer.json` (e.g. Qwen2.5, Dream) via the `tokenizers` library.

    Special tokens come from `tokenizer_config.json` / `special_tokens_map.json` next to the file (eos_token,
    pad_token, mask_token); when absent, well-known names are looked up in the vocabulary
    (eos: <|endoftext|>, </s>, <eos>; mask: <|mask|>, <mask>, [MASK]; pad: <|endoftext|>, <pad>, [PAD], else eos).
    The round trip is exact only up to the tokenizer's own normaliser (Qwen2 applies NFC).
    """

    EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
    PAD_NAMES = ("<|endoftext|>", "<pad>", "[PAD]", "<|pad|>")
    MASK_NAMES = ("<|mask|>", "<mask>", "[MASK]")

    def __init__(self, json_file: str | os.PathLike, config: dict | None = None):
        from tokenizers import Tokenizer as _HF

        self.path = Path(json_file)
        try:
            self._tok = _HF.from_file(str(json_file))
        except Exception as e:  # the tokenizers library raises a bare Exception on parse errors
            raise TokenizerError(f"cannot load HF tokenizer {str(json_file)!r}: {e}") from e
        if config is None:
            config = {}
            for name in ("special_tokens_map.json", CONFIG_FILE):  # tokenizer_config wins
                p = self.path.parent / name
                if p.exists():
                    config.update({k: v for k, v in json.loads(p.read_text()).items() if v is not None})
        self.config = config
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

        def find(key: str, names: Sequence[str]) -> int | None:
            content = _token_content(config.get(key))
            if content is not None:
                i = self._tok.token_to_id(content)
                if i is None:
                    raise TokenizerError(f"{key}={content!r} from the tokenizer config of {str(json_file)!r} is "
                                         f"not in its vocabulary: fix {CONFIG_FILE}")
                return i
            for n in names:
                i = self._tok.token_to_id(n)
                if i is not None:
                    return i
            return None

        eos = find("eos_token", self.EOS_NAMES)
        if eos is None:
            raise TokenizerError(f"no eos token found for {str(json_file)!r}: set eos_token in {CONFIG_FILE} next "
                                 f"to it")
        self.eos_id = eos
        pad = find("pad_token", self.PAD_NAMES)
        self.pad_id = eos if pad is None else pad
        self.mask_id = find("mask_token", self.MASK_NAMES)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer from a directory holding tokenizer.model (ours) or tokenizer.json (HF), or either file."""
    p = Path(path)
    if p.is_dir():
        if (p / MODEL_FILE).exists():
            return SentencePieceTokenizer(p / MODEL_FILE)
        if (p / HF_FILE).exists():
            return HFTokenizer(p / HF_FILE)
        raise TokenizerError(f"no {MODEL_FILE} or {HF_FILE} in {str(p)!r}: pass a tokenizer directory such as "
                             f"'assets/tiny', or train one with scripts/prepare_data.sh")
    if p.is_file():
        if p.suffix == ".json":
            return HFTokenizer(p)
        return SentencePieceTokenizer(p)
    raise TokenizerError(f"tokenizer path {str(p)!r} does not exist: pass a directory holding {MODEL_FILE} or "
                         f"{HF_FILE} (e.g. 'assets/tiny')")


# ----------------------------------------------------------------------------------------------- training


def _chunks(texts: Iterable[str], chunk_bytes: int, max_chars: int | None) -> Iterator[str]:
    """Multi-line chunks of at most ~chunk_bytes (lines are kept whole unless longer than a chunk)."""
    total = 0
    for text in texts:
        if max_chars is not None and total >= max_chars:
            return
        total += len(text)
        buf, size = [], 0
        for line in text.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if size + n > chunk_bytes and buf:
                yield "".join(buf)
                buf, size = [], 0
            if n > chunk_bytes:  # a very long line: hard split by characters
                step = max(1, chunk_bytes // 4)
                for i in range(0, len(line), step):
                    yield line[i:i + step]
                continue
            buf.append(line)
            size += n
        if buf:
            yield "".join(buf)


def train_tokenizer(texts_or_data_dir: str | os.PathLike | Iterable[str], out_dir: str | os.PathLike, *,
                    vocab_size: int = 8192, max_chars: int | None = 64_000_000, chunk_bytes: int = 4000,
                    seed: int = 0, num_threads: int = 2, character_coverage: float = 0.9995,
                    ) -> SentencePieceTokenizer:
    """Trains our sentencepiece BPE tokenizer and writes out_dir/{tokenizer.model, tokenizer.vocab,
    tokenizer_config.json}.

    texts_or_data_dir: an iterable of documents, or a prepared corpus directory (its train split is used).
    max_chars: stop reading documents after this many characters (None: all).
    """
    import sentencepiece as spm

    if vocab_size < 256 + 4 + 16:
        raise TokenizerError(f"vocab_size={vocab_size} is too small: byte fallback alone needs 256 + 4 special "
                             f"pieces; use at least 512")
    source_desc: str
    if isinstance(texts_or_data_dir, (str, os.PathLike)):
        from specdiff_jax.data.corpus import load_split

        split = load_split(str(texts_or_data_dir), "train")
        texts: Iterable[str] = (split[i]["text"] for i in range(len(split)))
        source_desc = f"{texts_or_data_dir} (train split, {len(split)} files)"
    else:
        texts = texts_or_data_dir
        source_desc = "texts"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    n_chunks = 0

    chunks = _chunks(texts, chunk_bytes, max_chars)
    first = next(chunks, None)
    if first is None:
        raise TokenizerError(f"no training text in {source_desc}: pass non-empty documents")

    def counted():
        nonlocal n_chunks
        for c in itertools.chain([first], chunks):
            n_chunks += 1
            yield c

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted(), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            pad_id=0, unk_id=1, eos_id=2, bos_id=-1, pad_piece=PAD, unk_piece=UNK, eos_piece=EOS,
            control_symbols=[MASK], max_sentence_length=4 * chunk_bytes + 16, input_sentence_size=10_000_000,
            shuffle_input_sentence=True, character_coverage=character_coverage, num_threads=num_threads, minloglevel=2)
    except RuntimeError as e:
        raise TokenizerError(f"sentencepiece training on {source_desc} failed ({e}); if the vocabulary is too "
                             f"large for the text, lower vocab_size={vocab_size} or add text") from e
    (out / MODEL_FILE).write_bytes(model.getvalue())
    tok = SentencePieceTokenizer(out / MODEL_FILE)
    sp = tok._sp
    (out / "tokenizer.vocab").write_text(
        "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size())), encoding="utf-8")
    config = {
        "tokenizer_class": "sentencepiece", "model_type": "bpe", "vocab_size": tok.vocab_size,
        "pad_token": PAD, "pad_id": tok.pad_id, "unk_token": UNK, "unk_id": tok.unk_id,
        "eos_token": EOS, "eos_id": tok.eos_id, "mask_token": MASK, "mask_id": tok.mask_id, "bos_id": None,
        "byte_fallback": True, "normalization": "identity", "trained_on": source_desc,
        "training_chunks": n_chunks, "training_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return tok
