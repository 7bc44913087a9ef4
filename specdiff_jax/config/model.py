"""Model configuration: one typed dataclass for verifiers, AR drafters and diffusion drafters."""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any, Literal

import jax.numpy as jnp

ATTENTION_LAYOUTS = ("causal", "bidirectional", "block_causal")
DTYPES = ("float32", "bfloat16")


def jax_dtype(name: str):
    """The array dtype of a config dtype name ("float32" | "bfloat16"); numpy takes it too (`np.dtype(...)`)."""
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class ConfigError(ValueError):
    """A user-supplied configuration value is invalid; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one Qwen2-family transformer.

    `attention` picks the layout: `causal` (verifiers, AR drafters), `bidirectional` (Dream / DiffuCoder
    drafters; with `logit_shift=True` the output at position i predicts token i+1) or `block_causal` (our
    diffusion drafters: causal prefix, the final block attends to the prefix and to itself).
    """

    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    attention: Literal["causal", "bidirectional", "block_causal"] = "causal"
    logit_shift: bool = False
    block_size: int = 16
    mask_token_id: int | None = None
    # Ids at or above this are embedding rows padded past the tokenizer: never sampled. None = vocab_size.
    sample_vocab_size: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    architecture: str = "qwen2"  # provenance: qwen2 | llama | dream

    def __post_init__(self):
        self.validate()

    @property
    def is_drafter(self) -> bool:
        return self.mask_token_id is not None

    @property
    def num_sampleable(self) -> int:
        return self.vocab_size if self.sample_vocab_size is None else self.sample_vocab_size

    def validate(self) -> None:
        def bad(key, value, fix):
            raise ConfigError(f"ModelConfig.{key}={value!r} is invalid: {fix}")

        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size", "max_seq_len", "block_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(key, v, "must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", self.num_kv_heads, f"must divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            bad("head_dim", self.head_dim, "must be even (rotary embeddings rotate pairs)")
        if self.attention not in ATTENTION_LAYOUTS:
            bad("attention", self.attention, f"choose one of {ATTENTION_LAYOUTS}")
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in DTYPES:
                bad(key, getattr(self, key), f"choose one of {DTYPES}")
        if self.rope_theta <= 0:
            bad("rope_theta", self.rope_theta, "must be positive")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            bad("mask_token_id", self.mask_token_id, f"must be in [0, vocab_size={self.vocab_size})")
        if self.sample_vocab_size is not None and not 0 < self.sample_vocab_size <= self.vocab_size:
            bad("sample_vocab_size", self.sample_vocab_size, f"must be in (0, vocab_size={self.vocab_size}]")
        if self.attention != "causal" and self.mask_token_id is None:
            bad("mask_token_id", None, f"a {self.attention} (diffusion) drafter needs a mask token id")

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "ModelConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown model config key {k!r} in {source}{hint}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        from etils import epath

        epath.Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        from etils import epath  # local or remote (gs://...) model directories

        path = epath.Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"model config {str(path)!r} is not UTF-8 JSON ({type(e).__name__}: {str(e)[:120]}); "
                              "the model directory is damaged: re-save or re-convert the model") from None
        if not isinstance(d, dict):
            raise ConfigError(f"model config {str(path)!r} must hold a JSON object of model keys, got "
                              f"{type(d).__name__}; re-save or re-convert the model")
        return cls.from_dict(d, source=str(path))

    def num_params(self) -> int:
        d, f, h, kv, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d + (h * hd + 2 * kv * hd if self.qkv_bias else 0)
        layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + emb + d


def check_verifier(v: ModelConfig, source: str, *, drafter: ModelConfig | None = None,
                   tokenizer_vocab: int | None = None) -> None:
    """ConfigError unless `v` can verify: a causal LM, sharing the drafter's sampleable ids, covering the tokenizer.

    source names where the verifier came from in the message (e.g. "calibrate.verifier='runs/v'").
    """
    if v.attention != "causal":
        raise ConfigError(f"{source} is a {v.attention} model; the verifier must be a causal LM")
    if drafter is not None and drafter.num_sampleable != v.num_sampleable:
        raise ConfigError(f"drafter/verifier vocabulary mismatch: the drafter samples {drafter.num_sampleable} ids, "
                          f"the verifier {v.num_sampleable}; they must share one tokenizer")
    if tokenizer_vocab is not None and tokenizer_vocab > v.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer_vocab} ids but the verifier {source} only {v.vocab_size}; "
                          "use the verifier's tokenizer (data.tokenizer)")
