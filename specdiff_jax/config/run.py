"""Run configuration: YAML defaults + per-model deltas + `key=value` overrides, validated into typed dataclasses.

The MaxText pattern: `configs/defaults.yaml` holds every key with a comment; a per-model file overrides a dozen of
them (and may `include:` / `base:` another file, resolved relative to itself, then to `configs/`); the command line
overrides single keys with dotted names (`model.num_layers=4`, `train.lr=3e-4`). The merged result is validated
into frozen dataclasses, one per section:

    model -> specdiff_jax.config.ModelConfig    data -> DataConfig     train -> TrainConfig
    mesh  -> MeshConfig                         checkpoint -> CheckpointConfig
    generate, calibrate, pair                   bench -> BenchConfig (the decode benchmark)

Errors a user can cause name the key and the fix: an unknown key names the closest valid keys (difflib), a key
given twice on the command line is refused, a type error names the key, the value and the expected type.

Model keys `vocab_size`, `mask_token_id`, `eos_token_id`, `pad_token_id` may be the string `tokenizer`: they are
then read from the tokenizer at `data.tokenizer` (or one passed to `load_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from specdiff_jax.config.model import ConfigError, ModelConfig
from specdiff_jax.sharding import DEFAULT_AXIS_RULES
from specdiff_jax.tokenizer import load_tokenizer

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULTS_PATH = CONFIGS_DIR / "defaults.yaml"
FROM_TOKENIZER = "tokenizer"
TOKENIZER_FIELDS = {
    "vocab_size": "vocab_size",
    "mask_token_id": "mask_id",
    "eos_token_id": "eos_id",
    "pad_token_id": "pad_id",
}
_INCLUDE_KEYS = ("include", "base")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # train.lora_targets


@dataclasses.dataclass(frozen=True)
class DataConfig:
    data_dir: str = "data"
    tokenizer: str = "assets/tiny"
    source_dirs: tuple[str, ...] | None = None
    prepare: bool = True
    val_fraction: float = 0.02
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    val_batches: int = 8
    num_shards: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    objective: Literal["ar", "mdlm", "calibrate"] = "ar"
    steps: int = 1000
    lr: float = 1e-3
    end_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    document_masking: bool = True
    mdlm_t_min: float = 1e-3
    init_from: str | None = None
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    remat: Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"] = "none"
    attention: Literal["auto", "plain", "xla", "cudnn"] = "auto"
    vocab_chunk: int = 0
    log_every: int = 10
    eval_every: int = 200
    progress_bar: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    logical_axis_rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = DEFAULT_AXIS_RULES
    num_devices: int = 0
    device_memory_gb: float = 0.0
    distributed: Literal["auto", "on", "off"] = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = 500
    keep: int = 3
    async_save: bool = True
    export: bool = True


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Verifier samples for calibration (train/generate_data.py, specdiff_jax.data.verifier_data)."""

    verifier: str = "assets/tiny/verifier"
    out_dir: str = "data/verifier_completions"
    num_prompts: int = 2048
    samples_per_prompt: int = 2
    prompt_tokens: int = 64
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    batch_size: int = 32
    seed: int = 0
    validation_fraction: float = 0.05
    on_overlap: Literal["skip", "error"] = "skip"
    prompts_file: str | None = None
    eval_files: tuple[str, ...] = ()
    progress_bar: bool = True


@dataclasses.dataclass(frozen=True)
class CalibrateConfig:
    """Streak distillation and its baselines (train/calibrate.py, specdiff_jax.calibration)."""

    loss: Literal["streak", "ce_streak", "kd_first", "kd_window", "mdlm"] = "streak"
    data_dir: str = "data/verifier_completions"
    verifier: str | None = "assets/tiny/verifier"
    gamma: int | None = None
    stride: int = 1
    windows_per_row: int = 0
    temperature: float = 1.0
    verifier_temperature: float = 1.0
    draft_window: int = 512
    eval_prompts: int = 16
    eval_max_new_tokens: int = 128


@dataclasses.dataclass(frozen=True)
class PairConfig:
    """A drafter/verifier pair at scale: the verifier's architecture and the decode shapes of dry runs."""

    verifier_config: str | None = None
    batch_size: int = 1
    prompt_tokens: int = 1024
    max_new_tokens: int = 1024
    gamma: int = 32
    num_drafts: int = 8
    draft_window: int = 512


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """The decode benchmark (eval/benchmark.py); its own files hold a `bench:` section (configs/bench/)."""

    verifier: str = "assets/tiny/verifier"
    tokenizer: str = "assets/tiny"
    sps_drafter: str = "assets/tiny/drafter_ar"
    specdiff_drafter: str = "assets/tiny/drafter_base"
    specdiff2_drafter: str = "by_temperature"  # or a path; see configs/defaults.yaml
    methods: tuple[str, ...] = ("ar", "sps", "specdiff", "specdiff2", "auto", "hf_generate", "hf_assisted")
    humaneval_prompts: int = 8
    validation_prompts: int = 0
    validation_file: str = "assets/tiny/val_snippets.jsonl"
    max_prompt_tokens: int = 256
    max_new_tokens: int = 128
    temperatures: tuple[float, ...] = (0.0, 1.0)
    batch_sizes: tuple[int, ...] = (1,)
    repeats: int = 2
    seed: int = 0
    sps_gamma: int = 4
    sps_draft_temperature: float | None = None
    specdiff_gamma: int = 16
    specdiff_draft_temperature: float | None = None
    specdiff2_gamma: int = 16
    specdiff2_num_drafts: int = 4
    specdiff2_draft_temperature: float | None = None
    specdiff2_rules: tuple[str, ...] = ("multi_draft", "delta")
    denoise_steps: int = 1
    auto_max_gamma: int = 16
    auto_adaptive_gamma: bool = False
    sweep_gamma: tuple[int, ...] = ()
    sweep_num_drafts: tuple[int, ...] = ()
    sweep_draft_temperature: tuple[float, ...] = ()
    sweep_denoise_steps: tuple[int, ...] = ()
    sweep_mode: Literal["grid", "one_at_a_time"] = "grid"
    sweep_temperatures: tuple[float, ...] = (0.0,)
    sweep_prompts: int = 4
    scaling_batches: tuple[int, ...] = ()
    scaling_prefixes: tuple[int, ...] = ()
    budgets_s: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    pass_at_1: bool = False
    threads: int = 0
    progress_bar: bool = True
    mesh: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    workdir: str | None = None
    generate: GenerateConfig = GenerateConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    pair: PairConfig = PairConfig()
    bench: BenchConfig = BenchConfig()

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def replace(self, **sections) -> "RunConfig":
        return dataclasses.replace(self, **sections)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "mesh": MeshConfig,
    "checkpoint": CheckpointConfig,
    "generate": GenerateConfig,
    "calibrate": CalibrateConfig,
    "pair": PairConfig,
    "bench": BenchConfig,
}
TOP_LEVEL = ("workdir",)


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def valid_keys() -> list[str]:
    """Every dotted key a config may set."""
    keys = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    return keys + list(TOP_LEVEL)


def _unknown(key: str, source: str) -> ConfigError:
    keys = valid_keys()
    last = key.rsplit(".", 1)[-1]
    lasts = [k.rsplit(".", 1)[-1] for k in keys]
    close = [k for k in keys if k.rsplit(".", 1)[-1] == last]  # right name, wrong section
    close += [k for k in difflib.get_close_matches(key, keys, n=3, cutoff=0.6) if k not in close]
    if not close:  # a wrong section and a misspelt name: match on the name alone
        near = set(difflib.get_close_matches(last, lasts, n=3, cutoff=0.75))
        close = [k for k, n in zip(keys, lasts) if n in near]
    close = close[:3]
    hint = f"; did you mean {' or '.join(close)}?" if close else "; see configs/defaults.yaml for the valid keys"
    return ConfigError(f"unknown config key {key!r} (from {source}){hint}")


# --- reading YAML -------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML file (see configs/)")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}); pass a "
                          "YAML config such as configs/models/tiny_verifier.yaml") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(d).__name__}")
    return d


def _resolve_include(ref: str, here: Path) -> Path:
    for cand in (here.parent / ref, CONFIGS_DIR / ref, Path(ref)):
        if cand.is_file():
            return cand.resolve()
    raise ConfigError(f"config {str(here)!r} includes {ref!r}, which was found neither next to it nor under "
                      f"{CONFIGS_DIR}; fix the include path")


def _flatten(d: dict, source: str, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """Nested mapping -> {dotted key: (value, source)}; sections are the only nesting level."""
    out: dict[str, tuple[Any, str]] = {}
    for k, v in d.items():
        if not isinstance(k, str):
            raise ConfigError(f"config key {k!r} in {source} must be a string")
        key = f"{prefix}{k}"
        if not prefix and k in SECTIONS:
            if v is None:
                continue
            if not isinstance(v, dict):
                raise ConfigError(f"config section {k!r} in {source} must be a mapping, got {v!r}")
            out.update(_flatten(v, source, prefix=f"{k}."))
        else:
            out[key] = (v, source)
    return out


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, tuple[Any, str]]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config include cycle: {chain}; remove one of the includes")
    raw = _read_yaml(path)
    refs = []
    for ik in _INCLUDE_KEYS:
        ref = raw.pop(ik, None)
        if ref is not None:
            refs.extend([ref] if isinstance(ref, str) else list(ref))
    merged: dict[str, tuple[Any, str]] = {}
    for ref in refs:
        merged.update(_load_chain(_resolve_include(str(ref), path), (*seen, path)))
    merged.update(_flatten(raw, str(path)))
    return merged


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> tuple[dict[str, tuple[Any, str]], dict[str, str]]:
    """`["train.lr=3e-4", ...]` -> ({dotted key: (value, "command line")}, {dotted key: raw text}).

    Values are parsed as YAML (`null`, `true`, `[1, 2]`); a key given twice is an error.
    """
    flat: dict[str, tuple[Any, str]] = {}
    raws: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command-line override {item!r} is not of the form key=value "
                              "(e.g. train.lr=3e-4 or model.num_layers=4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key in flat:
            raise ConfigError(f"config key {key!r} is overridden twice on the command line "
                              f"({key}={raws[key]} and {key}={raw}); give it once")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        flat[key] = (value, "command line")
        raws[key] = raw
    return flat, raws


# --- typing -------------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "any"
        return f"list of {inner}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value, tp, raw: str | None = None):
    """Return `value` converted to type `tp`, or raise _Mismatch. `raw` is the command-line text, if any."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, raw)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(args) != len(value):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if raw is not None and not isinstance(value, (dict, list)) and value is not None:
            return raw
        raise _Mismatch
    if value is None or not isinstance(value, tp):
        raise _Mismatch
    return value


def _build_section(name: str, cls: type, flat: dict[str, tuple[Any, str]], raws: dict[str, str]):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{name}.{f.name}"
        if key not in flat:
            continue
        value, source = flat[key]
        if name == "model" and f.name in TOKENIZER_FIELDS and value == FROM_TOKENIZER:
            kwargs[f.name] = value
            continue
        try:
            kwargs[f.name] = _coerce(value, hints[f.name], raws.get(key))
        except _Mismatch:
            raise ConfigError(f"config key {key}={value!r} (from {source}) has the wrong type: expected "
                              f"{_type_name(hints[f.name])}, got {type(value).__name__}") from None
    return kwargs


# --- public API ---------------------------------------------------------------------------------------


def merged_flat(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
                ) -> tuple[dict[str, tuple[Any, str]], dict[str, str]]:
    """Defaults file <- config file chain <- overrides, as ({dotted key: (value, source)}, {key: raw CLI text}).

    Unknown keys are refused here, naming the closest valid ones.
    """
    flat: dict[str, tuple[Any, str]] = {}
    if DEFAULTS_PATH.is_file():
        flat.update(_flatten(_read_yaml(DEFAULTS_PATH), str(DEFAULTS_PATH)))
    if path is not None:
        flat.update(_load_chain(Path(path)))
    cli, raws = parse_overrides(list(overrides))
    flat.update(cli)
    known = set(valid_keys())
    for key, (_, source) in flat.items():
        if key not in known:
            raise _unknown(key, source)
    return flat, raws


def load_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    tokenizer=None,
) -> RunConfig:
    """Read, merge and validate a run configuration.

    path: a YAML file (or None for the defaults alone); overrides: `key=value` strings with dotted keys;
    tokenizer: fills model keys set to `tokenizer` (otherwise loaded from `data.tokenizer` when needed).
    """
    flat, raws = merged_flat(path, overrides)
    sections = {name: _build_section(name, cls, flat, raws) for name, cls in SECTIONS.items()}
    top = {}
    if "workdir" in flat:
        value, source = flat["workdir"]
        try:
            top["workdir"] = _coerce(value, str | None, raws.get("workdir"))
        except _Mismatch:
            raise ConfigError(f"config key workdir={value!r} (from {source}) must be a path string") from None

    model_kw = sections["model"]
    pending = [k for k, v in model_kw.items() if k in TOKENIZER_FIELDS and v == FROM_TOKENIZER]
    if pending:
        if tokenizer is None:
            tokenizer = _load_tokenizer(sections["data"].get("tokenizer", DataConfig.tokenizer), pending)
        for k in pending:
            model_kw[k] = int(getattr(tokenizer, TOKENIZER_FIELDS[k]))

    data = DataConfig(**sections["data"])
    train = TrainConfig(**sections["train"])
    mesh = MeshConfig(**sections["mesh"])
    ckpt = CheckpointConfig(**sections["checkpoint"])
    model = ModelConfig(**model_kw)
    cfg = RunConfig(model=model, data=data, train=train, mesh=mesh, checkpoint=ckpt, **top,
                 generate=GenerateConfig(**sections["generate"]), calibrate=CalibrateConfig(**sections["calibrate"]),
                 pair=PairConfig(**sections["pair"]), bench=BenchConfig(**sections["bench"]))
    validate(cfg)
    return cfg


def load_section(name: str, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()):
    """One section of the config system alone (e.g. "bench" for eval/benchmark.py), typed and validated like a
    full config: defaults <- the file's `name:` section <- overrides. Overrides may drop the section prefix
    (`methods=[ar]` for `bench.methods=[ar]`)."""
    overrides = [o if "=" not in o or "." in o.split("=", 1)[0] else f"{name}.{o}" for o in overrides]
    flat, raws = merged_flat(path, overrides)
    return SECTIONS[name](**_build_section(name, SECTIONS[name], flat, raws))


def _load_tokenizer(path: str, keys: list[str]):
    try:
        return load_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - any failure to read it is the user's path
        raise ConfigError(
            f"model keys {', '.join('model.' + k for k in keys)} are read from the tokenizer, but "
            f"data.tokenizer={path!r} could not be loaded ({type(e).__name__}: {e}); train a tokenizer first "
            "or set data.tokenizer=<path> (or give the model keys as numbers)") from None


def validate(cfg: RunConfig) -> None:
    """Cross-field checks; every failure names the key and the fix."""
    m, d, t, c = cfg.model, cfg.data, cfg.train, cfg.checkpoint

    def bad(key, value, fix):
        raise ConfigError(f"config key {key}={value!r} is invalid: {fix}")

    if d.seq_len <= 1:
        bad("data.seq_len", d.seq_len, "must be at least 2")
    if d.seq_len > m.max_seq_len:
        bad("data.seq_len", d.seq_len, f"exceeds the model's max_seq_len={m.max_seq_len}; lower data.seq_len or "
            "raise model.max_seq_len")
    for key, v in (("data.batch_size", d.batch_size), ("train.steps", t.steps), ("train.grad_accum", t.grad_accum),
                   ("train.log_every", t.log_every), ("train.eval_every", t.eval_every),
                   ("checkpoint.save_every", c.save_every), ("checkpoint.keep", c.keep)):
        if v <= 0:
            bad(key, v, "must be a positive integer")
    for key, v in (("data.val_batches", d.val_batches), ("train.warmup_steps", t.warmup_steps)):
        if v < 0:
            bad(key, v, "must be >= 0")
    if not 0 < d.val_fraction < 1:
        bad("data.val_fraction", d.val_fraction, "must be in (0, 1)")
    if t.lr <= 0:
        bad("train.lr", t.lr, "must be positive")
    if not 0 <= t.end_lr_ratio <= 1:
        bad("train.end_lr_ratio", t.end_lr_ratio, "must be in [0, 1]")
    if not 0 < t.mdlm_t_min < 1:
        bad("train.mdlm_t_min", t.mdlm_t_min, "must be in (0, 1)")
    if t.vocab_chunk < 0:
        bad("train.vocab_chunk", t.vocab_chunk, "must be >= 0 (0 = full logits)")
    if t.grad_clip < 0:
        bad("train.grad_clip", t.grad_clip, "must be >= 0 (0 disables clipping)")
    if t.lora_rank < 0:
        bad("train.lora_rank", t.lora_rank, "must be >= 0 (0 = full fine-tuning)")
    if t.lora_rank > 0 and not t.init_from:
        bad("train.lora_rank", t.lora_rank, "LoRA adapts a pre-trained model: set train.init_from=<model dir> "
            "(or train.lora_rank=0 to train every parameter)")
    if t.lora_rank > 0 and not t.lora_alpha > 0:
        bad("train.lora_alpha", t.lora_alpha, "must be positive (the adapter scale is lora_alpha / lora_rank)")
    if t.objective == "mdlm":
        if m.attention != "block_causal":
            bad("model.attention", m.attention, "the mdlm objective trains block_causal drafters; set "
                "model.attention=block_causal (or train.objective=ar)")
        if m.mask_token_id is None:
            bad("model.mask_token_id", None, "the mdlm objective needs a mask token")
    if t.objective == "calibrate":  # the model section comes from train.init_from (calibration.run.resolve checks it)
        _validate_calibrate(cfg, bad)
    _validate_generate(cfg, bad)
    if t.objective == "ar" and m.attention != "causal":
        bad("model.attention", m.attention, "the ar objective trains causal models; set model.attention=causal "
            "(or train.objective=mdlm)")
    sizes = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
    for k, v in sizes.items():
        if v == 0 or v < -1:
            bad(f"mesh.{k}", v, "must be a positive integer or -1 (the rest of the devices)")
    if sum(v == -1 for v in sizes.values()) > 1:
        bad("mesh", sizes, "at most one mesh axis may be -1")
    _validate_scale(cfg, bad)
    for rule in cfg.mesh.logical_axis_rules:
        axes = rule[1] if isinstance(rule[1], tuple) else (rule[1],)
        for a in axes:
            if a is not None and a not in sizes:
                bad("mesh.logical_axis_rules", list(rule), f"mesh axis {a!r} is not one of {list(sizes)}")


def _validate_scale(cfg: RunConfig, bad) -> None:
    ms, p = cfg.mesh, cfg.pair
    for k in ("dcn_data", "dcn_fsdp", "dcn_tensor"):
        if getattr(ms, k) < 1:
            bad(f"mesh.{k}", getattr(ms, k), "must be a positive integer (slices along this axis; 1 = one slice)")
    if ms.num_devices < 0:
        bad("mesh.num_devices", ms.num_devices, "must be >= 0 (0 = the real devices; N = an abstract mesh of N)")
    if ms.device_memory_gb < 0:
        bad("mesh.device_memory_gb", ms.device_memory_gb, "must be >= 0 (0 = the device's own figure, if known)")
    if ms.num_processes is not None and ms.num_processes < 1:
        bad("mesh.num_processes", ms.num_processes, "must be a positive integer (or null)")
    if ms.process_id is not None and not 0 <= ms.process_id < (ms.num_processes or ms.process_id + 1):
        bad("mesh.process_id", ms.process_id, "must be in [0, mesh.num_processes)")
    if cfg.data.num_shards < 0:
        bad("data.num_shards", cfg.data.num_shards, "must be >= 0 (0 = one shard per process)")
    for k in ("batch_size", "prompt_tokens", "max_new_tokens", "gamma", "num_drafts", "draft_window"):
        if getattr(p, k) < 1:
            bad(f"pair.{k}", getattr(p, k), "must be a positive integer")


def _validate_generate(cfg: RunConfig, bad) -> None:
    g = cfg.generate
    for key in ("num_prompts", "samples_per_prompt", "prompt_tokens", "max_new_tokens", "batch_size"):
        if getattr(g, key) <= 0:
            bad(f"generate.{key}", getattr(g, key), "must be a positive integer")
    if g.temperature < 0:
        bad("generate.temperature", g.temperature, "must be >= 0 (0 = greedy)")
    if not 0 < g.top_p <= 1:
        bad("generate.top_p", g.top_p, "must be in (0, 1] (1 = off)")
    if g.top_k < 0:
        bad("generate.top_k", g.top_k, "must be >= 0 (0 = off)")
    if not 0 <= g.validation_fraction < 1:
        bad("generate.validation_fraction", g.validation_fraction, "must be in [0, 1)")


def _validate_calibrate(cfg: RunConfig, bad) -> None:
    c = cfg.calibrate
    for key in ("stride", "eval_max_new_tokens", "draft_window"):
        if getattr(c, key) <= 0:
            bad(f"calibrate.{key}", getattr(c, key), "must be a positive integer")
    for key in ("windows_per_row", "eval_prompts"):
        if getattr(c, key) < 0:
            bad(f"calibrate.{key}", getattr(c, key), "must be >= 0")
    if c.gamma is not None and c.gamma <= 0:
        bad("calibrate.gamma", c.gamma, "must be a positive integer (or null = model.block_size)")
    if not c.temperature > 0:
        bad("calibrate.temperature", c.temperature, "must be > 0 (the drafter's inference temperature)")
    if c.verifier_temperature < 0:
        bad("calibrate.verifier_temperature", c.verifier_temperature, "must be >= 0 (0 = argmax teacher)")
    if c.loss in ("kd_first", "kd_window") and not c.verifier:
        bad("calibrate.verifier", c.verifier, f"calibrate.loss={c.loss} distils the verifier: set its model dir")


class _Dumper(yaml.SafeDumper):
    """Mappings in block style (one key per line), lists inline (`[batch, [data, fsdp]]`)."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def to_yaml(cfg: RunConfig) -> str:
    return yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config; `load_config(path)` reads it back to an equal RunConfig."""
    from etils import epath  # the work dir may be remote (gs://...)

    epath.Path(path).write_text("# Resolved run configuration (written by specdiff_jax.config.run)\n" + to_yaml(cfg))


class NoTokenizer:
    """Model keys left at `tokenizer` in a config: a dry run or a compile-only child reads no tokenizer files."""

    def __getattr__(self, name):
        raise ConfigError("pair.verifier_config must give vocab_size / eos / pad ids as numbers for a dry run")
