"""XLA's own per-device memory figure for a run's train step and decode kernels: compiled, never run, on fake
CPU devices.

    python -m specdiff_jax.compiled_memory CONFIG.yaml 2,4     # (what `--dry-run --compiled` runs in a child)
    python -m specdiff_jax.compiled_memory --decode JOB.json   # (the decode dry run's child)

`compile_train_step(cfg)` lowers the real jitted train step (`training.programs`, the same shardings and the same
objective as a run) with abstract inputs for the mesh of `cfg` and reads `compiled.memory_analysis()`: nothing is
allocated. The mesh needs that many devices: `measure` runs the compile in a child process started with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (the flag must be set before JAX initialises), for two
small layer counts, and extrapolates linearly to the model's depth. XLA's per-device figures are linear in the
number of layers (compiled 4 and 8 layers of Qwen2.5-7B predict 16, 24 and 32 to 0.01 GiB) while the compile
time grows about with its square, so a big model is never compiled at full depth.

`compile_decode(cfg, plan)` does the same for decoding: the jitted prefill and the draft-verify `while_loop` of
`specdiff_jax.decode.kernel`, built by the `Decoder` from abstract models (`model.abstract_model`: parameters are
`jax.ShapeDtypeStruct`s placed by their logical axes) and lowered with abstract prompts and carry, as sharded
decoding jits them. Its per-device figure for each kernel counts every parameter of both models as resident (the
Decoder holds them while either kernel runs). A pair's figure is linear in the verifier's and in the drafter's
depth: `measure_decode` compiles three (verifier, drafter) layer counts and extrapolates in both.

On CPU, XLA computes bf16 matmuls in f32 and keeps f32 copies of bf16 arrays that a TPU would not: for a bf16
model the compiled figure is an upper estimate of the accelerator's. Each bf16 compile is therefore dumped and
read back (`specdiff_jax.cpu_widening`): `live` is the peak of its live buffers and `tpu` the same peak with every
value counted at a TPU's size (f32 copies of bf16 weights not at all, f32 values the program holds in bf16 at
half), both with the parameters XLA dropped from a kernel's arguments added back and extrapolated like the rest.
`Compiled.tpu` is then an estimate of the accelerator's figure; `widening` (live - tpu) and `packing` (XLA's
figure - live: the CPU heap's layout on top of the live buffers) say where the rest of the CPU figure goes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

Bytes = dict[str, int]
FIELDS = ("argument", "output", "alias", "temp")


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _objective(cfg):
    """The run's objective: the built-in one, or calibration's for train.objective=calibrate (no teacher)."""
    if cfg.train.objective != "calibrate":
        return None
    from specdiff_jax.calibration.objective import make_objective
    from specdiff_jax.calibration.windows import Settings, num_windows

    c, m = cfg.calibrate, cfg.model
    if c.loss in ("kd_first", "kd_window"):
        raise ValueError(f"calibrate.loss={c.loss}: the compiled figure covers the losses without a teacher")
    s = Settings(loss=c.loss, gamma=c.gamma or m.block_size, stride=c.stride,
                 windows=num_windows(cfg.data.seq_len, c.stride), windows_per_row=c.windows_per_row,
                 temperature=c.temperature, mdlm_t_min=cfg.train.mdlm_t_min, num_sampleable=m.num_sampleable,
                 mask_id=m.mask_token_id, draft_window=c.draft_window, pad_id=m.pad_token_id or 0,
                 vocab_chunk=cfg.train.vocab_chunk)
    return make_objective(s)


def _mesh(cfg, devices):
    """The mesh of `cfg` over `devices` (default: the first mesh.num_devices devices)."""
    from specdiff_jax import sharding as shd

    n = cfg.mesh.num_devices or jax.device_count()
    devices = jax.devices()[:n] if devices is None else devices
    if len(devices) < n:
        raise ValueError(f"the mesh needs {n} devices but {len(devices)} exist; set XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={n} before JAX starts (measure() does)")
    return shd.make_mesh(cfg.mesh, devices)


def compile_train_step(cfg, devices=None) -> Bytes:
    """Per-device bytes (argument, output, alias, temp, total) of the compiled train step of `cfg` on a mesh of
    `devices` (default: the first mesh.num_devices devices). total = argument + output - alias + temp."""
    from flax import nnx

    from specdiff_jax import sharding as shd
    from specdiff_jax import training
    from specdiff_jax.model import abstract_model

    mesh = _mesh(cfg, devices)
    prog = training.programs(cfg, mesh, _objective(cfg))
    A, B, L = cfg.train.grad_accum, cfg.data.batch_size, cfg.data.seq_len
    tokens = jax.ShapeDtypeStruct((A, B, L), np.int32)
    frozen = None
    if prog.frozen_sh is not None:  # LoRA: the frozen base is an input of the step
        frozen = _abstract(nnx.to_pure_dict(nnx.state(abstract_model(cfg.model), nnx.Param)))
    lowered = prog.train_step.lower(_abstract(prog.shapes), {"tokens": tokens, "segment_ids": tokens}, frozen)
    out, live = _compile(lowered, cfg.model.dtype == "bfloat16")
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["live"], out["tpu"] = (live["peak"], live["peak_tpu"]) if live else (out["total"], out["total"])
    return out


def _compile(lowered, bf16: bool) -> tuple[Bytes, dict | None]:
    """Compile `lowered`: (XLA's argument/output/alias/temp bytes, its peak of live bytes as compiled and at a TPU's
    sizes: `cpu_widening.widening`; None for a program without bf16 compute, or when this XLA's dump is not the one
    `cpu_widening` reads: then only the CPU figure is reported)."""
    def fields(compiled) -> Bytes:
        ma = compiled.memory_analysis()
        return {f: int(getattr(ma, f"{f}_size_in_bytes")) for f in FIELDS}

    if not bf16:
        return fields(lowered.compile()), None
    from specdiff_jax.cpu_widening import widening

    with tempfile.TemporaryDirectory() as d:
        compiled = lowered.compile(compiler_options={"xla_dump_to": d})
        try:
            return fields(compiled), widening(d)
        except (ValueError, KeyError, IndexError, OSError):
            return fields(compiled), None


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """What a decode dry run compiles: the verifier (and the drafter: speculative decoding with K drafts of gamma
    tokens; None: `ar` decoding of the verifier), the kernel's shapes and the verifier's sampling filters."""

    verifier: Any  # ModelConfig
    drafter: Any  # ModelConfig or None
    batch: int
    prompt_tokens: int
    max_new_tokens: int
    gamma: int = 0
    num_drafts: int = 1
    draft_window: int = 512
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["verifier"] = self.verifier.to_dict()
        d["drafter"] = None if self.drafter is None else self.drafter.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DecodePlan":
        from specdiff_jax.config import ModelConfig

        drafter = None if d["drafter"] is None else ModelConfig.from_dict(d["drafter"])
        return cls(**{**d, "verifier": ModelConfig.from_dict(d["verifier"]), "drafter": drafter})

    def with_layers(self, verifier: int, drafter: int) -> "DecodePlan":
        v = dataclasses.replace(self.verifier, num_layers=verifier)
        d = None if self.drafter is None else dataclasses.replace(self.drafter, num_layers=drafter)
        return dataclasses.replace(self, verifier=v, drafter=d)


def _placed(model, mesh, rules):
    """(graphdef, state of ShapeDtypeStructs carrying the parameters' NamedShardings) of an abstract model."""
    from flax import nnx

    from specdiff_jax import sharding as shd

    graphdef, state = nnx.split(model)
    sh = shd.param_shardings(state, mesh, rules)
    sds = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nnx.to_pure_dict(state), sh)
    out = nnx.State(state)
    nnx.replace_by_pure_dict(out, sds)
    return graphdef, out


def _device_bytes(tree) -> int:
    """Per-device bytes of a pytree of ShapeDtypeStructs carrying their shardings."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree) if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended))


def _kernel_bytes(lowered, bf16: bool, params: int, inputs: int) -> Bytes:
    """argument/output/alias/temp of a kernel, compiled, plus the resident parameters (every parameter of both
    models: XLA drops the ones a kernel never reads from its arguments) and the other inputs; total = parameters +
    inputs + output - alias + temp, what a device holds while the kernel runs; live / tpu: `_compile`'s peaks plus the
    parameters XLA dropped from the arguments."""
    out, live = _compile(lowered, bf16)
    out.update(parameters=params, inputs=inputs)
    out["total"] = params + inputs + out["output"] - out["alias"] + out["temp"]
    dropped = params + inputs - out["argument"]
    out["live"], out["tpu"] = (live["peak"] + dropped, live["peak_tpu"] + dropped) if live else (out["total"],) * 2
    return out


def compile_decode(cfg, plan: DecodePlan, devices=None) -> dict[str, Bytes]:
    """Per-device bytes of the compiled prefill and decode loop ({"prefill": Bytes, "decode": Bytes}) of `plan` on
    the mesh of `cfg` (default: the first mesh.num_devices devices), as `Decoder(..., mesh=mesh)` jits them."""
    from specdiff_jax import sharding as shd
    from specdiff_jax.decode import core, kernel
    from specdiff_jax.model import abstract_model

    mesh = _mesh(cfg, devices)
    rules = tuple((k, tuple(a) if isinstance(a, list) else a) for k, a in cfg.mesh.logical_axis_rules)
    vm = abstract_model(plan.verifier)
    dm = None if plan.drafter is None else abstract_model(plan.drafter)
    method = "ar" if dm is None else "specdiff2"
    dec = core.Decoder(vm, dm, method=method, max_new_tokens=plan.max_new_tokens, temperature=plan.temperature,
                       top_k=plan.top_k, top_p=plan.top_p, gamma=max(plan.gamma, 1), num_drafts=plan.num_drafts,
                       draft_window=plan.draft_window)
    spec, _, _ = dec._spec([[0] * plan.prompt_tokens] * plan.batch)  # validated shapes, nothing compiled
    gv, vstate = _placed(vm, mesh, rules)
    gd, dstate = _placed(dm, mesh, rules) if dm is not None else (None, None)
    pre, loop = kernel.compiled(spec, gv, gd, (mesh, rules), vstate, dstate)
    params = _device_bytes(vstate) + (_device_bytes(dstate) if dstate is not None else 0)
    rep = shd.replicated(mesh)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, np.int32, sharding=rep)  # noqa: E731
    prompt = (i32(spec.batch, spec.bucket), i32(spec.batch), i32(), jax.ShapeDtypeStruct((), np.float32, sharding=rep))
    bf16 = "bfloat16" in (plan.verifier.dtype, getattr(plan.drafter, "dtype", None))
    lowered = pre.lower(vstate, dstate, *prompt)
    out = {"prefill": _kernel_bytes(lowered, bf16, params, _device_bytes(prompt))}
    carry = lowered.out_info
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
    out["decode"] = _kernel_bytes(loop.lower(vstate, dstate, carry, key), bf16, params, _device_bytes(carry))
    return out


@dataclasses.dataclass
class Compiled:
    """XLA's per-device figures extrapolated to the model's depth from two compiled layer counts (decoding: the
    peak of the prefill and the decode loop, both in `kernels`)."""

    bytes: Bytes  # at full depth (extrapolated): argument, output, alias, temp, total, live, tpu
    layers: tuple[int, int]
    measured: dict  # per compiled layer count (decoding: per "verifier,drafter" layer counts, each per kernel)
    seconds: float  # wall time of the child (startup + every compile)
    kernels: dict[str, Bytes] | None = None  # decoding: each kernel's figures at full depth

    @property
    def total(self) -> int:
        return self.bytes["total"]

    @property
    def tpu(self) -> int:
        """The peak of live buffers with every value at the size a TPU holds it (`cpu_widening`): an estimate of the
        accelerator's figure (= total for a program without bf16 compute; decoding: the larger kernel's)."""
        if self.kernels is not None:
            return max(k.get("tpu", k["total"]) for k in self.kernels.values())
        return self.bytes.get("tpu", self.total)

    @property
    def widening(self) -> int:
        """Bytes of the CPU's f32 widening of bf16 values at the peak of live buffers (0 without bf16 compute)."""
        return self.bytes.get("live", self.total) - self.tpu

    @property
    def packing(self) -> int:
        """XLA's figure beyond the peak of live buffers: the CPU heap's layout (0 without bf16 compute)."""
        return self.total - self.bytes.get("live", self.total)

    @property
    def peak(self) -> str | None:
        """The decode kernel whose figure is the peak (None for training)."""
        return None if self.kernels is None else max(self.kernels, key=lambda k: self.kernels[k]["total"])


def extrapolate(measured: dict[int, Bytes], depth: int) -> Bytes:
    """Linear in the layer count through the two measured points."""
    (a, fa), (b, fb) = sorted(measured.items())
    return {k: int(round(fa[k] + (fb[k] - fa[k]) * (depth - a) / (b - a))) for k in fa}


def extrapolate_pair(base: Bytes, more_verifier: Bytes, more_drafter: Bytes, layers: tuple[int, int],
                     depth: tuple[int, int]) -> Bytes:
    """Linear in the verifier's and in the drafter's depth: base at (a, a) layers, more_verifier at (b, a),
    more_drafter at (a, b) for layers = (a, b), extrapolated to depth = (verifier layers, drafter layers)."""
    a, b = layers
    dv = extrapolate({a: base, b: more_verifier}, depth[0])
    dd = extrapolate({a: base, b: more_drafter}, depth[1])
    return {k: dv[k] + dd[k] - base[k] for k in base}


def _layer_counts(layers, depth: int, who: str) -> tuple[int, int]:
    out = tuple(sorted({min(k, depth) for k in layers}))
    if len(out) != 2:
        raise ValueError(f"need two distinct layer counts below the {who}'s {depth} layers, got {out}")
    return out


def _child(args: list[str], n: int, what: str, timeout: float | None):
    """Run `python -m specdiff_jax.compiled_memory ARGS` with n fake CPU devices: (its last JSON line, seconds)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "specdiff_jax.compiled_memory", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"compiling the {what} on {n} fake CPU devices failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), seconds


def _mesh_config_file(cfg, n: int, tmp: str) -> str:
    from specdiff_jax.config.run import save_config

    path = os.path.join(tmp, "config.yaml")
    save_config(cfg.replace(mesh=dataclasses.replace(cfg.mesh, num_devices=n)), path)
    return path


def measure(cfg, layers: tuple[int, int] = (2, 4), *, timeout: float | None = None) -> Compiled:
    """Compile the train step of `cfg` at `layers` decoder layers in a child process with the mesh's number of
    fake CPU devices and extrapolate to cfg.model.num_layers. Raises RuntimeError with the child's error."""
    n = cfg.mesh.num_devices or jax.device_count()
    depth = cfg.model.num_layers
    layers = _layer_counts(layers, depth, "model")
    with tempfile.TemporaryDirectory() as tmp:
        out, seconds = _child([_mesh_config_file(cfg, n, tmp), ",".join(map(str, layers))], n, "train step",
                              timeout)
    measured = {int(k): v for k, v in out.items()}
    return Compiled(extrapolate(measured, depth), layers, measured, seconds)


def measure_decode(cfg, plan: DecodePlan, layers: tuple[int, int] = (2, 4), *,
                   timeout: float | None = None) -> Compiled:
    """Compile the decode kernels of `plan` on the mesh of `cfg` in a child process with the mesh's number of fake
    CPU devices: at `layers` verifier layers (ar), or at (a, a), (b, a), (a, b) (verifier, drafter) layers for a
    pair; extrapolate to the models' depths. bytes = the peak kernel's figures."""
    n = cfg.mesh.num_devices or jax.device_count()
    depth_v = plan.verifier.num_layers
    layers = _layer_counts(layers, depth_v, "verifier")
    if plan.drafter is None:
        points = [(k, 0) for k in layers]
    else:
        layers = _layer_counts(layers, min(depth_v, plan.drafter.num_layers), "drafter")
        a, b = layers
        points = [(a, a), (b, a), (a, b)]
    with tempfile.TemporaryDirectory() as tmp:
        job = os.path.join(tmp, "job.json")
        with open(job, "w") as f:
            json.dump({"plan": plan.to_dict(), "points": points}, f)
        out, seconds = _child(["--decode", job, _mesh_config_file(cfg, n, tmp)], n, "decode kernels", timeout)
    measured = {",".join(map(str, pt)): r for pt, r in zip(points, out)}
    if plan.drafter is None:
        kernels = {k: extrapolate({a: r[k] for (a, _), r in zip(points, out)}, depth_v) for k in out[0]}
    else:
        depth = (depth_v, plan.drafter.num_layers)
        kernels = {k: extrapolate_pair(out[0][k], out[1][k], out[2][k], layers, depth) for k in out[0]}
    peak = max(kernels, key=lambda k: kernels[k]["total"])
    return Compiled(kernels[peak], layers, measured, seconds, kernels)


def _main(argv) -> int:
    from specdiff_jax.config.run import NoTokenizer, load_config

    if argv[0] == "--decode":
        with open(argv[1]) as f:
            job = json.load(f)
        cfg = load_config(argv[2], tokenizer=NoTokenizer())
        plan = DecodePlan.from_dict(job["plan"])
        print(json.dumps([compile_decode(cfg, plan.with_layers(*pt)) for pt in job["points"]]))
        return 0
    path, layers = argv[0], [int(k) for k in argv[1].split(",")]
    cfg = load_config(path, tokenizer=NoTokenizer())
    out = {}
    for k in layers:
        out[k] = compile_train_step(cfg.replace(model=dataclasses.replace(cfg.model, num_layers=k)))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
