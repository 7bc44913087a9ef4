"""Our model-directory format: save and load a `Transformer` without materialising a random init.

A model directory holds
  model_config.json  ModelConfig.save
  params/            Orbax checkpoint of the pure dict of the model's nnx.Param state
  metadata.json      optional free-form dict (training step, provenance, ...)
plus, when converted from HF, the tokenizer files of the source.

This module knows nothing of other formats: `specdiff_jax.hf_checkpoint` (Hugging Face) sits above it, and
`specdiff_jax.load_pretrained` takes either kind of directory. Restoring goes through an abstract model
(`nnx.eval_shape`), so parameters are allocated once, by the restore itself: a 7B checkpoint does not need twice
its memory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
from etils import epath
from flax import nnx
from flax.nnx import traversals

from specdiff_jax.config import ModelConfig
from specdiff_jax.model import Transformer, abstract_model

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
METADATA_FILE = "metadata.json"


class CheckpointError(ValueError):
    """A checkpoint a user pointed us at is missing, of an unknown kind, or damaged; the message says which."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The given checkpoint path does not exist."""


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def check_exists(path: Path) -> None:
    """CheckpointNotFoundError naming `path` when it does not exist."""
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint path {str(path)!r} does not exist; check the path")


def check_model_path(path: Path) -> None:
    """A model path must exist and be a directory; the error names the path and the fix."""
    check_exists(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {str(path)!r} is a file; pass the model directory that holds it")


def _abs(path) -> epath.Path:
    """`path` (str / PathLike / epath, local or gs://...) as an epath.Path; local ones made absolute, because
    Orbax 0.12 cannot read the item metadata of a checkpoint named by a relative path."""
    p = epath.Path(path)
    return p if str(p).startswith(("gs://", "s3://", "az://", "hf://")) else p.absolute()


def is_model_dir(path: str | Path) -> bool:
    p = epath.Path(path)
    return (p / CONFIG_FILE).is_file() and (p / PARAMS_DIR).is_dir()


def fill_model(cfg: ModelConfig, params: dict) -> Transformer:
    """Build a Transformer of `cfg` from a pure dict of parameter arrays (no random init is materialised).

    The dict must hold every parameter with the right shape; keys follow `nnx.to_pure_dict` of the model.
    """
    graphdef, state = nnx.split(abstract_model(cfg))
    flat_target = traversals.flatten_mapping(nnx.to_pure_dict(state))
    flat_given = traversals.flatten_mapping(params)
    norm = lambda k: tuple(str(p) for p in k)  # noqa: E731  orbax gives "0" where the model has 0
    given = {norm(k): v for k, v in flat_given.items()}
    for k, target in flat_target.items():
        if norm(k) not in given:
            raise CheckpointError(f"parameter {_path_str(k)} is missing from the checkpoint")
        if tuple(given[norm(k)].shape) != tuple(target.shape):
            raise CheckpointError(
                f"parameter {_path_str(k)} has shape {tuple(given[norm(k)].shape)} in the checkpoint but the "
                f"model config needs {tuple(target.shape)}; the checkpoint and model_config.json disagree"
            )
    extra = sorted(set(given) - {norm(k) for k in flat_target})
    if extra:
        raise CheckpointError(
            f"checkpoint holds parameters the model config does not have: {', '.join(map(_path_str, extra[:5]))}"
        )
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------------
def save_pretrained(model: Transformer, path: str | Path, *, metadata: dict | None = None) -> None:
    """Write `model` as one of our model directories at `path` (created; an existing params/ is replaced)."""
    import orbax.checkpoint as ocp

    path = _abs(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot save a model to {str(path)!r}: it exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    model.cfg.save(path / CONFIG_FILE)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / PARAMS_DIR, params, force=True)
    ckptr.wait_until_finished()
    ckptr.close()
    if metadata is not None:
        (path / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")


def load_metadata(path: str | Path) -> dict:
    """The metadata.json of one of our model directories ({} if there is none)."""
    p = epath.Path(path) / METADATA_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def load_params(path: str | Path, abstract_state: Any) -> Any:
    """Restore the params/ of a model directory into the structure of `abstract_state`.

    abstract_state: an nnx.State (or pure dict) of parameters whose leaves are arrays or jax.ShapeDtypeStruct;
    a leaf's `sharding`, if set, is where the restored array is placed (restore onto another topology).
    Returns the same kind of object with the restored arrays. Shapes are checked first, naming any mismatch.
    """
    import orbax.checkpoint as ocp

    path = _abs(path)
    params_dir = path / PARAMS_DIR if (path / PARAMS_DIR).is_dir() else path
    check_exists(params_dir)
    is_state = isinstance(abstract_state, nnx.State)
    pure = nnx.to_pure_dict(abstract_state) if is_state else abstract_state

    # Without a target sharding orbax would reuse the stored one, which names the saving machine's devices.
    default_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def to_abstract(x):
        sharding = getattr(x, "sharding", None) or default_sharding
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    target = jax.tree_util.tree_map(to_abstract, pure)
    ckptr = ocp.StandardCheckpointer()
    try:
        stored = ckptr.metadata(params_dir).item_metadata.tree
    except Exception as e:  # orbax raises assorted types on damaged metadata
        raise CheckpointError(
            f"cannot read the parameter checkpoint in {str(params_dir)!r} ({type(e).__name__}: {e}); "
            "it is truncated or corrupted: re-save or re-convert the model"
        ) from None
    flat_stored = {tuple(str(p) for p in k): v for k, v in traversals.flatten_mapping(stored).items()}
    flat_target = traversals.flatten_mapping(target)
    for k, t in flat_target.items():
        sk = tuple(str(p) for p in k)
        if sk not in flat_stored:
            raise CheckpointError(f"parameter {_path_str(k)} is missing from the checkpoint {str(params_dir)!r}")
        shape = tuple(getattr(flat_stored[sk], "shape", ()) or ())
        if shape != tuple(t.shape):
            raise CheckpointError(
                f"parameter {_path_str(k)} has shape {shape} in {str(params_dir)!r} but the model needs "
                f"{tuple(t.shape)}; the checkpoint and its model config disagree"
            )
    try:
        restored = ckptr.restore(params_dir, target)
    except Exception as e:
        raise CheckpointError(
            f"cannot restore the parameters in {str(params_dir)!r} ({type(e).__name__}: {str(e)[:300]}); "
            "the checkpoint is truncated or corrupted: re-save or re-convert the model"
        ) from None
    finally:
        ckptr.close()
    if is_state:
        nnx.replace_by_pure_dict(abstract_state, restored)
        return abstract_state
    return restored


def _with_dtype(cfg: ModelConfig, dtype: str | None) -> ModelConfig:
    return cfg if dtype is None else dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)


def load_model_dir(path: str | Path, *, dtype: str | None = None) -> Transformer:
    """Load one of our model directories (model_config.json + params/).

    dtype: "float32" or "bfloat16" overrides both the compute and parameter dtype of the stored config.
    Returns a Transformer ready for `m(tokens: int32[B, L]) -> float32[B, L, V]` and for `nnx.split`.
    """
    path = epath.Path(path)
    check_model_path(path)
    if not is_model_dir(path):
        if (path / CONFIG_FILE).is_file():
            raise CheckpointError(
                f"{str(path)!r} has {CONFIG_FILE} but no {PARAMS_DIR}/ directory: the checkpoint is incomplete"
            )
        raise CheckpointError(f"{str(path)!r} is not a specdiff-jax model directory ({CONFIG_FILE} + {PARAMS_DIR}/)")
    cfg = _with_dtype(ModelConfig.load(path / CONFIG_FILE), dtype)
    graphdef, abstract = nnx.split(abstract_model(cfg))
    state = load_params(path, abstract)  # orbax casts to the target dtype while restoring
    return nnx.merge(graphdef, state)
