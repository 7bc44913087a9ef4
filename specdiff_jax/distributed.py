"""Multi-process start-up: `jax.distributed.initialize` from the config or the environment.

Call `initialize(cfg.mesh)` at the top of a program, before anything touches a JAX device. Where the settings
come from, first match wins:

    mesh.coordinator_address / num_processes / process_id    (config keys or key=value overrides)
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID    (environment)

`mesh.distributed` (or the environment variable SPECDIFF_DISTRIBUTED, which wins) says when to call it:
  auto  with a coordinator address (then process count and id are required), or on a multi-host TPU VM (the TPU
        runtime's TPU_WORKER_HOSTNAMES lists more than one worker, or MEGASCALE_COORDINATOR_ADDRESS is set: a
        multi-slice job); on a TPU pod `jax.distributed.initialize()` takes no arguments.
  on    always (without an address: the cluster auto-detection of TPU pods, SLURM, ...)
  off   never (one process)
After it, `jax.devices()` lists every process's devices and `jax.process_index()` / `process_count()` are set.
"""

from __future__ import annotations

import os
from typing import Mapping

from specdiff_jax.config import ConfigError

_DONE: dict = {}


def settings(mesh_cfg=None, env: Mapping[str, str] | None = None) -> dict | None:
    """The keyword arguments `initialize` would pass to jax.distributed.initialize, or None (single process)."""
    env = os.environ if env is None else env
    get = lambda key, default=None: getattr(mesh_cfg, key, default) if mesh_cfg is not None else default  # noqa: E731
    mode = env.get("SPECDIFF_DISTRIBUTED") or get("distributed", "auto")
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"distributed mode {mode!r} (mesh.distributed / SPECDIFF_DISTRIBUTED) must be auto, on or off")
    if mode == "off":
        return None
    addr = get("coordinator_address") or env.get("JAX_COORDINATOR_ADDRESS") or None
    nproc = get("num_processes")
    pid = get("process_id")
    try:
        nproc = int(env["JAX_NUM_PROCESSES"]) if nproc is None and env.get("JAX_NUM_PROCESSES") else nproc
        pid = int(env["JAX_PROCESS_ID"]) if pid is None and env.get("JAX_PROCESS_ID") else pid
    except ValueError:
        raise ConfigError("JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers") from None
    if addr:
        if nproc is None or pid is None:
            raise ConfigError(f"coordinator address {addr!r} is set but the process count or id is not: set "
                              "mesh.num_processes and mesh.process_id (or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
        if not 0 <= pid < nproc:
            raise ConfigError(f"process id {pid} is outside [0, {nproc}); number the processes 0..{nproc - 1}")
        return {"coordinator_address": addr, "num_processes": nproc, "process_id": pid}
    multi_host_tpu = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1 or \
        bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))
    if mode == "on" or multi_host_tpu:
        return {}  # auto-detected (TPU pods: no arguments)
    return None


def initialize(mesh_cfg=None, env: Mapping[str, str] | None = None) -> bool:
    """Start the multi-process runtime if the config/environment asks for it (idempotent). True if started."""
    kw = settings(mesh_cfg, env)
    if kw is None:
        return False
    if "kw" in _DONE:
        if _DONE["kw"] != kw:
            raise ConfigError(f"jax.distributed is already initialised with {_DONE['kw']}; cannot re-initialise "
                              f"with {kw}")
        return True
    import jax

    jax.distributed.initialize(**kw)
    _DONE["kw"] = kw
    return True
