"""Dry runs: the mesh, every shape (`jax.eval_shape`, nothing allocated) and the per-device memory of a run.

    python -m train.pretrain  --config configs/models/qwen2.5-72b.yaml --dry-run            # training
    python -m train.calibrate --config configs/pairs/diffucoder7b_qwen2.5-72b.yaml --dry-run  # calibration
    python -m eval.benchmark  --config configs/pairs/diffucoder7b_qwen2.5-72b.yaml --dry-run  # decoding
    python -m specdiff_jax.dryrun --config FILE [--mode train|decode] [key=value ...]
    python -m train.pretrain  --config configs/models/qwen2.5-7b.yaml --dry-run --compiled  # + XLA's own figure
    python -m train.generate_data --config configs/pairs/diffucoder7b_qwen2.5-72b.yaml --dry-run --compiled

With `mesh.num_devices = N > 0` the mesh is an `AbstractMesh` of N devices (no device needed: a 256-device pod is
planned on a laptop); with 0 it is the real devices'. Per device it reports parameters, optimizer state, gradients,
activations and KV caches, and the sharding of every parameter group, then checks the total against
`mesh.device_memory_gb` (0 = the device's own figure where JAX reports one). A config that does not fit raises
`DoesNotFit` (a ConfigError: the programs exit with status 2) naming the need, the budget and what to change.

Exact (from shapes and shardings): parameters, optimizer state, gradients, KV caches. Estimated (a formula over
the same shapes, stated in `activation_bytes`): activations, which XLA decides; the training estimate follows
train.remat and train.vocab_chunk, the decode estimate is the largest single forward of a round (prefill, drafter,
verifier). Also estimated, from what the compiled steps showed: the weight copies XLA keeps (`gathered_weight_bytes`
without remat, LoRA's merged weights and their gradient, calibration's all-gathered LM head).

Measured (`--compiled`): the real train step, or the decode kernels (the jitted prefill and the draft-verify
loop, as sharded decoding jits them), compiled for the mesh on fake CPU devices at two small layer counts and
extrapolated linearly to the full depth (specdiff_jax.compiled_memory); XLA's per-device figure (decoding: the
peak of the two kernels, every parameter resident) is printed beside the estimate and a gap over 20% is flagged.
On CPU, XLA computes bf16 matmuls in f32 and keeps f32 copies a TPU would not: for bf16 programs the compile is
also read back at TPU sizes (specdiff_jax.cpu_widening), that figure is printed too, and the fit check uses it
(for f32 programs the two are one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specdiff_jax import sharding as shd
from specdiff_jax import training
from specdiff_jax.cache import KVCache
from specdiff_jax.calibration import check_drafter
from specdiff_jax.calibration.windows import step_tokens
from specdiff_jax.compiled_memory import DecodePlan
from specdiff_jax.config import ConfigError, ModelConfig
from specdiff_jax.config.run import CONFIGS_DIR, NoTokenizer, RunConfig, load_config
from specdiff_jax.model import abstract_model

GiB = 1024 ** 3
MAX_GAP = 0.20  # a compiled figure further than this from the estimate is flagged


def _flag(gap: float) -> str:
    return "GAP OVER 20%" if abs(gap) > MAX_GAP else "within 20%"


class DoesNotFit(ConfigError):
    """The run needs more memory per device than the mesh declares."""


@contextlib.contextmanager
def _fast_abstract_init():
    """Abstract model construction in linear time.

    flax's Variable setter probes `.sharding` on every RNG-counter update; on a tracer jax answers with an
    AttributeError whose message walks the whole trace so far (`_origin_msg`), which makes `nnx.eval_shape` of a
    72B model quadratic (minutes). The message is never shown here, so it is skipped while shapes are built.
    """
    from jax._src.interpreters import partial_eval as pe

    cls = getattr(pe, "DynamicJaxprTracer", None)
    old = getattr(cls, "_origin_msg", None) if cls is not None else None
    if old is None:
        yield
        return
    cls._origin_msg = lambda self: ""
    try:
        yield
    finally:
        cls._origin_msg = old


@dataclasses.dataclass
class Report:
    mode: str
    mesh: dict  # axis -> size
    abstract: bool
    rows: list[tuple[str, int, str]]  # (what, bytes per device, note)
    groups: list[tuple[str, str, str, int]]  # (parameter group, global shape, spec, bytes per device)
    budget: int | None  # bytes per device, None = unknown
    compiled: Any = None  # compiled_memory.Compiled: XLA's own figure (--compiled), or None

    @property
    def estimate(self) -> int:
        return sum(b for _, b, _ in self.rows)

    @property
    def total(self) -> int:
        """The compiled figure when there is one (it is measured; for bf16 compute XLA's buffers at TPU sizes, the
        CPU figure being an upper bound: `compiled_memory.Compiled.tpu`), else the estimate."""
        return self.compiled.tpu if self.compiled is not None else self.estimate

    @property
    def gap(self) -> float | None:
        """estimate / compiled - 1, or None without a compiled figure."""
        return None if self.compiled is None else self.estimate / self.compiled.total - 1

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    def compiled_lines(self) -> list[str]:
        c = self.compiled
        if c is None:
            return []
        b, n = c.bytes, math.prod(self.mesh.values())
        if c.kernels is None:
            what = (f"train step compiled on {n} fake CPU devices at {c.layers[0]} and {c.layers[1]} layers, "
                    f"extrapolated linearly to the full depth (arguments {b['argument'] / GiB:.2f} + temp "
                    f"{b['temp'] / GiB:.2f} + unaliased outputs {(b['output'] - b['alias']) / GiB:.2f})")
        else:
            a, z = c.layers
            at = f"{a} and {z} verifier layers" if len(c.measured) == 2 else \
                f"({a}, {a}), ({z}, {a}) and ({a}, {z}) (verifier, drafter) layers"
            others = "; ".join(f"{k} {v['total'] / GiB:.2f}" for k, v in c.kernels.items() if k != c.peak)
            what = (f"prefill and decode loop compiled on {n} fake CPU devices at {at}, extrapolated linearly to "
                    f"the full depth; peak: {c.peak} (parameters {b['parameters'] / GiB:.2f} + KV caches and other "
                    f"inputs {b['inputs'] / GiB:.2f} + temp {b['temp'] / GiB:.2f} + unaliased outputs "
                    f"{(b['output'] - b['alias']) / GiB:.2f}); {others}")
        lines = [f"| **XLA compiled** | **{c.total / GiB:.2f}** | {what}; {c.seconds:.0f} s to compile; the estimate "
                 f"is {self.gap:+.0%} off it: {_flag(self.gap)} |"]
        if c.tpu != c.total:
            gap = self.estimate / c.tpu - 1
            each = "" if c.kernels is None else " (" + ", ".join(
                f"{k} {v['tpu'] / GiB:.2f}" for k, v in c.kernels.items()) + ")"
            lines.append(f"| XLA buffers at TPU sizes | {c.tpu / GiB:.2f}{each} | on CPU XLA computes bf16 matmuls "
                         f"in f32: at the peak of live buffers ({c.peak or 'train step'}) {c.widening / GiB:.2f} GiB "
                         "are f32 copies of bf16 weights and f32 values the program holds in bf16, which a TPU holds "
                         f"in bf16 or not at all, and its heap layout adds {c.packing / GiB:.2f} GiB on top of the live "
                         "buffers; this figure is that peak with every value at its TPU size "
                         f"(specdiff_jax.cpu_widening): the estimate is {gap:+.0%} off it: {_flag(gap)} |")
        return lines

    def table(self) -> str:
        ms = " x ".join(f"{k} {v}" for k, v in self.mesh.items())
        n = math.prod(self.mesh.values())
        lines = [f"dry run ({self.mode}): mesh {ms} = {n} devices ({'abstract' if self.abstract else 'real'})", "",
                 "| per device | GiB | |", "|---|---|---|"]
        lines += [f"| {w} | {b / GiB:.2f} | {note} |" for w, b, note in self.rows]
        budget = "not declared (mesh.device_memory_gb)" if self.budget is None else f"{self.budget / GiB:.2f}"
        verdict = "fits" if self.fits else "DOES NOT FIT"
        by = "" if self.compiled is None else " (by the compiled figure)" if self.compiled.tpu == self.compiled.total \
            else " (by XLA's buffers at TPU sizes)"
        lines += [f"| **total (estimate)** | **{self.estimate / GiB:.2f}** | device memory {budget}: "
                  f"{verdict}{by} |"] + self.compiled_lines() + ["",
                  "| parameter group | global shape | sharding | GiB per device |", "|---|---|---|---|"]
        lines += [f"| {g} | {s} | {sp} | {b / GiB:.3f} |" for g, s, sp, b in self.groups]
        return "\n".join(lines)


# --- sizes ----------------------------------------------------------------------------------------------


def _itemsize(dtype) -> int:
    return jnp.dtype(dtype).itemsize


def per_device_bytes(shape, dtype, sharding) -> int:
    """Bytes one device holds of an array of `shape` placed by `sharding` (NamedSharding, abstract mesh ok)."""
    return int(np.prod(sharding.shard_shape(tuple(shape)), dtype=np.int64)) * _itemsize(dtype)


def _tree_bytes(shapes, shardings) -> int:
    return sum(per_device_bytes(s.shape, s.dtype, sh) for s, sh in zip(jax.tree.leaves(shapes),
                                                                        jax.tree.leaves(shardings)))


def _factor(mesh, rules, name: str, size: int) -> int:
    """How many ways a dimension of logical axis `name` and `size` is split on `mesh`."""
    spec = shd.logical_to_spec((name,), rules, mesh, (size,))[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[a] for a in axes)


def _groups(abstract_state, mesh, rules) -> list[tuple[str, str, str, int]]:
    """Parameter groups (layer index folded into `*`): global shape of one member, spec, bytes per device (all)."""
    axes = shd.param_logical_axes(abstract_state)
    out: dict[str, list] = {}
    for path, var in abstract_state.flat_state():
        keys = [str(k) for k in path]
        ax = axes
        for k in path:
            ax = ax[k]
        val = var.get_value() if hasattr(var, "get_value") else var.value
        shape, dtype = val.shape, val.dtype
        sh = shd.logical_sharding(mesh, rules, ax, shape)
        name = ".".join("*" if re.fullmatch(r"\d+", k) else k for k in keys)
        g = out.setdefault(name, [str(tuple(shape)), str(sh.spec).replace("PartitionSpec", "P"), 0])
        g[2] += per_device_bytes(shape, dtype, sh)
    return [(k, s, sp, b) for k, (s, sp, b) in out.items()]


# --- activation estimates --------------------------------------------------------------------------------


def activation_bytes(m: ModelConfig, mesh, rules, *, rows: int, tokens: int, keys: int | None = None,
                     backward: bool = True, logits_tokens: int | None = None, remat: str = "none",
                     vocab_chunk: int = 0) -> int:
    """Per-device activation bytes of one forward (backward=False: the largest layer, transient) or of a
    forward kept for the backward pass (backward=True, by train.remat: `none` keeps every layer's intermediates,
    `full` each layer's input plus one layer recomputed at a time, the dots policies the matmul outputs).

    rows: sequences (batch-sharded over the mesh's batch axes); tokens: queries per row; keys: keys each query
    scores (default tokens); logits_tokens: positions that get vocabulary logits (default tokens); vocab_chunk:
    train.vocab_chunk (> 0: logits exist one chunk at a time).
    Per layer and row: 5 residual-width tensors, q/k/v/context (heads, kv_heads sharded), the f32 scores and
    probabilities plus their compute-dtype copy, 4 SwiGLU-width tensors (mlp sharded). Logits: 3 f32 copies.
    """
    c = _itemsize(m.dtype)
    keys = tokens if keys is None else keys
    lt = tokens if logits_tokens is None else logits_tokens
    b = -(-rows // _factor(mesh, rules, "batch", rows))
    fh = _factor(mesh, rules, "heads", m.num_heads * m.head_dim)
    fk = _factor(mesh, rules, "kv_heads", m.num_kv_heads * m.head_dim)
    fm = _factor(mesh, rules, "mlp", m.intermediate_size)
    fv = _factor(mesh, rules, "vocab", m.vocab_size)
    q_o = 2 * m.num_heads * m.head_dim / fh * c  # q and the attention context, per token
    k_v = 2 * m.num_kv_heads * m.head_dim / fk * c
    scores = m.num_heads / fh * tokens * keys
    layer = tokens * (5 * m.hidden_size * c + 1.5 * (q_o + k_v) + 4 * m.intermediate_size / fm * c)
    layer += scores * (4 + 4 + c)
    if not backward:
        kept = layer
    elif remat == "none":
        kept = m.num_layers * layer
    elif remat == "full":
        kept = m.num_layers * tokens * m.hidden_size * c + layer
    else:  # matmul outputs kept: projections, MLP hidden, residual adds; scores only with dots_saveable
        dots = tokens * (2 * m.hidden_size * c + q_o + k_v + 2 * m.intermediate_size / fm * c)
        dots += scores * c if remat == "dots_saveable" else 0
        kept = m.num_layers * dots + layer
    width = m.vocab_size if vocab_chunk <= 0 else min(vocab_chunk, m.vocab_size)
    logits = lt * width / fv * 4 * 3
    return int(b * (kept + logits))


def gathered_weight_bytes(m: ModelConfig, mesh, rules, remat: str) -> int:
    """Per-device bytes of the decoder layers' weights all-gathered over the fsdp axes and kept for the backward
    pass: every layer's with train.remat=none (XLA keeps each gathered weight for its gradient matmuls, measured on
    the compiled 7B step), none otherwise (each layer's are gathered again when it is recomputed). Still split over
    the tensor axis, in the compute dtype."""
    if remat != "none":
        return 0
    d, f, hd = m.hidden_size, m.intermediate_size, m.head_dim
    fh = _factor(mesh, rules, "heads", m.num_heads * hd)
    fk = _factor(mesh, rules, "kv_heads", m.num_kv_heads * hd)
    fm = _factor(mesh, rules, "mlp", f)
    layer = 2 * d * m.num_heads * hd / fh + 2 * d * m.num_kv_heads * hd / fk + 3 * d * f / fm
    return int(m.num_layers * layer * _itemsize(m.dtype))


def _lora_row(cfg: RunConfig, groups) -> tuple[str, int, str]:
    """The LoRA step's copies of the adapted weights (measured on the compiled 7B calibration steps): the merged
    W + scale A B of every layer and its gradient, both in the parameter dtype, all layers at once (the adapters'
    gradients are contracted from it)."""
    m = cfg.model
    adapted = sum(b for g, _, _, b in groups if g.split(".")[-1] in cfg.train.lora_targets)
    return ("LoRA merged weights + their gradient", 2 * adapted,
            f"estimate: W + A B of the adapted weights and its gradient, {m.param_dtype}")


def _head_row(m: ModelConfig, mesh, rules) -> tuple[str, int, str]:
    """The LM head all-gathered over fsdp: what XLA does for calibration's few logit positions (measured on the
    compiled 7B calibration step; with thousands of positions per row it gathers the activations instead)."""
    head = m.hidden_size * m.vocab_size * _itemsize(m.dtype) // _factor(mesh, rules, "vocab", m.vocab_size)
    return ("LM head, all-gathered", head, "estimate: XLA's layout for the windows' few logit positions")


def _calibration_tokens(cfg: RunConfig) -> tuple[int, int, int]:
    """(queries, keys per query, logit positions) per row of a calibration step (`calibration.step_tokens`:
    block_causal drafters run the row plus windows x gamma block queries, bidirectional ones re-encode
    windows x (draft_window + gamma) tokens)."""
    c = cfg.calibrate
    return step_tokens(cfg.model, seq_len=cfg.data.seq_len, gamma=c.gamma or cfg.model.block_size, stride=c.stride,
                       windows_per_row=c.windows_per_row, draft_window=c.draft_window)


# --- the two modes ---------------------------------------------------------------------------------------


def resolve_mesh(cfg: RunConfig):
    """(mesh, abstract?) for the config: an AbstractMesh of mesh.num_devices, or the real devices."""
    if cfg.mesh.num_devices > 0:
        return shd.abstract_mesh(cfg.mesh, cfg.mesh.num_devices), True
    return shd.make_mesh(cfg.mesh), False


def _budget(cfg: RunConfig, mesh, abstract: bool) -> int | None:
    if cfg.mesh.device_memory_gb > 0:
        return int(cfg.mesh.device_memory_gb * GiB)
    if not abstract:
        stats = jax.devices()[0].memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    return None


def _params_row(abstract_state, mesh, rules) -> int:
    return _tree_bytes(nnx.to_pure_dict(abstract_state), shd.param_shardings(abstract_state, mesh, rules))


def verifier_config(cfg: RunConfig) -> ModelConfig | None:
    ref = cfg.pair.verifier_config
    if not ref:
        return None
    for cand in (CONFIGS_DIR / ref, Path(ref)):
        if cand.is_file():
            return load_config(cand, tokenizer=NoTokenizer()).model
    raise ConfigError(f"pair.verifier_config={ref!r} was found neither under {CONFIGS_DIR} nor at that path; "
                      "point it at a run config such as models/qwen2.5-72b.yaml")


def train_report(cfg: RunConfig) -> Report:
    """Per-device memory of one training step of `cfg` (pretraining or calibration)."""
    mesh, abstract = resolve_mesh(cfg)
    rules = cfg.mesh.logical_axis_rules
    lay = training.state_layout(cfg, mesh)  # shapes only: no objective, nothing compiled
    shapes, st_sh = lay.shapes, lay.state_sh
    _, abstract_state = nnx.split(abstract_model(cfg.model))
    m, tc = cfg.model, cfg.train
    rows = []
    params_b = _tree_bytes(shapes["params"], st_sh["params"])
    lora = getattr(tc, "lora_rank", 0) > 0
    if lora:
        rows.append(("frozen base parameters", _params_row(abstract_state, mesh, rules), str(m.param_dtype)))
        rows.append((f"LoRA adapters (rank {tc.lora_rank})", params_b, "trained"))
    else:
        rows.append(("parameters", params_b, str(m.param_dtype)))
    rows.append(("optimizer state (AdamW)", _tree_bytes(shapes["opt_state"], st_sh["opt_state"]),
                 "moments sharded like the trained parameters"))
    rows.append(("gradients", params_b * (2 if tc.grad_accum > 1 else 1),
                 "+ accumulator" if tc.grad_accum > 1 else "one copy"))
    B = cfg.data.batch_size
    groups = _groups(abstract_state, mesh, rules)
    if lora:
        rows.append(_lora_row(cfg, groups))
    gathered = gathered_weight_bytes(m, mesh, rules, tc.remat)
    if gathered:
        rows.append(("gathered layer weights", gathered, "estimate: every layer's weights all-gathered over fsdp, "
                     "kept for the backward pass (remat none)"))
    if tc.objective == "calibrate":
        check_drafter(m)  # calibration trains diffusion drafters with a mask token: say so before any figure
        q, keys, lt = _calibration_tokens(cfg)
        how = (f"windows x (draft window + gamma) = {q} queries" if m.attention == "bidirectional"
               else f"{cfg.data.seq_len} + windows x gamma = {q} queries")
        chunk = 0 if cfg.calibrate.loss in ("kd_first", "kd_window") else tc.vocab_chunk  # kd: whole q
        note = f"estimate: {B} rows x ({how}), remat {tc.remat}, vocab_chunk {chunk}"
        act = activation_bytes(m, mesh, rules, rows=B, tokens=q, keys=keys, logits_tokens=lt, remat=tc.remat,
                               vocab_chunk=chunk)
        rows += [("activations", act, note), _head_row(m, mesh, rules)]
        v = verifier_config(cfg)
        if cfg.calibrate.loss in ("kd_first", "kd_window") and v is not None:  # the frozen teacher
            rows.append(("verifier (teacher) parameters", _params_row(nnx.state(abstract_model(v)), mesh, rules),
                         f"frozen, {v.param_dtype}"))
            rows.append(("verifier forward", activation_bytes(v, mesh, rules, rows=B, tokens=cfg.data.seq_len,
                                                              backward=False), "estimate: one layer at a time"))
    else:
        T = cfg.data.seq_len * (2 if tc.objective == "mdlm" else 1)  # mdlm: the two-stream layout
        act = activation_bytes(m, mesh, rules, rows=B, tokens=T, remat=tc.remat, vocab_chunk=tc.vocab_chunk)
        rows.append(("activations", act, f"estimate: {B} rows x {T} tokens per micro-batch, remat {tc.remat}, "
                     f"vocab_chunk {tc.vocab_chunk}"))
    rows.append(("KV cache", 0, "none in training"))
    return Report("train", dict(mesh.shape), abstract, rows, groups, _budget(cfg, mesh, abstract))


def decode_plan(cfg: RunConfig, sampling: dict | None = None) -> DecodePlan:
    """What the decode dry run of `cfg` plans: the pair (model = drafter, pair.verifier_config = verifier;
    speculative decoding with pair.num_drafts drafts of pair.gamma tokens) or, without a verifier config, `ar`
    decoding of `cfg.model`; pair.batch_size rows of pair.prompt_tokens + max_new_tokens. sampling: the verifier's
    temperature / top_k / top_p (default temperature 1, no filters)."""
    p = cfg.pair
    v = verifier_config(cfg)
    d = cfg.model if v is not None else None
    v = v or cfg.model
    G, K = (p.gamma, p.num_drafts) if d is not None else (0, 1)
    plan = DecodePlan(v, d, batch=p.batch_size, prompt_tokens=p.prompt_tokens, max_new_tokens=p.max_new_tokens,
                      gamma=G, num_drafts=K, draft_window=p.draft_window, **(sampling or {}))
    cap = plan.prompt_tokens + plan.max_new_tokens + G
    for who, mc in (("verifier", v), ("drafter", d)):
        if mc is not None and cap > mc.max_seq_len and (who == "verifier" or mc.attention != "bidirectional"):
            raise ConfigError(f"pair: prompt_tokens + max_new_tokens + gamma = {cap} exceeds the {who}'s "
                              f"max_seq_len={mc.max_seq_len}; lower pair.prompt_tokens / max_new_tokens")
    return plan


def decode_report(cfg: RunConfig, sampling: dict | None = None) -> Report:
    """Per-device memory of speculative decoding with the pair of `cfg` (model = drafter, pair.verifier_config =
    verifier); without a pair section, autoregressive decoding of `cfg.model` (`decode_plan`)."""
    mesh, abstract = resolve_mesh(cfg)
    rules = cfg.mesh.logical_axis_rules
    plan = decode_plan(cfg, sampling)
    v, d = plan.verifier, plan.drafter
    B, P, N = plan.batch, plan.prompt_tokens, plan.max_new_tokens
    G, K = plan.gamma, plan.num_drafts
    cap = P + N + G
    rows, groups = [], []
    v_state = nnx.state(abstract_model(v))
    rows.append(("verifier parameters", _params_row(v_state, mesh, rules), f"{v.param_dtype}, frozen"))
    groups += [("verifier." + g, *rest) for g, *rest in _groups(v_state, mesh, rules)]

    def cache_bytes(mc):
        c = jax.eval_shape(lambda: KVCache.init(mc, B, min(cap, mc.max_seq_len)))
        sh = shd.cache_sharding(mesh, rules, c.k[0].shape)
        per_layer = per_device_bytes(c.k[0].shape, c.k[0].dtype, sh)
        return 2 * len(c.k) * per_layer, "layers x " + str(sh.spec).replace("PartitionSpec", "P")

    vc, vspec = cache_bytes(v)
    acts = [("prefill", activation_bytes(v, mesh, rules, rows=B, tokens=P, backward=False, logits_tokens=1)),
            ("verify", activation_bytes(v, mesh, rules, rows=B, tokens=K * (G + 1), keys=cap + K * (G + 1),
                                        backward=False))]
    if d is not None:
        d_state = nnx.state(abstract_model(d))
        rows.append(("drafter parameters", _params_row(d_state, mesh, rules), f"{d.param_dtype}, frozen"))
        groups += [("drafter." + g, *rest) for g, *rest in _groups(d_state, mesh, rules)]
        if d.attention == "bidirectional":  # re-encodes a window each round: no cache
            W = max(1, min(plan.draft_window, P + N, d.max_seq_len - G))
            acts.append(("draft", activation_bytes(d, mesh, rules, rows=B * K, tokens=W + G, backward=False,
                                                   logits_tokens=G)))
        else:
            dc, _ = cache_bytes(d)
            rows.append(("drafter KV cache", dc, f"[{d.num_layers}, {B}, {cap}, {d.num_kv_heads}, {d.head_dim}] x 2"))
            acts.append(("draft", activation_bytes(d, mesh, rules, rows=B, tokens=2 * G + 1 + (K - 1) * G,
                                                   keys=cap, backward=False)))
    name, act = max(acts, key=lambda a: a[1])
    probs = B * K * (G + 1) * v.num_sampleable * 4 * 3  # p (and q) over the sampleable vocabulary, f32, replicated
    rows.append(("activations", act + probs, f"estimate: largest forward of a round ({name}) + probabilities"))
    rows.append(("verifier KV cache", vc, f"[{v.num_layers}, {B}, {cap}, {v.num_kv_heads}, {v.head_dim}] x 2, "
                                          f"{vspec}"))
    return Report("decode", dict(mesh.shape), abstract, rows, groups, _budget(cfg, mesh, abstract))


def check(report: Report) -> None:
    if not report.fits:
        worst = max(report.rows, key=lambda r: r[1])
        raise DoesNotFit(
            f"the {report.mode} run needs {report.total / GiB:.2f} GiB per device but mesh.device_memory_gb="
            f"{report.budget / GiB:.2f}; the largest item is {worst[0]} ({worst[1] / GiB:.2f} GiB). Use more "
            "devices (mesh.num_devices) or shard more (mesh.fsdp / mesh.tensor), lower data.batch_size (raising "
            "train.grad_accum keeps the tokens per update) or data.seq_len (decoding: pair.batch_size / "
            "prompt_tokens), or bf16 parameters (model.param_dtype=bfloat16)")


def run(cfg: RunConfig, mode: str, *, out=print, compiled: tuple[int, int] | None = None,
        sampling: dict | None = None) -> Report:
    """Print the dry-run table of `mode` (train | decode) and raise DoesNotFit if it does not fit.

    compiled: two small layer counts: also compile the train step (decode: the prefill and the decode loop) at
    those depths on fake CPU devices and report XLA's figure, extrapolated to the full depth, beside the estimate
    (compiled_memory.measure / measure_decode; the fit check then uses it). sampling: the decode plan's verifier
    temperature / top_k / top_p (`decode_plan`)."""
    from specdiff_jax import compiled_memory

    with _fast_abstract_init():
        report = train_report(cfg) if mode == "train" else decode_report(cfg, sampling)
    if compiled is not None:
        report.compiled = (compiled_memory.measure(cfg, compiled) if mode == "train" else
                           compiled_memory.measure_decode(cfg, decode_plan(cfg, sampling), compiled))
    out(report.table())
    check(report)
    return report


COMPILED_HELP = ("also compile the train step (decoding: the prefill and the decode loop) on fake CPU devices at "
                 "two small layer counts (default 2,4) and report XLA's per-device figure, extrapolated to the full "
                 "depth, beside the estimate")


def compiled_layers(arg: str | None) -> tuple[int, int] | None:
    """The --compiled argument ("L1,L2") as two layer counts, or None."""
    if arg is None:
        return None
    try:
        a, b = (int(x) for x in arg.split(","))
    except ValueError:
        raise ConfigError(f"--compiled {arg!r}: give two layer counts, e.g. --compiled 2,4") from None
    if not 0 < a < b:
        raise ConfigError(f"--compiled {arg!r}: give two increasing positive layer counts, e.g. 2,4")
    return a, b


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m specdiff_jax.dryrun", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--mode", choices=("train", "decode", "both"), default="both")
    ap.add_argument("--compiled", action="store_true", help=COMPILED_HELP)
    ap.add_argument("--compiled-layers", default="2,4", metavar="L1,L2", help="the two layer counts compiled")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, tokenizer=NoTokenizer())
        for mode in (("train", "decode") if args.mode == "both" else (args.mode,)):
            run(cfg, mode, compiled=compiled_layers(args.compiled_layers) if args.compiled else None)
            print()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
