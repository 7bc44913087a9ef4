"""The training loop: one jitted, sharded train step; a short Python loop over steps that calls hooks.

Train state (a plain dict pytree, the unit of checkpointing):
    params     pure dict of the model's nnx.Param arrays (`nnx.to_pure_dict`), sharded by logical axes
    opt_state  optax AdamW state (moments sharded like the parameters)
    step       int32 scalar, optimizer updates done
    rng        uint32[2] base key; step s uses fold_in(rng, s), so resuming needs nothing but the step

`train_step(state, batch) -> (state, metrics)` is one pure function jitted with in/out shardings over the mesh
(1 device here, the same code on many) and donated state; gradient accumulation is a `lax.scan` over the
micro-batches of `batch["tokens"]: int32[A, B, L]`. What it optimises is an `objectives.Objective`.

`train` runs the step in a loop; everything periodic is a hook called after each step, in this order (in the
manner of Levanter's trainer hooks): the divergence check, progress, the metrics log (train.log_every),
validation (train.eval_every), the caller's `Hooks.on_step_end`, the stop-on-signal check, checkpointing
(checkpoint.save_every); the export follows the last step. The run directory (lock, signals, metrics log,
checkpoints and their failure messages) is `specdiff_jax.rundir`.

Checkpoints hold the train state, the data iterator state (JSON) and run metadata; resuming restores all of them,
so an interrupted run continues with exactly the losses it would have had. SIGTERM / SIGINT finish the current
step, save and return; a non-finite loss or gradient stops the run before anything is saved, naming the step and
the last good checkpoint (which is kept).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from specdiff_jax import lora, objectives, rundir
from specdiff_jax import sharding as shd
from specdiff_jax.checkpoint import save_pretrained
from specdiff_jax.config import ConfigError, ModelConfig
from specdiff_jax.config.run import RunConfig, TrainConfig, save_config, validate
from specdiff_jax.hf_checkpoint import load_pretrained
from specdiff_jax.data import corpus
from specdiff_jax.data.sharded import ShardedStream
from specdiff_jax.model import Transformer, abstract_model, execution
from specdiff_jax.objectives import Objective, make_objective
from specdiff_jax.rundir import TrainingDiverged, TrainingError
from specdiff_jax.tokenizer import load_tokenizer


def _pipeline():
    """The Grain input pipeline, imported where training data is built (decoding-only machines lack Grain)."""
    from specdiff_jax.data import pipeline

    return pipeline

__all__ = ["Hooks", "TrainResult", "TrainingDiverged", "TrainingError", "programs", "restore_checkpoint", "train"]


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


def init_state(model_cfg: ModelConfig, seed: int, tx, params: dict | None = None) -> dict:
    """A fresh train state (call under jit with out_shardings to place it). params: start from these instead."""
    if params is None:
        model = Transformer(model_cfg, rngs=nnx.Rngs(seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(seed + 1),
    }


def state_shardings(rules, mesh, tx, abstract_param_state: nnx.State, state_shapes: dict,
                    param_sh: dict | None = None) -> dict:
    """Shardings of the train state; `param_sh` overrides the trained parameters' (LoRA adapters)."""
    p_sh = param_sh if param_sh is not None else shd.param_shardings(abstract_param_state, mesh, rules)
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
    return lora.merge(frozen, params, lora_scale)


def make_train_step(graphdef, objective: Objective, tx, schedule, lora_scale: float | None = None) -> Callable:
    """`train_step(state, batch, frozen=None, inputs=None) -> (state, metrics)`, batch tokens/segment_ids
    int32[A, B, L] (A micro-batches). With LoRA, state["params"] are the adapters and `frozen` the base parameters
    (an input, never differentiated); the model is base + lora_scale * A @ B. `inputs` is the pure dict of the
    objective's declared inputs (`Objective.inputs`, e.g. the KD teacher): an argument of the step, so it is
    sharded like any input and never baked into the compiled program as constants."""

    def loss_fn(params, batch, rng, frozen, inputs):
        return objective(nnx.merge(graphdef, _model_params(params, frozen, lora_scale)), batch, rng, inputs)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch, frozen=None, inputs=None):
        params = state["params"]
        A = batch["tokens"].shape[0]
        rngs = jax.random.split(jax.random.fold_in(state["rng"], state["step"]), A)

        def micro(acc, xs):
            b, r = xs
            (_, m), g = grad_fn(params, b, r, frozen, inputs)
            return jax.tree.map(jnp.add, acc, g), m

        if A == 1:  # no loop: the common case compiles faster
            (_, m), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch), rngs[0], frozen, inputs)
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


def make_eval_step(graphdef, objective: Objective, lora_scale: float | None = None) -> Callable:
    """`eval_step(params, batch[B, L], rng, frozen=None, inputs=None) -> (sum of per-token loss, token count)`."""

    def eval_step(params, batch, rng, frozen=None, inputs=None):
        _, m = objective(nnx.merge(graphdef, _model_params(params, frozen, lora_scale)), batch, rng, inputs)
        return m["loss"] * m["tokens"], m["tokens"]

    return eval_step


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Shapes and placement of a run's train state (no objective needed: also what a dry run measures)."""

    graphdef: Any
    tx: Any
    shapes: Any  # train-state pytree of jax.ShapeDtypeStruct
    state_sh: Any  # train-state pytree of NamedSharding
    frozen_sh: Any = None  # LoRA: shardings of the frozen base parameters (None: full training)
    lora_scale: float | None = None  # LoRA: lora_alpha / lora_rank
    fresh_params: Callable | None = None  # LoRA: () -> fresh adapters (None: the model's own init)


@dataclasses.dataclass(frozen=True)
class Programs:
    """The jitted pure functions of a run and the shardings they use (built once per config and mesh)."""

    layout: StateLayout
    batch_sh: Any  # [A, B, L] micro-batch stack
    val_sh: Any  # [B, L]
    init: Callable  # init() or init(params) -> state
    train_step: Callable  # (state, batch, frozen[, inputs]) -> (state, metrics); state donated; frozen: LoRA base
    eval_step: Callable  # (params, batch, rng, frozen[, inputs]) -> (loss sum, tokens)
    inputs_sh: Any = None  # shardings of the objective's declared inputs (None: it has none)

    # the layout's fields, read through
    graphdef = property(lambda self: self.layout.graphdef)
    shapes = property(lambda self: self.layout.shapes)
    state_sh = property(lambda self: self.layout.state_sh)
    frozen_sh = property(lambda self: self.layout.frozen_sh)
    lora_scale = property(lambda self: self.layout.lora_scale)


def _training_key(cfg: RunConfig) -> TrainConfig:
    """train.* without the fields that do not change the compiled programs (the memo key)."""
    return dataclasses.replace(cfg.train, log_every=1, eval_every=1, progress_bar=True, init_from=None)


def state_layout(cfg: RunConfig, mesh) -> StateLayout:
    """Shapes and shardings of the train state of `cfg` on `mesh`, memoised in-process."""
    return _state_layout(cfg.model, _training_key(cfg), cfg.mesh.logical_axis_rules, mesh)


@functools.lru_cache(maxsize=8)
def _state_layout(model_cfg: ModelConfig, tc: TrainConfig, rules, mesh) -> StateLayout:
    tx = make_optimizer(tc)
    graphdef, abstract = nnx.split(abstract_model(model_cfg))
    frozen_sh, param_sh, lora_scale, fresh_params = None, None, None, None
    if tc.lora_rank > 0:  # train adapters only; the base parameters are a frozen input of the step
        frozen_sh = shd.param_shardings(abstract, mesh, rules)
        base_shapes = nnx.to_pure_dict(abstract)
        lora_scale = tc.lora_alpha / tc.lora_rank
        fresh_params = lambda: lora.init(jax.random.PRNGKey(tc.seed + 3), base_shapes,  # noqa: E731
                                         tc.lora_targets, tc.lora_rank)
        ad_shapes = jax.eval_shape(fresh_params)
        ad_axes = lora.logical_axes(shd.param_logical_axes(abstract), ad_shapes)
        param_sh = jax.tree.map(lambda ax, a: shd.logical_sharding(mesh, rules, ax, a.shape), ad_axes, ad_shapes,
                                is_leaf=lambda x: isinstance(x, tuple))
    shapes = jax.eval_shape(lambda: init_state(model_cfg, tc.seed, tx, None if fresh_params is None else
                                               fresh_params()))
    st_sh = state_shardings(rules, mesh, tx, abstract, shapes, param_sh)
    return StateLayout(graphdef, tx, shapes, st_sh, frozen_sh, lora_scale, fresh_params)


def programs(cfg: RunConfig, mesh, objective: Objective | None = None) -> Programs:
    """Jitted init / train / eval functions for `cfg` on `mesh`, memoised in-process (compiles are slow on CPU).

    objective: a custom `Objective` (e.g. calibration's) instead of the one named by train.objective; it is part
    of the memo key.
    """
    tc = _training_key(cfg)
    if objective is not None:
        return _programs(cfg.model, tc, cfg.mesh.logical_axis_rules, mesh, objective)
    return _programs(cfg.model, tc, cfg.mesh.logical_axis_rules, mesh, objectives.OBJECTIVES[tc.objective])


@functools.lru_cache(maxsize=8)
def _programs(model_cfg: ModelConfig, tc: TrainConfig, rules, mesh, objective) -> Programs:
    lay = _state_layout(model_cfg, tc, rules, mesh)
    if not isinstance(objective, Objective):  # a built-in objective's function: the memo key only
        objective = make_objective(tc)
    batch_sh = shd.batch_sharding(mesh, rules, 3, leading=1)
    traced = functools.partial(_traced, mesh, rules, tc)
    val_sh = shd.batch_sharding(mesh, rules, 2)
    rep = shd.replicated(mesh)
    # e.g. a KD teacher: placed by its own logical axes
    inputs_sh = None if objective.inputs is None else shd.param_shardings(objective.inputs, mesh, rules)
    extra_in = () if inputs_sh is None else (inputs_sh,)  # objectives without inputs keep the 3-argument step
    fresh = lay.fresh_params  # LoRA: fresh adapters; otherwise the model's own init
    init_fresh = jax.jit(lambda: init_state(model_cfg, tc.seed, lay.tx, None if fresh is None else fresh()),
                         out_shardings=lay.state_sh)
    init_from = jax.jit(lambda p: init_state(model_cfg, tc.seed, lay.tx, p), out_shardings=lay.state_sh)
    return Programs(
        layout=lay, batch_sh=batch_sh, val_sh=val_sh,
        init=lambda params=None: init_fresh() if params is None else init_from(params),
        train_step=jax.jit(traced(make_train_step(lay.graphdef, objective, lay.tx, lr_schedule(tc), lay.lora_scale)),
                           in_shardings=(lay.state_sh, batch_sh, lay.frozen_sh) + extra_in,
                           out_shardings=(lay.state_sh, rep), donate_argnums=(0,)),
        eval_step=jax.jit(traced(make_eval_step(lay.graphdef, objective, lay.lora_scale)),
                          in_shardings=(lay.state_sh["params"], val_sh, rep, lay.frozen_sh) + extra_in),
        inputs_sh=inputs_sh,
    )


def _traced(mesh, rules, tc: TrainConfig, fn: Callable) -> Callable:
    """`fn` traced with activations held by logical axes on `mesh` and train.remat / train.attention applied."""

    def wrapped(*args):
        with shd.activation_sharding(mesh, rules), execution(tc.remat, tc.attention):
            return fn(*args)

    return wrapped


# --- data ---------------------------------------------------------------------------------------------


def build_data(cfg: RunConfig, tokenizer=None):
    """Training dataset (grain IterDataset, this process's shard) and the fixed validation batches."""
    d = cfg.data
    if tokenizer is None:
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
        val_ds = _pipeline().packed_dataset(val_src, tokenizer, seq_len=d.seq_len, batch_size=local_batch, seed=0,
                                         shuffle=False, num_epochs=1, shard_index=pid, shard_count=nproc)
        for i, b in enumerate(val_ds):
            if i >= d.val_batches:
                break
            val_batches.append(b)
    return train_ds, val_batches


def sharded_training_stream(cfg: RunConfig, source, tokenizer):
    """The packed training stream as data.num_shards disjoint shards (0 = one per process), this process's part.

    See specdiff_jax.data.sharded: the global batches do not depend on the process count, so a run resumes on
    any number of processes dividing the shard count.
    """
    d = cfg.data
    return ShardedStream(
        lambda i, n, b: _pipeline().packed_dataset(source, tokenizer, seq_len=d.seq_len, batch_size=b, seed=d.seed,
                                                shuffle=True, num_epochs=None, shard_index=i, shard_count=n),
        num_shards=d.num_shards or jax.process_count(), batch_size=d.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())


# --- the loop -----------------------------------------------------------------------------------------


def restore_checkpoint(workdir: str | Path, cfg: RunConfig, mesh=None, step: int | None = None):
    """Restore `(state, data_state, metadata)` of a run onto `mesh` (default: all devices, `cfg.mesh`).

    Works across topologies (saved on 8 devices, restored on 1): arrays are placed by the target shardings.
    """
    mesh = mesh or shd.make_mesh(cfg.mesh)
    lay = state_layout(cfg, mesh)
    mngr = rundir.checkpoint_manager(workdir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise TrainingError(f"no checkpoint under {str(rundir.as_path(workdir) / rundir.CHECKPOINT_DIR)!r}")
        r = mngr.restore(step, args=rundir.restore_args(rundir.abstract_target(lay.shapes, lay.state_sh)))
    finally:
        mngr.close()
    return r.state, r.data, r.meta


def _to_global(batch: dict, sharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v, np.int32))
            for k, v in batch.items() if k in ("tokens", "segment_ids")}


class _Clock:
    """Training throughput over the steps since the last log record; the first step of an invocation
    (compilation) and evaluation time are left out."""

    def __init__(self, start: int, tokens_per_step: int):
        self.start, self.tokens_per_step = start, tokens_per_step
        self.t_last, self.rate, self.tokens, self.time = time.perf_counter(), 0.0, 0, 0.0

    def tick(self, step: int) -> None:
        now = time.perf_counter()
        dt, self.t_last = now - self.t_last, now
        if step > self.start + 1:
            self.tokens, self.time = self.tokens + self.tokens_per_step, self.time + dt
            self.rate = self.tokens / self.time

    def take(self) -> dict:
        """tokens_per_s and step_time of the window (empty before the first timed step); starts a new window."""
        n = self.tokens // self.tokens_per_step
        timing = {"tokens_per_s": self.tokens / self.time, "step_time": self.time / n} if n else {}
        self.tokens, self.time = 0, 0.0
        return timing

    def skip(self) -> None:
        """Leave out the time since the last step (evaluation is not training throughput)."""
        self.t_last = time.perf_counter()


class _Run:
    """One invocation of a run: train state, data iterator, checkpoints, metrics log and counters."""

    def __init__(self, cfg: RunConfig, workdir: Path, prog: Programs, train_data, val_batches: list,
                 objective: Objective | None):
        tc = cfg.train
        self.cfg, self.workdir, self.prog, self.status = cfg, workdir, prog, "running"
        self.ckpts = rundir.Checkpoints(workdir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
        self.it = iter(train_data)
        self.meta = {"model": cfg.model.to_dict(), "objective": tc.objective if objective is None else objective.name,
                     "seq_len": cfg.data.seq_len}
        self.frozen = None
        if tc.lora_rank > 0:  # LoRA: the base is loaded (fresh start and resume alike) and stays frozen
            self.meta["lora"] = {"rank": tc.lora_rank, "alpha": tc.lora_alpha, "targets": list(tc.lora_targets),
                                 "base": str(tc.init_from)}
            self.frozen = jax.device_put(_load_init(cfg, tc.init_from), prog.frozen_sh)
        # the step's trailing inputs: the LoRA base (or None), then the objective's declared inputs if it has any
        self.extra = (self.frozen,) if prog.inputs_sh is None else (
            self.frozen, jax.device_put(nnx.to_pure_dict(objective.inputs), prog.inputs_sh))
        self.state, self.tokens_seen = self._resume_or_init()
        self.start = self.step = int(self.state["step"])
        self.tokens_per_step = tc.grad_accum * cfg.data.batch_size * cfg.data.seq_len
        self.losses: dict[int, float] = {}
        self.val: dict[str, float] = {}
        self.last_ckpt = self.ckpts.path(self.start) if self.ckpts.latest_step() is not None else None
        self.val_dev = [_to_global(b, prog.val_sh) for b in val_batches]
        self.val_rng = jax.random.PRNGKey(tc.seed + 2)
        self.log = rundir.MetricsLog(workdir, enabled=jax.process_index() == 0)
        self.bar = None
        if tc.progress_bar and jax.process_index() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=tc.steps, initial=self.start, desc=f"train {tc.objective}", dynamic_ncols=True)
        self.clock = _Clock(self.start, self.tokens_per_step)

    def _resume_or_init(self) -> tuple[dict, int]:
        r = self.ckpts.resume(rundir.abstract_target(self.prog.shapes, self.prog.state_sh), self.meta)
        if r is not None:
            if r.data is not None:
                self.it.set_state(r.data)
            return r.state, int(r.meta.get("tokens_seen", 0))
        tc = self.cfg.train
        params = _load_init(self.cfg, tc.init_from) if tc.init_from and self.frozen is None else None
        return (self.prog.init(params) if params is not None else self.prog.init()), 0

    def next_batch(self) -> dict:
        """The next step's micro-batches, stacked int32[A, B, L] and placed on the mesh."""
        micro = []
        for _ in range(self.cfg.train.grad_accum):
            try:
                micro.append(next(self.it))
            except StopIteration:
                raise TrainingError("the training data ran out; use num_epochs=None (repeat) for the "
                                    "training stream") from None
        batch = {k: np.stack([np.asarray(m[k]) for m in micro]) for k in ("tokens", "segment_ids")}
        if batch["tokens"].shape[-1] != self.cfg.data.seq_len:
            raise ConfigError(f"training batches have length {batch['tokens'].shape[-1]} but "
                              f"data.seq_len={self.cfg.data.seq_len}")
        return _to_global(batch, self.prog.batch_sh)

    def train_step(self) -> dict[str, float]:
        self.state, metrics = self.prog.train_step(self.state, self.next_batch(), *self.extra)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return {k: float(v) for k, v in metrics.items()}

    def evaluate(self) -> dict:
        tot, n = 0.0, 0
        for i, b in enumerate(self.val_dev):
            s, c = self.prog.eval_step(self.state["params"], b, jax.random.fold_in(self.val_rng, i), *self.extra)
            tot += float(s)
            n += int(c)
        loss = tot / max(n, 1)
        return {"loss": loss, "bits_per_token": loss / math.log(2), "tokens": n}

    def save(self) -> str:
        meta = {**self.meta, "step": self.step, "tokens_seen": self.tokens_seen, "time": time.time()}
        self.last_ckpt = self.ckpts.save(self.step, self.state, self.it.get_state(), meta)
        return self.last_ckpt

    def say(self, msg: str) -> None:
        (self.bar.write if self.bar is not None else print)(msg)

    def finish(self) -> None:
        """After the last step: the final checkpoint and validation of a completed run; wait for saves."""
        if self.status == "running":
            self.status = "completed"
            if self.ckpts.latest_step() != self.step:
                self.save()
            if self.val_dev and not self.val:  # resumed a finished run: report it anyway
                self.val = self.evaluate()
        self.ckpts.wait()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.log.close()
        self.ckpts.close()


# --- hooks: everything periodic, in the order they run after a step -----------------------------------


@dataclasses.dataclass
class _Every:
    """Call `fn(run, metrics)` after every `every`-th step (and after the last step when `at_end`)."""

    every: int
    fn: Callable[[_Run, dict], Any]
    at_end: bool = True

    def __call__(self, run: _Run, metrics: dict) -> None:
        due = run.step % self.every == 0 or (self.at_end and run.step == run.cfg.train.steps)
        if due and run.status == "running":
            self.fn(run, metrics)


def _check_divergence(run: _Run, m: dict) -> None:
    if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
        what = "loss" if not math.isfinite(m["loss"]) else "gradient norm"
        good = run.ckpts.latest_step()
        where = (f"the last good checkpoint is {run.ckpts.path(good)} (step {good}), kept"
                 if good is not None else "no checkpoint was saved before it")
        raise TrainingDiverged(
            f"training diverged: {what} is {m['loss'] if what == 'loss' else m['grad_norm']} at step {run.step}; "
            f"{where}. Lower train.lr or raise train.warmup_steps, then resume or restart")


def _track(run: _Run, m: dict) -> None:
    run.losses[run.step] = m["loss"]
    run.clock.tick(run.step)
    if run.bar is not None:
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{run.clock.rate:,.0f}", refresh=False)


def _log(run: _Run, m: dict) -> None:
    run.log.write(run.step, {**m, **run.clock.take(), "tokens_seen": run.tokens_seen}, "")


def _validate(run: _Run, m: dict) -> None:
    run.val = run.evaluate()
    run.log.write(run.step, run.val, "val_")
    if run.bar is not None:
        run.bar.write(f"step {run.step}: val loss {run.val['loss']:.4f}, {run.val['bits_per_token']:.4f} bits/token")
    run.clock.skip()


def _step_hooks(run: _Run, user: Hooks, stop: rundir.StopOnSignal) -> list[_Every]:
    tc = run.cfg.train

    def stop_on_signal(r: _Run, m: dict) -> None:
        if stop.signum is not None:
            r.save()
            r.status = "interrupted"
            r.say(f"{signal.Signals(stop.signum).name} received: saved {r.last_ckpt} at step {r.step}; rerun the "
                  "same command to resume")

    hooks = [_Every(1, _check_divergence), _Every(1, _track), _Every(tc.log_every, _log)]
    if run.val_dev:
        hooks.append(_Every(tc.eval_every, _validate))
    if user.on_step_end is not None:
        hooks.append(_Every(1, lambda r, m: user.on_step_end(r.step, m)))
    hooks.append(_Every(1, stop_on_signal))
    hooks.append(_Every(run.cfg.checkpoint.save_every, lambda r, m: r.save() if r.step < tc.steps else None,
                        at_end=False))
    return hooks


def _export(run: _Run) -> str:
    """The trained model as a model directory `<workdir>/export` (LoRA adapters merged into the base)."""
    export = str(run.workdir / "export")
    tc = run.cfg.train
    model = nnx.merge(run.prog.graphdef, _model_params(run.state["params"], run.frozen, run.prog.lora_scale))
    save_pretrained(model, export, metadata={
        "step": run.step, "objective": tc.objective, "tokens_seen": run.tokens_seen, "val_loss": run.val.get("loss"),
        "val_bits_per_token": run.val.get("bits_per_token"), "config": run.cfg.to_dict()})
    return export


def _check_run(cfg: RunConfig, mesh, workdir: Path) -> None:
    """Refuse settings that cannot run, before any work."""
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.batch_size % n_batch_shards or cfg.data.batch_size % jax.process_count():
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be divisible by the mesh's data*fsdp size "
                          f"({n_batch_shards}) and the process count ({jax.process_count()})")
    tc = cfg.train
    if tc.init_from and not Path(tc.init_from).exists() and not rundir.has_checkpoint(workdir):
        raise ConfigError(f"train.init_from={tc.init_from!r} does not exist; set it to a model directory "
                          "(a save_pretrained export or a Hugging Face checkpoint), or to null for a random init")


def train(
    cfg: RunConfig,
    workdir: str | Path,
    *,
    train_data: Iterable | None = None,
    val_batches: list[dict] | None = None,
    tokenizer=None,
    hooks: Hooks | None = None,
    devices=None,
    objective: Objective | None = None,
) -> TrainResult:
    """Train (or resume) the run of `cfg` in `workdir`.

    train_data: an iterable of this process's micro-batches {"tokens", "segment_ids": int32[B_local, L]} whose
    iterator has get_state()/set_state() (a grain IterDataset); default: `build_data(cfg)`. val_batches: fixed
    validation micro-batches (default: from `build_data`). objective: an `Objective` replacing train.objective's
    (calibration; its name is recorded in the checkpoints so a run is never resumed with another loss). Returns a
    TrainResult; raises TrainingDiverged on a non-finite loss and ConfigError / TrainingError on bad input, before
    any work where possible.
    """
    validate(cfg)  # seq_len vs max_seq_len etc., before any work
    workdir = rundir.as_path(workdir)  # local or remote (gs://...): etils.epath
    mesh = shd.make_mesh(cfg.mesh, devices)
    _check_run(cfg, mesh, workdir)
    if train_data is None:
        train_data, default_val = build_data(cfg, tokenizer)
        val_batches = default_val if val_batches is None else val_batches
    workdir.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    with rundir.WorkdirLock(workdir, enabled=primary), rundir.StopOnSignal() as stop:
        if primary:
            save_config(cfg, workdir / rundir.CONFIG_FILE)
        run = _Run(cfg, workdir, programs(cfg, mesh, objective), train_data, val_batches or [], objective)
        step_hooks = _step_hooks(run, hooks or Hooks(), stop)
        try:
            while run.step < cfg.train.steps and run.status == "running":
                metrics = run.train_step()
                for hook in step_hooks:
                    hook(run, metrics)
            run.finish()
        finally:
            run.close()
        export = _export(run) if run.status == "completed" and cfg.checkpoint.export else None  # every process
        return TrainResult(run.status, run.step, run.losses, run.val, run.last_ckpt, export)


def _load_init(cfg: RunConfig, path: str) -> dict:
    m = load_pretrained(path)
    if m.cfg != cfg.model:
        diff = {k: (v, getattr(cfg.model, k)) for k, v in m.cfg.to_dict().items() if getattr(cfg.model, k) != v}
        shape_keys = {"vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                      "intermediate_size", "qkv_bias", "tie_embeddings"}
        if set(diff) & shape_keys:
            raise ConfigError(f"train.init_from={path!r} is a model of another shape ({ {k: diff[k] for k in set(diff) & shape_keys} } "
                              "as (checkpoint, config)); make the model config match it")
    return nnx.to_pure_dict(nnx.state(m, nnx.Param))
