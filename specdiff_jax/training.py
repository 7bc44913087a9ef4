"""The pre-training loop: one jitted, sharded train step; Orbax checkpoints with exact resume.

Train state (a plain dict pytree, the unit of checkpointing):
    params     pure dict of the model's nnx.Param arrays (`nnx.to_pure_dict`), sharded by logical axes
    opt_state  optax AdamW state (moments sharded like the parameters)
    step       int32 scalar, optimizer updates done
    rng        uint32[2] base key; step s uses fold_in(rng, s), so resuming needs nothing but the step

`train_step(state, batch) -> (state, metrics)` is one pure function jitted with in/out shardings over the mesh
(1 device here, the same code on many) and donated state; gradient accumulation is a `lax.scan` over the
micro-batches of `batch["tokens"]: int32[A, B, L]`.

Checkpoints (`<workdir>/checkpoints/<step>/`) hold the train state, the data iterator state (JSON) and run
metadata; resuming restores all of them, so an interrupted run continues with exactly the losses it would have
had. SIGTERM / SIGINT finish the current step, save and return; a non-finite loss or gradient stops the run before
anything is saved, naming the step and the last good checkpoint (which is kept).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from specdiff_jax import sharding as shd
from specdiff_jax.config import ConfigError
from specdiff_jax.configs import Config, save_config, validate
from specdiff_jax.model import Transformer
from specdiff_jax.objectives import make_objective

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"


class TrainingError(RuntimeError):
    """The run cannot continue (diverged, incompatible checkpoint, busy work dir); the message says why and what to do."""


class TrainingDiverged(TrainingError):
    """Loss or gradient became NaN/inf; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class Hooks:
    """Callbacks at the program edge (tests, notebooks). on_step_end(step, metrics: dict of floats)."""

    on_step_end: Callable[[int, dict], None] | None = None


@dataclasses.dataclass
class TrainResult:
    status: str  # "completed" | "interrupted"
    step: int
    losses: dict[int, float]  # per step run in this invocation
    val: dict[str, float]  # last validation metrics ({} if none)
    checkpoint: str | None  # last saved checkpoint directory
    export: str | None


# --- optimizer ----------------------------------------------------------------------------------------


def lr_schedule(tc) -> optax.Schedule:
    """Linear warm-up from 0 to tc.lr over tc.warmup_steps, then cosine decay to tc.lr * tc.end_lr_ratio."""
    warm = min(tc.warmup_steps, max(tc.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=warm, decay_steps=max(tc.steps, warm + 1),
        end_value=tc.lr * tc.end_lr_ratio)


def make_optimizer(tc) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (weight decay on matrices only, not on norms and biases)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                        mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw) if tc.grad_clip > 0 else adamw


# --- state and step -----------------------------------------------------------------------------------


def abstract_model(cfg: Config) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))))


def init_state(cfg: Config, tx, params: dict | None = None) -> dict:
    """A fresh train state (call under jit with out_shardings to place it). params: start from these instead."""
    if params is None:
        model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(cfg.train.seed + 1),
    }


def state_shardings(cfg: Config, mesh, tx, abstract_param_state: nnx.State, state_shapes: dict,
                    param_sh: dict | None = None) -> dict:
    """Shardings of the train state; `param_sh` overrides the trained parameters' (LoRA adapters)."""
    p_sh = param_sh if param_sh is not None else shd.param_shardings(abstract_param_state, mesh,
                                                                      cfg.mesh.logical_axis_rules)
    rep = shd.replicated(mesh)
    return {
        "params": p_sh,
        "opt_state": shd.opt_state_shardings(tx, state_shapes["opt_state"], p_sh, mesh),
        "step": rep,
        "rng": rep,
    }


def _model_params(params, frozen, lora_scale):
    """The full parameters the model runs with: `params` (full training) or base + LoRA adapters."""
    if frozen is None:
        return params
    from specdiff_jax import lora

    return lora.merge(frozen, params, lora_scale)


def _objective_call(objective, model, batch, rng, aux):
    """`objective(model, batch, rng)`, or `objective(model, batch, rng, aux)` for objectives with inputs of their
    own (`objective.aux`, e.g. a frozen teacher's parameters; see calibration.make_objective)."""
    if getattr(objective, "aux", None) is not None:
        return objective(model, batch, rng, aux)
    return objective(model, batch, rng)


def make_train_step(graphdef, objective, tx, schedule, lora_scale: float | None = None) -> Callable:
    """`train_step(state, batch, frozen=None, aux=None) -> (state, metrics)`, batch tokens/segment_ids
    int32[A, B, L] (A micro-batches). With LoRA, state["params"] are the adapters and `frozen` the base parameters
    (an input, never differentiated); the model is base + lora_scale * A @ B. `aux` is the objective's own input
    (the pure dict of `objective.aux`, an nnx state such as the KD teacher's): an argument of the step, so it is
    sharded like any input and never baked into the compiled program as constants."""

    def loss_fn(params, batch, rng, frozen, aux):
        return _objective_call(objective, nnx.merge(graphdef, _model_params(params, frozen, lora_scale)), batch,
                               rng, aux)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch, frozen=None, aux=None):
        params = state["params"]
        A = batch["tokens"].shape[0]
        rngs = jax.random.split(jax.random.fold_in(state["rng"], state["step"]), A)

        def micro(acc, xs):
            b, r = xs
            (_, m), g = grad_fn(params, b, r, frozen, aux)
            return jax.tree.map(jnp.add, acc, g), m

        if A == 1:  # no loop: the common case compiles faster
            (_, m), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch), rngs[0], frozen, aux)
            ms = jax.tree.map(lambda x: x[None], m)
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, ms = jax.lax.scan(micro, zeros, (batch, rngs))
            grads = jax.tree.map(lambda g: g / A, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        metrics = {k: (v.sum() if k == "tokens" else v.mean()) for k, v in ms.items()}
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["lr"] = schedule(state["step"])
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, objective, lora_scale: float | None = None) -> Callable:
    """`eval_step(params, batch[B, L], rng, frozen=None, aux=None) -> (sum of per-token loss, token count)`."""

    def eval_step(params, batch, rng, frozen=None, aux=None):
        _, m = _objective_call(objective, nnx.merge(graphdef, _model_params(params, frozen, lora_scale)), batch,
                               rng, aux)
        return m["loss"] * m["tokens"], m["tokens"]

    return eval_step


@dataclasses.dataclass(frozen=True)
class Programs:
    """The jitted pure functions of a run and the shardings they use (built once per config and mesh)."""

    graphdef: Any
    tx: Any
    shapes: Any  # train-state pytree of jax.ShapeDtypeStruct
    state_sh: Any  # train-state pytree of NamedSharding
    batch_sh: Any  # [A, B, L] micro-batch stack
    val_sh: Any  # [B, L]
    init: Callable  # init() or init(params) -> state
    train_step: Callable  # (state, batch, frozen[, aux]) -> (state, metrics); state donated; frozen None or LoRA base
    eval_step: Callable  # (params, batch, rng, frozen[, aux]) -> (loss sum, tokens); aux only when aux_sh is set
    frozen_sh: Any = None  # LoRA: shardings of the frozen base parameters (None: full training)
    lora_scale: float | None = None  # LoRA: lora_alpha / lora_rank
    aux_sh: Any = None  # shardings of the objective's own input (objective.aux; None: it has none)


def programs(cfg: Config, mesh, objective: Callable | None = None) -> Programs:
    """Jitted init / train / eval functions for `cfg` on `mesh`, memoised in-process (compiles are slow on CPU).

    objective: a custom `f(model, batch, rng) -> (loss, metrics)` (e.g. a calibration loss) instead of the one
    named by train.objective; it is part of the memo key.
    """
    from specdiff_jax import objectives

    # Fields that do not change the compiled programs are normalised out of the memo key.
    tc = dataclasses.replace(cfg.train, log_every=1, eval_every=1, progress_bar=True, init_from=None)
    if objective is not None:
        return _programs(cfg.model, tc, cfg.mesh, mesh, objective, custom=True)
    return _programs(cfg.model, tc, cfg.mesh, mesh, objectives.OBJECTIVES[tc.objective])


@functools.lru_cache(maxsize=8)
def _programs(model_cfg, tc, mesh_cfg, mesh, objective_impl, custom: bool = False) -> Programs:
    cfg = Config(model=model_cfg, train=tc, mesh=mesh_cfg)
    tx = make_optimizer(tc)
    schedule = lr_schedule(tc)
    graphdef, abstract = abstract_model(cfg)
    rules = mesh_cfg.logical_axis_rules
    frozen_sh, param_sh, lora_scale, fresh_params = None, None, None, None
    if tc.lora_rank > 0:  # train adapters only; the base parameters are a frozen input of the step
        from specdiff_jax import lora

        frozen_sh = shd.param_shardings(abstract, mesh, rules)
        base_shapes = nnx.to_pure_dict(abstract)
        lora_scale = tc.lora_alpha / tc.lora_rank
        fresh_params = lambda: lora.init(jax.random.PRNGKey(tc.seed + 3), base_shapes,  # noqa: E731
                                         tc.lora_targets, tc.lora_rank)
        ad_shapes = jax.eval_shape(fresh_params)
        ad_axes = lora.logical_axes(shd.param_logical_axes(abstract), ad_shapes)
        param_sh = jax.tree.map(lambda ax, a: shd.logical_sharding(mesh, rules, ax, a.shape), ad_axes, ad_shapes,
                                is_leaf=lambda x: isinstance(x, tuple))
    shapes = jax.eval_shape(lambda: init_state(cfg, tx, None if fresh_params is None else fresh_params()))
    st_sh = state_shardings(cfg, mesh, tx, abstract, shapes, param_sh)
    batch_sh = shd.batch_sharding(mesh, rules, 3, leading=1)
    val_sh = shd.batch_sharding(mesh, rules, 2)
    rep = shd.replicated(mesh)
    objective = objective_impl if custom else make_objective(tc)  # built-in ones: the impl is the key only
    aux_sh = None
    if getattr(objective, "aux", None) is not None:  # e.g. a KD teacher: placed by its own logical axes
        aux_sh = shd.param_shardings(objective.aux, mesh, rules)
    aux_in = () if aux_sh is None else (aux_sh,)  # objectives without an input keep the 3-argument step
    init_fresh = jax.jit(lambda: init_state(cfg, tx, None if fresh_params is None else fresh_params()),
                         out_shardings=st_sh)
    init_from = jax.jit(lambda p: init_state(cfg, tx, p), out_shardings=st_sh)
    return Programs(
        graphdef=graphdef, tx=tx, shapes=shapes, state_sh=st_sh, batch_sh=batch_sh, val_sh=val_sh,
        init=lambda params=None: init_fresh() if params is None else init_from(params),
        train_step=jax.jit(make_train_step(graphdef, objective, tx, schedule, lora_scale),
                           in_shardings=(st_sh, batch_sh, frozen_sh) + aux_in, out_shardings=(st_sh, rep),
                           donate_argnums=(0,)),
        eval_step=jax.jit(make_eval_step(graphdef, objective, lora_scale),
                          in_shardings=(st_sh["params"], val_sh, rep, frozen_sh) + aux_in),
        frozen_sh=frozen_sh, lora_scale=lora_scale, aux_sh=aux_sh,
    )


# --- data ---------------------------------------------------------------------------------------------


def build_data(cfg: Config, tokenizer=None):
    """Training dataset (grain IterDataset, this process's shard) and the fixed validation batches."""
    from specdiff_jax.data import corpus, pipeline

    d = cfg.data
    if tokenizer is None:
        from specdiff_jax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(d.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer at data.tokenizer={d.tokenizer!r} has {tokenizer.vocab_size} ids but "
                          f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size=tokenizer")
    try:
        train_src = corpus.load_split(d.data_dir, "train")
    except corpus.CorpusError:
        if not d.prepare:
            raise
        print(f"preparing the corpus under {d.data_dir} (data.prepare=true)", flush=True)
        corpus.prepare_corpus(d.data_dir, list(d.source_dirs) if d.source_dirs is not None else None,
                              val_fraction=d.val_fraction)
        train_src = corpus.load_split(d.data_dir, "train")
    if len(train_src) == 0:
        raise ConfigError(f"the corpus at data.data_dir={d.data_dir!r} has no training documents; add source files "
                          "(data.source_dirs) and prepare it again")
    nproc, pid = jax.process_count(), jax.process_index()
    local_batch = d.batch_size // nproc
    train_ds = sharded_training_stream(cfg, train_src, tokenizer)
    val_batches = []
    val_src = corpus.load_split(d.data_dir, "validation") if d.val_batches else []
    if d.val_batches and len(val_src) < nproc:
        print(f"warning: the validation split of {d.data_dir} has {len(val_src)} documents: no validation "
              "(raise data.val_fraction and prepare the corpus again)", flush=True)
    elif d.val_batches:
        val_ds = pipeline.packed_dataset(val_src, tokenizer, seq_len=d.seq_len, batch_size=local_batch, seed=0,
                                         shuffle=False, num_epochs=1, shard_index=pid, shard_count=nproc)
        for i, b in enumerate(val_ds):
            if i >= d.val_batches:
                break
            val_batches.append(b)
    return train_ds, val_batches


def sharded_training_stream(cfg: Config, source, tokenizer):
    """The packed training stream as data.num_shards disjoint shards (0 = one per process), this process's part.

    See specdiff_jax.data.sharded: the global batches do not depend on the process count, so a run resumes on
    any number of processes dividing the shard count.
    """
    from specdiff_jax.data import pipeline
    from specdiff_jax.data.sharded import ShardedStream

    d = cfg.data
    return ShardedStream(
        lambda i, n, b: pipeline.packed_dataset(source, tokenizer, seq_len=d.seq_len, batch_size=b, seed=d.seed,
                                                shuffle=True, num_epochs=None, shard_index=i, shard_count=n),
        num_shards=d.num_shards or jax.process_count(), batch_size=d.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())


# --- bookkeeping at the program edge -----------------------------------------------------------------


class _WorkdirLock:
    """Refuse two live runs on one work dir (a stale lock of a dead process is taken over)."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.path = workdir / LOCK_FILE
        self.held = False
        self.enabled = enabled  # multi-process runs share the work dir: process 0 holds the lock

    def __enter__(self):
        if not self.enabled:
            return self
        if self.path.exists():
            try:
                pid = int(self.path.read_text().strip() or 0)
            except ValueError:
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise TrainingError(f"work dir {str(self.path.parent)!r} is in use by process {pid}; wait for it, "
                                    "stop it, or choose another --workdir")
        self.path.write_text(str(os.getpid()))
        self.held = True
        return self

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _StopOnSignal:
    """SIGTERM/SIGINT set a flag that the loop checks after each step; a second signal gets the default action."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        self.signum = signum
        for s, h in self._old.items():  # a second signal is not caught: the user insists
            signal.signal(s, h)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.getsignal(s)
                signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


class _MetricsLog:
    def __init__(self, workdir: Path, enabled: bool = True):
        self.path = workdir / METRICS_FILE
        self.enabled = enabled
        self.tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tb"))
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                self.tb = None

    def write(self, step: int, record: dict, prefix: str):
        if not self.enabled:
            return
        rec = {"step": step, **{f"{prefix}{k}" if prefix == "val_" else k: v for k, v in record.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                self.tb.add_scalar(f"{prefix.rstrip('_') or 'train'}/{k}", v, step)

    def close(self):
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def _checkpoint_manager(workdir: Path, cfg: Config, cleanup: bool = False):
    """cleanup: delete partial checkpoints (`<step>.orbax-checkpoint-tmp`, left by a run killed while saving or a
    save that failed; orbax deletes on the primary process only). Only a run holding the work dir's lock may
    clean up, never a reader of a live run."""
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep, create=True,
                                        enable_async_checkpointing=cfg.checkpoint.async_save,
                                        cleanup_tmp_directories=cleanup)
    return ocp.CheckpointManager((workdir / CHECKPOINT_DIR).absolute(), options=opts)


def _abstract_target(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def restore_checkpoint(workdir: str | Path, cfg: Config, mesh=None, step: int | None = None):
    """Restore `(state, data_state, metadata)` of a run onto `mesh` (default: all devices, `cfg.mesh`).

    Works across topologies (saved on 8 devices, restored on 1): arrays are placed by the target shardings.
    """
    import orbax.checkpoint as ocp

    mesh = mesh or shd.make_mesh(cfg.mesh)
    prog = programs(cfg, mesh)
    mngr = _checkpoint_manager(Path(workdir), cfg)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise TrainingError(f"no checkpoint under {str(Path(workdir) / CHECKPOINT_DIR)!r}")
        r = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract_target(prog.shapes, prog.state_sh)),
                                                      data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    finally:
        mngr.close()
    return r.state, r.data, r.meta


def _to_global(batch: dict, sharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v, np.int32))
            for k, v in batch.items() if k in ("tokens", "segment_ids")}


# --- the loop -----------------------------------------------------------------------------------------


def train(
    cfg: Config,
    workdir: str | Path,
    *,
    train_data: Iterable | None = None,
    val_batches: list[dict] | None = None,
    tokenizer=None,
    hooks: Hooks | None = None,
    devices=None,
    objective: Callable | None = None,
) -> TrainResult:
    """Train (or resume) the run of `cfg` in `workdir`.

    train_data: an iterable of this process's micro-batches {"tokens", "segment_ids": int32[B_local, L]} whose
    iterator has get_state()/set_state() (a grain IterDataset); default: `build_data(cfg)`. val_batches: fixed
    validation micro-batches (default: from `build_data`). objective: a custom `f(model, batch, rng) -> (loss,
    metrics)` replacing train.objective's (calibration; its `name` attribute, if any, is recorded in the
    checkpoints so a run is never resumed with another loss). Returns a TrainResult; raises TrainingDiverged on a
    non-finite loss and ConfigError / TrainingError on bad input, before any work where possible.
    """
    import orbax.checkpoint as ocp

    validate(cfg)  # seq_len vs max_seq_len etc., before any work
    hooks = hooks or Hooks()
    tc, cc = cfg.train, cfg.checkpoint
    workdir = Path(workdir)
    mesh = shd.make_mesh(cfg.mesh, devices)
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.batch_size % n_batch_shards or cfg.data.batch_size % jax.process_count():
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be divisible by the mesh's data*fsdp size "
                          f"({n_batch_shards}) and the process count ({jax.process_count()})")
    if tc.init_from and not Path(tc.init_from).exists() and not _has_checkpoint(workdir):
        raise ConfigError(f"train.init_from={tc.init_from!r} does not exist; set it to a model directory "
                          "(a save_pretrained export or a Hugging Face checkpoint), or to null for a random init")
    if train_data is None:
        train_data, default_val = build_data(cfg, tokenizer)
        val_batches = default_val if val_batches is None else val_batches
    val_batches = val_batches or []

    workdir.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    with _WorkdirLock(workdir, enabled=primary), _StopOnSignal() as stop:
        if primary:
            save_config(cfg, workdir / CONFIG_FILE)
        prog = programs(cfg, mesh, objective)
        graphdef, shapes, st_sh = prog.graphdef, prog.shapes, prog.state_sh
        batch_sh, val_sh = prog.batch_sh, prog.val_sh
        step_fn, eval_fn = prog.train_step, prog.eval_step

        mngr = _checkpoint_manager(workdir, cfg, cleanup=True)
        it = iter(train_data)
        obj_name = getattr(objective, "name", tc.objective) if objective is not None else tc.objective
        meta = {"model": cfg.model.to_dict(), "objective": obj_name, "seq_len": cfg.data.seq_len}
        frozen = None
        if tc.lora_rank > 0:  # LoRA: the base is loaded (fresh start and resume alike) and stays frozen
            meta["lora"] = {"rank": tc.lora_rank, "alpha": tc.lora_alpha, "targets": list(tc.lora_targets),
                            "base": str(tc.init_from)}
            frozen = jax.device_put(_load_init(cfg, tc.init_from), prog.frozen_sh)
        # the step's trailing inputs: the LoRA base (or None), then the objective's own input when it has one
        extra = (frozen,) if prog.aux_sh is None else (
            frozen, jax.device_put(nnx.to_pure_dict(objective.aux), prog.aux_sh))
        start = mngr.latest_step()
        if start is not None:
            where = workdir / CHECKPOINT_DIR / str(start)
            try:  # the metadata first: a checkpoint of another model gets a clear message, not a tree diff
                old = mngr.restore(start, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta or {}
            except Exception as e:  # noqa: BLE001 - orbax raises assorted types on damaged checkpoints
                mngr.close()
                raise TrainingError(f"cannot read the checkpoint {where} ({type(e).__name__}: {str(e)[:200]}); "
                                    "delete it to resume from the previous one, or use another --workdir") from None
            if old.get("lora") != meta.get("lora"):
                mngr.close()
                raise TrainingError(f"work dir {str(workdir)!r} holds a checkpoint with LoRA settings "
                                    f"{old.get('lora')} but this run has {meta.get('lora')}; use another --workdir, "
                                    "or restore the settings it was started with")
            if old.get("model") != meta["model"] or old.get("objective") != meta["objective"]:
                mngr.close()
                diff = sorted(k for k in meta["model"] if (old.get("model") or {}).get(k) != meta["model"][k])
                what = f"model keys {', '.join(diff)} differ" if diff else \
                    f"objective {old.get('objective')!r} != {meta['objective']!r}"
                raise TrainingError(f"work dir {str(workdir)!r} holds a checkpoint of another run ({what}); use "
                                    "another --workdir, or delete its checkpoints/ to start over")
            try:
                r = mngr.restore(start, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_abstract_target(shapes, st_sh)),
                    data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001
                mngr.close()
                raise TrainingError(f"cannot restore the checkpoint {where} ({type(e).__name__}: {str(e)[:200]}); "
                                    "delete it to resume from the previous one, or use another --workdir") from None
            state = r.state
            if r.data is not None:
                it.set_state(r.data)
            tokens_seen = int(r.meta.get("tokens_seen", 0))
            print(f"resuming from {workdir / CHECKPOINT_DIR / str(start)} at step {start}", flush=True)
        else:
            params = None
            if tc.init_from and frozen is None:
                params = _load_init(cfg, tc.init_from)
            state = prog.init(params) if params is not None else prog.init()
            tokens_seen = 0
        start = int(state["step"])

        in_flight: list[int | None] = [None]  # step of the (asynchronous) save not yet known to be complete
        writers: list[set] = [set()]  # threads alive before that save started

        def commit_wait() -> None:
            """Wait for the save in flight; a failed one (full disk, ...) stops the run, naming what is intact."""
            try:
                mngr.wait_until_finished()
            except Exception as e:  # noqa: BLE001 - orbax re-raises the writer thread's error as is
                # orbax reports the first failed item while the others may still be writing: let them end, so
                # that nothing writes into the partial checkpoint after the error (or races a resume's cleanup)
                _join_threads_since(writers[0], timeout=30.0)
                raise _save_failed(workdir, mngr, in_flight[0], e) from None
            in_flight[0] = None

        def save(step: int) -> str:
            commit_wait()  # orbax would wait inside save(); here an earlier failure is named by its own step
            in_flight[0], writers[0] = step, set(threading.enumerate())
            m = {**meta, "step": step, "tokens_seen": tokens_seen, "time": time.time()}
            try:
                mngr.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(it.get_state()),
                    meta=ocp.args.JsonSave(m)), force=True)
            except Exception as e:  # noqa: BLE001
                _join_threads_since(writers[0], timeout=30.0)
                raise _save_failed(workdir, mngr, step, e) from None
            return str(workdir / CHECKPOINT_DIR / str(step))

        val_dev = [_to_global(b, val_sh) for b in val_batches]
        val_rng = jax.random.PRNGKey(tc.seed + 2)

        def evaluate() -> dict:
            tot, n = 0.0, 0
            for i, b in enumerate(val_dev):
                s, c = eval_fn(state["params"], b, jax.random.fold_in(val_rng, i), *extra)
                tot += float(s)
                n += int(c)
            loss = tot / max(n, 1)
            return {"loss": loss, "bits_per_token": loss / math.log(2), "tokens": n}

        log = _MetricsLog(workdir, enabled=jax.process_index() == 0)
        bar = None
        if tc.progress_bar and jax.process_index() == 0:
            from tqdm import tqdm

            bar = tqdm(total=tc.steps, initial=start, desc=f"train {tc.objective}", dynamic_ncols=True)
        tokens_per_step = tc.grad_accum * cfg.data.batch_size * cfg.data.seq_len
        losses: dict[int, float] = {}
        val: dict[str, float] = {}
        last_ckpt = str(workdir / CHECKPOINT_DIR / str(start)) if mngr.latest_step() is not None else None
        status, step = "completed", start
        # Throughput over the steps since the last log record; the first step of an invocation (compilation) and
        # evaluation time are left out.
        t_last, tok_rate, win_tokens, win_time = time.perf_counter(), 0.0, 0, 0.0
        try:
            while step < tc.steps:
                micro = []
                for _ in range(tc.grad_accum):
                    try:
                        micro.append(next(it))
                    except StopIteration:
                        raise TrainingError("the training data ran out; use num_epochs=None (repeat) for the "
                                            "training stream") from None
                batch = {k: np.stack([np.asarray(m[k]) for m in micro]) for k in ("tokens", "segment_ids")}
                if batch["tokens"].shape[-1] != cfg.data.seq_len:
                    raise ConfigError(f"training batches have length {batch['tokens'].shape[-1]} but "
                                      f"data.seq_len={cfg.data.seq_len}")
                state, metrics = step_fn(state, _to_global(batch, batch_sh), *extra)
                step += 1
                tokens_seen += tokens_per_step
                mvals = {k: float(v) for k, v in metrics.items()}
                if not (math.isfinite(mvals["loss"]) and math.isfinite(mvals["grad_norm"])):
                    what = "loss" if not math.isfinite(mvals["loss"]) else "gradient norm"
                    good = mngr.latest_step()
                    where = (f"the last good checkpoint is {workdir / CHECKPOINT_DIR / str(good)} (step {good}), kept"
                             if good is not None else "no checkpoint was saved before it")
                    raise TrainingDiverged(
                        f"training diverged: {what} is {mvals['loss'] if what == 'loss' else mvals['grad_norm']} at "
                        f"step {step}; {where}. Lower train.lr or raise train.warmup_steps, then resume or restart")
                losses[step] = mvals["loss"]
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                if step > start + 1:
                    win_tokens, win_time = win_tokens + tokens_per_step, win_time + dt
                    tok_rate = win_tokens / win_time
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{mvals['loss']:.4f}", tok_s=f"{tok_rate:,.0f}", refresh=False)
                if step % tc.log_every == 0 or step == tc.steps:
                    n_win = win_tokens // tokens_per_step
                    timing = {"tokens_per_s": win_tokens / win_time, "step_time": win_time / n_win} if n_win else {}
                    log.write(step, {**mvals, **timing, "tokens_seen": tokens_seen}, "")
                    win_tokens, win_time = 0, 0.0
                if val_dev and (step % tc.eval_every == 0 or step == tc.steps):
                    val = evaluate()
                    log.write(step, val, "val_")
                    if bar is not None:
                        bar.write(f"step {step}: val loss {val['loss']:.4f}, {val['bits_per_token']:.4f} bits/token")
                    t_last = time.perf_counter()  # evaluation time is not training throughput
                if hooks.on_step_end is not None:
                    hooks.on_step_end(step, mvals)
                if stop.signum is not None:
                    last_ckpt = save(step)
                    status = "interrupted"
                    name = signal.Signals(stop.signum).name
                    msg = f"{name} received: saved {last_ckpt} at step {step}; rerun the same command to resume"
                    (bar.write if bar is not None else print)(msg)
                    break
                if step % cc.save_every == 0 and step < tc.steps:
                    last_ckpt = save(step)
            if status == "completed" and mngr.latest_step() != step:
                last_ckpt = save(step)
            if status == "completed" and val_dev and not val:  # resumed a finished run: report it anyway
                val = evaluate()
            commit_wait()
        finally:
            if bar is not None:
                bar.close()
            log.close()
            try:
                mngr.wait_until_finished()
                mngr.close()
            except Exception:  # noqa: BLE001 - only reached with an error already on its way (a failed save)
                pass

        export = None
        if status == "completed" and cc.export:  # every process: Orbax saves are collective
            from specdiff_jax.checkpoint import save_pretrained

            export = str(workdir / "export")
            save_pretrained(nnx.merge(graphdef, _model_params(state["params"], frozen, prog.lora_scale)), export,
                            metadata={
                "step": step, "objective": tc.objective, "tokens_seen": tokens_seen,
                "val_loss": val.get("loss"), "val_bits_per_token": val.get("bits_per_token"),
                "config": cfg.to_dict()})
        return TrainResult(status, step, losses, val, last_ckpt, export)


def _has_checkpoint(workdir: Path) -> bool:
    d = workdir / CHECKPOINT_DIR
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def _join_threads_since(before: set, timeout: float) -> None:
    """Wait (at most `timeout` s in all) for the threads started since the snapshot `before` to end."""
    deadline = time.monotonic() + timeout
    for t in set(threading.enumerate()) - before:
        if t is not threading.current_thread():
            t.join(max(deadline - time.monotonic(), 0.0))


def _save_failed(workdir: Path, mngr, failed: int | None, e: BaseException) -> TrainingError:
    """The error of a checkpoint save that failed: its cause (a full disk is named as such) and what is intact."""
    import errno

    cause, seen = e, set()
    while cause is not None and not isinstance(cause, OSError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    full = isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)
    shown = cause if isinstance(cause, OSError) else e
    try:
        good = mngr.latest_step()
    except Exception:  # noqa: BLE001
        good = None
    if good == failed:  # pragma: no cover - the manager lists only finalized steps
        good = None
    intact = (f"the last complete checkpoint, {workdir / CHECKPOINT_DIR / str(good)} (step {good}), is intact"
              if good is not None else "no complete checkpoint was saved before it")
    fix = "free disk space (or lower checkpoint.keep)" if full else "fix the cause"
    return TrainingError(
        f"saving the checkpoint of step {failed} under {workdir / CHECKPOINT_DIR} failed"
        f"{' (disk full)' if full else ''}: {type(shown).__name__}: {str(shown)[:300]}; the run stopped and "
        f"{intact} (the partial one is ignored and removed on resume); {fix}, then rerun the same command to resume")


def _load_init(cfg: Config, path: str) -> dict:
    from specdiff_jax.checkpoint import load_pretrained

    m = load_pretrained(path)
    if m.cfg != cfg.model:
        diff = {k: (v, getattr(cfg.model, k)) for k, v in m.cfg.to_dict().items() if getattr(cfg.model, k) != v}
        shape_keys = {"vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                      "intermediate_size", "qkv_bias", "tie_embeddings"}
        if set(diff) & shape_keys:
            raise ConfigError(f"train.init_from={path!r} is a model of another shape ({ {k: diff[k] for k in set(diff) & shape_keys} } "
                              "as (checkpoint, config)); make the model config match it")
    return nnx.to_pure_dict(nnx.state(m, nnx.Param))


def run_program(body: Callable[[], Any]) -> tuple[int | None, Any]:
    """Run the body of a training program (train.pretrain, train.calibrate) with one-line errors.

    Returns (exit status, None) when it failed: 2 for inputs a user can fix (config, paths, tokenizer, corpus,
    checkpoints), 1 for a run that stopped (e.g. a NaN loss); otherwise (None, body's value).
    """
    import sys

    from specdiff_jax.checkpoint import CheckpointError
    from specdiff_jax.data.corpus import CorpusError
    from specdiff_jax.tokenizer import TokenizerError

    try:
        return None, body()
    except (ConfigError, FileNotFoundError, NotADirectoryError, TokenizerError, CorpusError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, None
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1, None


def interrupted_message(result: "TrainResult") -> str:
    return f"interrupted at step {result.step}; checkpoint {result.checkpoint}; rerun the same command to resume"
