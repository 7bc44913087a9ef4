"""XLA's own per-device memory figure for a run's train step: compiled, never run, on fake CPU devices.

    python -m specdiff_jax.compiled_memory CONFIG.yaml 2,4     # (what `--dry-run --compiled` runs in a child)

`compile_train_step(cfg)` lowers the real jitted train step (`training.programs`, the same shardings and the same
objective as a run) with abstract inputs for the mesh of `cfg` and reads `compiled.memory_analysis()`: nothing is
allocated. The mesh needs that many devices: `measure` runs the compile in a child process started with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (the flag must be set before JAX initialises), for two
small layer counts, and extrapolates linearly to the model's depth. XLA's per-device figures are linear in the
number of layers (compiled 4 and 8 layers of Qwen2.5-7B predict 16, 24 and 32 to 0.01 GiB) while the compile
time grows about with its square, so a big model is never compiled at full depth.

On CPU, XLA computes bf16 matmuls in f32 and may keep f32 copies of bf16 arrays that a TPU would not: for a
bf16 model the compiled figure is an upper estimate of the accelerator's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

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
                 mask_id=m.mask_token_id)
    return make_objective(s)


def compile_train_step(cfg, devices=None) -> Bytes:
    """Per-device bytes (argument, output, alias, temp, total) of the compiled train step of `cfg` on a mesh of
    `devices` (default: the first mesh.num_devices devices). total = argument + output - alias + temp."""
    from flax import nnx

    from specdiff_jax import sharding as shd
    from specdiff_jax import training
    from specdiff_jax.model import abstract_model

    n = cfg.mesh.num_devices or jax.device_count()
    devices = jax.devices()[:n] if devices is None else devices
    if len(devices) < n:
        raise ValueError(f"the mesh needs {n} devices but {len(devices)} exist; set XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={n} before JAX starts (measure() does)")
    mesh = shd.make_mesh(cfg.mesh, devices)
    prog = training.programs(cfg, mesh, _objective(cfg))
    A, B, L = cfg.train.grad_accum, cfg.data.batch_size, cfg.data.seq_len
    tokens = jax.ShapeDtypeStruct((A, B, L), np.int32)
    frozen = None
    if prog.frozen_sh is not None:  # LoRA: the frozen base is an input of the step
        frozen = _abstract(nnx.to_pure_dict(nnx.state(abstract_model(cfg.model), nnx.Param)))
    lowered = prog.train_step.lower(_abstract(prog.shapes), {"tokens": tokens, "segment_ids": tokens}, frozen)
    ma = lowered.compile().memory_analysis()
    out = {f: int(getattr(ma, f"{f}_size_in_bytes")) for f in FIELDS}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


@dataclasses.dataclass
class Compiled:
    """XLA's per-device figures extrapolated to the model's depth from two compiled layer counts."""

    bytes: Bytes  # at full depth (extrapolated): argument, output, alias, temp, total
    layers: tuple[int, int]
    measured: dict[int, Bytes]  # per compiled layer count
    seconds: float  # wall time of the child (startup + both compiles)

    @property
    def total(self) -> int:
        return self.bytes["total"]


def extrapolate(measured: dict[int, Bytes], depth: int) -> Bytes:
    """Linear in the layer count through the two measured points."""
    (a, fa), (b, fb) = sorted(measured.items())
    return {k: int(round(fa[k] + (fb[k] - fa[k]) * (depth - a) / (b - a))) for k in fa}


def measure(cfg, layers: tuple[int, int] = (2, 4), *, timeout: float | None = None) -> Compiled:
    """Compile the train step of `cfg` at `layers` decoder layers in a child process with the mesh's number of
    fake CPU devices and extrapolate to cfg.model.num_layers. Raises RuntimeError with the child's error."""
    from specdiff_jax.config.run import save_config

    n = cfg.mesh.num_devices or jax.device_count()
    depth = cfg.model.num_layers
    layers = tuple(sorted({min(k, depth) for k in layers}))
    if len(layers) != 2:
        raise ValueError(f"need two distinct layer counts below the model's {depth} layers, got {layers}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        save_config(cfg.replace(mesh=dataclasses.replace(cfg.mesh, num_devices=n)), path)
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "specdiff_jax.compiled_memory", path,
                               ",".join(map(str, layers))], env=env, capture_output=True, text=True,
                              timeout=timeout)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"compiling the train step on {n} fake CPU devices failed: {proc.stderr[-2000:]}")
    measured = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    return Compiled(extrapolate(measured, depth), layers, measured, seconds)


def _main(argv) -> int:
    from specdiff_jax.config.run import NoTokenizer, load_config

    path, layers = argv[0], [int(k) for k in argv[1].split(",")]
    cfg = load_config(path, tokenizer=NoTokenizer())
    out = {}
    for k in layers:
        out[k] = compile_train_step(cfg.replace(model=dataclasses.replace(cfg.model, num_layers=k)))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
