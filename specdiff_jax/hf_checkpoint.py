"""Hugging Face <-> specdiff-jax checkpoint conversion, driven by one parameter table (docs/METHOD.md §2).

Supported `architectures` in config.json: `Qwen2ForCausalLM`, `LlamaForCausalLM` and `DreamModel` (Dream /
DiffuCoder drafters: Qwen2 weights, bidirectional attention, AR logit shift, a `mask_token_id`). All three share
the HF tensor names, so one table (`PARAM_TABLE`) maps our parameter paths to HF names, with a hook per entry
(HF linear weights are [out, in], ours [in, out]: transpose). Safetensors are read with `safetensors` in numpy
(no torch), one tensor at a time, sharded checkpoints through `model.safetensors.index.json`.

This module sits above the model-directory format (`specdiff_jax.checkpoint`), which never imports it;
`load_pretrained` here (also `specdiff_jax.load_pretrained`) takes either kind of directory. The command line is
`specdiff_jax.convert`.

Embedding rows padded past the tokenizer (Qwen2.5 / Dream: 152064 rows, ~151.6k ids) must never be sampled:
when tokenizer files are present, `sample_vocab_size` is set to the tokenizer's size.
"""

from __future__ import annotations

import json
import warnings
import shutil
from pathlib import Path
from typing import Any, Callable

import ml_dtypes  # noqa: F401  registers numpy's bfloat16, which safetensors' numpy reader needs
import numpy as np
from etils import epath
from flax import nnx
from flax.nnx import traversals

from specdiff_jax.checkpoint import (
    CONFIG_FILE,
    PARAMS_DIR,
    CheckpointError,
    check_exists,
    check_model_path,
    fill_model,
    is_model_dir,
    load_model_dir,
    save_pretrained,
)
from specdiff_jax.config import ConfigError, ModelConfig, jax_dtype
from specdiff_jax.model import Transformer, abstract_model

# --- the table -------------------------------------------------------------------------------------------
# (our path, HF name, hook). "{i}" is the layer index. Hooks map an HF array to ours; all hooks here are their
# own inverse (a transpose), so the same table serves the export.


def _t(x: np.ndarray) -> np.ndarray:
    return x.T


def _same(x: np.ndarray) -> np.ndarray:
    return x


Hook = Callable[[np.ndarray], np.ndarray]

PARAM_TABLE: list[tuple[str, str, Hook]] = [
    ("embed_tokens", "model.embed_tokens.weight", _same),
    ("layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight", _same),
    ("layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.q_proj.weight", _t),
    ("layers.{i}.self_attn.k_proj", "model.layers.{i}.self_attn.k_proj.weight", _t),
    ("layers.{i}.self_attn.v_proj", "model.layers.{i}.self_attn.v_proj.weight", _t),
    ("layers.{i}.self_attn.o_proj", "model.layers.{i}.self_attn.o_proj.weight", _t),
    ("layers.{i}.self_attn.q_bias", "model.layers.{i}.self_attn.q_proj.bias", _same),
    ("layers.{i}.self_attn.k_bias", "model.layers.{i}.self_attn.k_proj.bias", _same),
    ("layers.{i}.self_attn.v_bias", "model.layers.{i}.self_attn.v_proj.bias", _same),
    ("layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight", _same),
    ("layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.gate_proj.weight", _t),
    ("layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.up_proj.weight", _t),
    ("layers.{i}.mlp.down_proj", "model.layers.{i}.mlp.down_proj.weight", _t),
    ("norm.weight", "model.norm.weight", _same),
    ("lm_head", "lm_head.weight", _t),
]

# HF tensors we do not model. LLaMA with attention_bias=True also has an o_proj bias: accepted only when zero.
ZERO_ONLY = ("model.layers.{i}.self_attn.o_proj.bias",)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "DreamModel": "dream"}
HF_ARCH = {v: k for k, v in ARCHITECTURES.items()}
MODEL_TYPE = {"qwen2": "qwen2", "llama": "llama", "dream": "Dream"}
# Keys of ModelConfig that HF config.json cannot express; kept in config.json under this key on export.
EXTRA_KEY = "specdiff_jax"
EXTRA_FIELDS = ("attention", "logit_shift", "block_size", "mask_token_id", "sample_vocab_size")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)


class ConversionError(CheckpointError):
    """An HF checkpoint cannot be converted; the message names the tensor / key / file and the fix."""


def _bias_or_not(cfg: ModelConfig, our: str) -> bool:
    if our.endswith(("q_bias", "k_bias", "v_bias")):
        return cfg.qkv_bias
    if our == "lm_head":
        return not cfg.tie_embeddings
    return True


def param_mapping(cfg: ModelConfig) -> list[tuple[tuple, str, Hook]]:
    """The table expanded for `cfg`: [(our pure-dict path, HF tensor name, hook)] for every parameter."""
    rows = []
    for our, hf, hook in PARAM_TABLE:
        if not _bias_or_not(cfg, our):
            continue
        layers = range(cfg.num_layers) if "{i}" in our else [None]
        for i in layers:
            o = our.format(i=i) if i is not None else our
            path = tuple(int(p) if p.isdigit() else p for p in o.split("."))
            rows.append((path, hf.format(i=i) if i is not None else hf, hook))
    return rows


# --- config.json ------------------------------------------------------------------------------------------
def _rope_theta(hf: dict, source: str) -> float:
    rp = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    theta = None
    if isinstance(rp, dict):
        if "rope_theta" not in rp and all(isinstance(v, dict) for v in rp.values()) and rp:
            # per-layer-type rope parameters: all must agree
            kinds = list(rp.values())
            if any(k != kinds[0] for k in kinds):
                raise ConversionError(f"{source}: different rope parameters per layer type are not supported")
            rp = kinds[0]
        theta = rp.get("rope_theta")
        kind = rp.get("rope_type", rp.get("type", "default"))
        if kind not in (None, "default"):
            raise ConversionError(
                f"{source}: rope_parameters.rope_type={kind!r} is not implemented (only 'default' rotary "
                "embeddings); use a checkpoint without rope scaling"
            )
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in (None, "default"):
            raise ConversionError(
                f"{source}: rope_scaling type {kind!r} is not implemented (only 'default' rotary embeddings); "
                "use a checkpoint without rope scaling"
            )
    if theta is None:
        theta = hf.get("rope_theta", 10000.0)
    return float(theta)


def _first_id(v):
    if isinstance(v, list):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def _read_json(path: Path):
    """A JSON file of a checkpoint; binary, non-UTF-8 or malformed content is a ConversionError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not valid UTF-8 JSON ({type(e).__name__}: {str(e)[:120]}); the file is "
                              "damaged or not part of a Hugging Face checkpoint: download or export it again") from None


def tokenizer_size(path: str | Path) -> int | None:
    """Number of token ids of the tokenizer saved in `path` (max id + 1), or None if there is none."""
    path = Path(path)
    ids: list[int] = []
    tj = path / "tokenizer.json"
    if tj.is_file():
        from tokenizers import Tokenizer

        try:
            ids = list(Tokenizer.from_file(str(tj)).get_vocab(with_added_tokens=True).values())
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ConversionError(f"{tj}: cannot read the tokenizer ({e})") from None
    else:
        vj = path / "vocab.json"
        if vj.is_file():
            ids += list(_read_json(vj).values())
        at = path / "added_tokens.json"
        if at.is_file():
            ids += list(_read_json(at).values())
        tc = path / "tokenizer_config.json"
        if tc.is_file():
            ids += [int(k) for k in _read_json(tc).get("added_tokens_decoder", {})]
    return max(ids) + 1 if ids else None


def config_from_hf(hf: dict, *, source: str = "config.json", tokenizer_vocab: int | None = None,
                   dtype: str | None = None) -> ModelConfig:
    """Map an HF config.json dict to our ModelConfig (see the module docstring for the supported families)."""
    archs = hf.get("architectures") or []
    known = [a for a in archs if a in ARCHITECTURES]
    if not known:
        raise ConversionError(
            f"{source}: architectures={archs!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    arch = ARCHITECTURES[known[0]]

    def need(key):
        if key not in hf:
            raise ConversionError(f"{source}: required key {key!r} is missing")
        return hf[key]

    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{source}: hidden_act={act!r} is not supported (only 'silu' SwiGLU MLPs)")
    if hf.get("use_sliding_window"):
        raise ConversionError(f"{source}: use_sliding_window=true is not supported (full attention only)")
    if hf.get("mlp_bias"):
        raise ConversionError(f"{source}: mlp_bias=true is not supported")
    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = hf.get("head_dim") or hidden // heads
    raw_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype is None:
        # float16 widens to float32 (lossless); our kernels run f32 or bf16.
        dtype = "bfloat16" if raw_dtype == "bfloat16" else "float32"
    if arch == "llama":
        qkv_bias = bool(hf.get("attention_bias", False))
    else:
        qkv_bias = True
    extra = hf.get(EXTRA_KEY) or {}
    vocab = int(need("vocab_size"))
    sample_vocab = extra.get("sample_vocab_size")
    if tokenizer_vocab is not None:
        if tokenizer_vocab > vocab:
            raise ConversionError(
                f"{source}: the tokenizer has {tokenizer_vocab} ids but vocab_size={vocab}: the tokenizer does "
                "not belong to this checkpoint"
            )
        sample_vocab = tokenizer_vocab if tokenizer_vocab < vocab else None
    kw: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        intermediate_size=int(need("intermediate_size")),
        rope_theta=_rope_theta(hf, source),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        eos_token_id=_first_id(hf.get("eos_token_id")),
        pad_token_id=_first_id(hf.get("pad_token_id")),
        sample_vocab_size=sample_vocab,
        dtype=dtype,
        param_dtype=dtype,
        architecture=arch,
    )
    if arch == "dream":
        if hf.get("mask_token_id") is None:
            raise ConversionError(f"{source}: a DreamModel config needs mask_token_id (the [MASK] token id)")
        kw.update(attention="bidirectional", logit_shift=True, mask_token_id=int(hf["mask_token_id"]))
    for key in ("attention", "logit_shift", "block_size", "mask_token_id"):
        if key in extra:
            kw[key] = extra[key]
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        raise ConversionError(f"{source}: {e}") from None


def config_to_hf(cfg: ModelConfig) -> dict:
    """Our ModelConfig as an HF config.json dict (Qwen2ForCausalLM, LlamaForCausalLM or DreamModel)."""
    arch = cfg.architecture if cfg.architecture in HF_ARCH else "qwen2"
    hf: dict[str, Any] = {
        "architectures": [HF_ARCH[arch]],
        "model_type": MODEL_TYPE[arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "dtype": cfg.param_dtype,
        "torch_dtype": cfg.param_dtype,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if arch == "dream":
        # Dream's own (remote-code) config reads the pre-v5 top-level rope keys.
        hf.update(rope_theta=cfg.rope_theta, rope_scaling=None, mask_token_id=cfg.mask_token_id)
    else:
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if arch == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None)
    if arch == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    hf[EXTRA_KEY] = {k: getattr(cfg, k) for k in EXTRA_FIELDS}
    return hf


# --- safetensors ------------------------------------------------------------------------------------------
class _Tensors:
    """Lazy view of the tensors of an HF directory: name -> file, shapes from the headers only."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._open = safe_open
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
            files = sorted({path / f for f in wmap.values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ConversionError(
                f"{str(path)!r} has no *.safetensors files (only safetensors checkpoints are supported; "
                "re-save the model with save_pretrained(..., safe_serialization=True))"
            )
        self.file_of: dict[str, Path] = {}
        self.shape_of: dict[str, tuple] = {}
        for f in files:
            if not f.is_file():
                raise ConversionError(f"{f} is listed in model.safetensors.index.json but does not exist")
            try:
                with safe_open(str(f), framework="np") as h:
                    for k in h.keys():
                        self.file_of[k] = f
                        self.shape_of[k] = tuple(h.get_slice(k).get_shape())
            except Exception as e:  # SafetensorError: truncated header, bad JSON, wrong sizes
                raise ConversionError(f"{f} is not a readable safetensors file ({e}); it is truncated or corrupted") \
                    from None

    def get(self, name: str) -> np.ndarray:
        try:
            with self._open(str(self.file_of[name]), framework="np") as h:
                return h.get_tensor(name)
        except Exception as e:
            raise ConversionError(
                f"cannot read tensor {name} from {self.file_of[name]} ({e}); the file is truncated or corrupted"
            ) from None


def load_hf(path: str | Path, *, dtype: str | None = None) -> Transformer:
    """Convert an HF directory (config.json + safetensors) into a Transformer, one tensor at a time."""
    import jax.numpy as jnp

    path = Path(path)
    check_exists(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{str(path)!r} has no config.json: not a Hugging Face checkpoint directory")
    hf = _read_json(cfg_file)
    if not isinstance(hf, dict):
        raise ConversionError(f"{cfg_file}: must hold a JSON object of model keys, got {type(hf).__name__}")
    cfg = config_from_hf(hf, source=str(cfg_file), tokenizer_vocab=tokenizer_size(path), dtype=dtype)
    tensors = _Tensors(path)
    graphdef_shapes = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
    want = traversals.flatten_mapping(graphdef_shapes)
    mapping = param_mapping(cfg)
    # Check names and shapes from the headers before reading any data.
    for our, name, hook in mapping:
        if name not in tensors.shape_of:
            raise ConversionError(f"tensor {name} is missing from the checkpoint in {str(path)!r}")
        expected = tuple(want[our].shape)
        got = tensors.shape_of[name]
        got_ours = got[::-1] if hook is _t else got
        if got_ours != expected:
            hf_expected = expected[::-1] if hook is _t else expected
            raise ConversionError(
                f"tensor {name} has shape {got} but config.json implies {hf_expected}; "
                "the weights and config.json disagree"
            )
    used = {name for _, name, _ in mapping}
    zero_only = {z.format(i=i) for z in ZERO_ONLY for i in range(cfg.num_layers)}
    unexpected = []
    for name in tensors.shape_of:
        if name in used or name.endswith(IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # some tied checkpoints store the tied copy too; HF ignores it as well
        if name in zero_only:
            if np.any(tensors.get(name) != 0):
                raise ConversionError(f"tensor {name} is non-zero, but biases on o_proj are not supported")
            continue
        unexpected.append(name)
    if unexpected:
        raise ConversionError(
            f"the checkpoint in {str(path)!r} has tensors this converter does not know: "
            f"{', '.join(sorted(unexpected)[:5])}{' ...' if len(unexpected) > 5 else ''}"
        )
    pdt = np.dtype(jax_dtype(cfg.param_dtype))
    params: dict[tuple, Any] = {}
    for our, name, hook in mapping:
        params[our] = jnp.asarray(np.ascontiguousarray(hook(tensors.get(name)).astype(pdt, copy=False)))
    return fill_model(cfg, traversals.unflatten_mapping(params))


def load_pretrained(path: str | Path, *, dtype: str | None = None) -> Transformer:
    """Load one of our model directories or a Hugging Face directory (config.json + *.safetensors).

    dtype: "float32" or "bfloat16" overrides both the compute and parameter dtype of the stored config.
    Returns a Transformer ready for `m(tokens: int32[B, L]) -> float32[B, L, V]` and for `nnx.split`.
    """
    path = epath.Path(path)  # our model directories may be remote (gs://...)
    check_model_path(path)
    if is_model_dir(path):
        return load_model_dir(path, dtype=dtype)
    if (path / "config.json").is_file():
        return load_hf(Path(path), dtype=dtype)  # Hugging Face directories are read locally (safetensors)
    if (path / CONFIG_FILE).is_file():
        return load_model_dir(path, dtype=dtype)  # refused as incomplete, with the reason
    raise CheckpointError(
        f"{str(path)!r} is neither a specdiff-jax model directory ({CONFIG_FILE} + {PARAMS_DIR}/) nor a Hugging "
        "Face checkpoint (config.json + *.safetensors)"
    )


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of a checkpoint directory (those present) into another."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def to_hf(model_or_path: Transformer | str | Path, out_dir: str | Path) -> Path:
    """Write an HF checkpoint (config.json + model.safetensors) of a Transformer or a model directory.

    The result loads in transformers as Qwen2ForCausalLM / LlamaForCausalLM; Dream drafters get Dream's
    config fields (their modeling code is remote code, not part of transformers). Layouts HF cannot express
    (block_causal) are recorded under config.json's "specdiff_jax" key so that the conversion back is exact.
    """
    from safetensors.numpy import save_file

    src = None
    if isinstance(model_or_path, Transformer):
        model = model_or_path
    else:
        src = Path(model_or_path)
        model = load_pretrained(src)
    cfg = model.cfg
    if cfg.attention != "causal" and cfg.architecture != "dream":
        warnings.warn(
            f"exporting a {cfg.attention} model as {HF_ARCH.get(cfg.architecture, 'Qwen2ForCausalLM')}: "
            "transformers will run it causally; the layout is kept in config.json for converting back",
            stacklevel=2,
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output path {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    flat = traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    pdt = np.dtype(jax_dtype(cfg.param_dtype))
    tensors = {}
    for our, name, hook in param_mapping(cfg):
        tensors[name] = np.ascontiguousarray(hook(np.asarray(flat[our])))
    if cfg.architecture == "qwen2" and not cfg.qkv_bias:
        # HF Qwen2 always has q/k/v biases: export zeros.
        for i in range(cfg.num_layers):
            for p, n in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
                tensors[f"model.layers.{i}.self_attn.{p}_proj.bias"] = np.zeros(n * cfg.head_dim, pdt)
    if cfg.architecture == "llama" and cfg.qkv_bias:
        # HF LLaMA's attention_bias also puts a bias on o_proj; ours has none: export zeros.
        for i in range(cfg.num_layers):
            tensors[f"model.layers.{i}.self_attn.o_proj.bias"] = np.zeros(cfg.hidden_size, pdt)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
    if src is not None:
        copy_tokenizer(src, out)
    return out


def from_hf(hf_dir: str | Path, out_dir: str | Path, *, dtype: str | None = None) -> Path:
    """Convert an HF directory into one of our model directories (config + Orbax params + tokenizer files)."""
    model = load_hf(hf_dir, dtype=dtype)
    save_pretrained(model, out_dir, metadata={"converted_from": str(Path(hf_dir).absolute())})
    copy_tokenizer(Path(hf_dir), Path(out_dir))
    return Path(out_dir)
