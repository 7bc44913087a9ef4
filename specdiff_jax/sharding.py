"""Device mesh and logical-axis sharding (the MaxText pattern).

Code names *logical* axes only (`batch`, `embed`, `heads`, `kv_heads`, `mlp`, `vocab`, `norm`, `length`,
`cache_batch`, `cache_length`); `mesh.logical_axis_rules` in the config maps each to a mesh axis (`data`, `fsdp`,
`tensor`), a tuple of mesh axes, or None (replicated). Parameters carry their logical axes as `logical_axes`
metadata on `nnx.Param` (see specdiff_jax.model).

A dimension whose size is not divisible by the product of its mesh axes falls back to replication on that
dimension (a tiny model on a big mesh still runs; it just is not split there).

Activations are held by logical axes too (`constrain`, the MaxText way): the model names the logical axes of each
layer's input/output, q/k/v, attention output, MLP hidden and logits, and inside `activation_sharding(mesh, rules)`
(the train and eval steps) each becomes a `with_sharding_constraint`. Outside that context `constrain` is the
identity, so decoding and single-device code run unchanged. Without these constraints XLA is free to gather
activations over the whole batch (e.g. the logits of every row on every device), and per-device memory at a fixed
per-device batch then grows with the number of devices.

Mesh sizes: `mesh.data/fsdp/tensor` are the sizes *within* a slice (ICI; one may be -1 = the rest of the slice's
devices), `mesh.dcn_data/dcn_fsdp/dcn_tensor` the sizes *across* slices (DCN, multi-slice TPU); each mesh axis has
size ici * dcn. Without TPU slices (CPU, GPU) a DCN axis spans processes. `abstract_mesh` builds the same mesh for a
device count without devices (dry runs: shapes and per-device bytes, nothing allocated).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from specdiff_jax.config import ConfigError

# MaxText-style logical axis rules: logical name -> mesh axis, tuple of mesh axes, or None (replicated).
DEFAULT_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
)

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, Any]]


def _resolve(sizes: list[int], num_devices: int, what: str) -> tuple[int, ...]:
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({fixed} devices) do not divide "
                              f"the {num_devices} available devices{what}; change the mesh.* sizes")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                          f"{num_devices} are available{what}; set one mesh axis to -1 or fix the sizes")
    return tuple(sizes)


def mesh_shapes(mesh_cfg, num_devices: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(ici, dcn) sizes of (data, fsdp, tensor) for `num_devices` devices in all: within a slice and across slices."""
    dcn = tuple(getattr(mesh_cfg, f"dcn_{a}", 1) for a in MESH_AXES)
    slices = math.prod(dcn)
    if slices == 1:
        return _resolve([mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor], num_devices, ""), dcn
    if num_devices % slices:
        raise ConfigError(f"mesh.dcn_* sizes {dict(zip(MESH_AXES, dcn))} ask for {slices} slices, which do not "
                          f"divide the {num_devices} devices; fix mesh.dcn_data / dcn_fsdp / dcn_tensor")
    ici = _resolve([mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor], num_devices // slices,
                   f" per slice ({slices} slices)")
    return ici, dcn


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Resolve the (data, fsdp, tensor) sizes of `mesh_cfg` for `num_devices` devices (-1 = the rest)."""
    ici, dcn = mesh_shapes(mesh_cfg, num_devices)
    return tuple(i * d for i, d in zip(ici, dcn))


def make_mesh(mesh_cfg, devices: Sequence | None = None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes (data, fsdp, tensor) in Auto mode.

    Built directly with `Mesh(...)`: jax 0.10's `make_mesh` defaults to Explicit axes, which our code does not
    use. With DCN sizes > 1 the device grid is jax's hybrid (slice-aware) layout; on TPU the ICI grid follows the
    physical topology; elsewhere devices are laid out in `jax.devices()` order (process by process).
    """
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = mesh_shapes(mesh_cfg, len(devices))
    if math.prod(dcn) > 1:
        by_process = getattr(devices[0], "slice_index", None) is None  # CPU/GPU: one process = one granule
        granules = len({d.process_index for d in devices}) if by_process else \
            len({d.slice_index for d in devices})
        if granules != math.prod(dcn):
            what = "processes" if by_process else "TPU slices"
            raise ConfigError(f"mesh.dcn_* sizes {dict(zip(MESH_AXES, dcn))} need {math.prod(dcn)} {what}, but "
                              f"there are {granules}; set the dcn_* sizes to the number of {what}")
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process,
                                                    allow_split_physical_axes=True)
    elif devices[0].platform == "tpu":
        try:  # topology-aware order (ICI neighbours along the mesh axes)
            grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.array(devices, dtype=object).reshape(ici)
    else:
        grid = np.array(devices, dtype=object).reshape(ici)
    return Mesh(grid, MESH_AXES)


def abstract_mesh(mesh_cfg, num_devices: int):
    """An `AbstractMesh` of the config's shape for `num_devices` devices: sharding math without devices."""
    from jax.sharding import AbstractMesh

    return AbstractMesh(mesh_shape(mesh_cfg, num_devices), MESH_AXES)


def _rule_map(rules: Rules) -> dict[str, tuple[str, ...]]:
    out = {}
    for name, axes in rules:
        if axes is None:
            out[name] = ()
        elif isinstance(axes, str):
            out[name] = (axes,)
        else:
            out[name] = tuple(axes)
    return out


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for an array with the given logical axes.

    With `mesh` and `shape`, a dimension not divisible by its mesh axes' total size is replicated, and a mesh axis
    already used by an earlier dimension is not used twice. Unknown logical names (and None) are replicated.
    """
    rmap = _rule_map(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        axes = tuple(a for a in rmap.get(name, ()) if a not in used) if name is not None else ()
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def logical_sharding(mesh: Mesh, rules: Rules, logical_axes: Sequence[str | None],
                     shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh, shape))


def param_logical_axes(state: nnx.State) -> dict:
    """Pure-dict pytree (same structure as `nnx.to_pure_dict(state)`) of each parameter's logical axes tuple."""
    flat = {}
    for path, var in state.flat_state():
        axes = var.get_metadata().get("logical_axes") if hasattr(var, "get_metadata") else None
        flat[path] = tuple(axes) if axes is not None else (None,) * np.ndim(var.value)
    return _unflatten(flat)


def _unflatten(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def param_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> dict:
    """NamedShardings (pure-dict pytree) for the parameters of an `nnx.split` state, from their logical axes."""
    axes = param_logical_axes(state)
    values = nnx.to_pure_dict(state)
    return jax.tree.map(lambda ax, v: logical_sharding(mesh, rules, ax, np.shape(v)), axes, values,
                        is_leaf=lambda x: isinstance(x, tuple))


# one layer's KV cache k or v [batch, kv_heads, capacity, head_dim] (specdiff_jax.cache.KVCache)
CACHE_AXES = ("cache_batch", "kv_heads", "cache_length", None)


def cache_sharding(mesh, rules: Rules, shape: Sequence[int] | None = None) -> NamedSharding:
    return logical_sharding(mesh, rules, CACHE_AXES, shape)


def place_state(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """A copy of an `nnx.split` state with every parameter placed by its logical axes on `mesh`."""
    placed = jax.device_put(nnx.to_pure_dict(state), param_shardings(state, mesh, rules))
    out = nnx.State(state)
    nnx.replace_by_pure_dict(out, placed)
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def opt_state_shardings(tx, opt_state_shapes, param_sharding_tree, mesh: Mesh):
    """Shardings for an optax state: parameter-shaped subtrees (Adam moments) follow the parameters,
    everything else (counts, scalars) is replicated."""
    import optax

    return optax.tree_map_params(
        tx,
        lambda _, s: s,
        opt_state_shapes,
        param_sharding_tree,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2, *, leading: int = 0) -> NamedSharding:
    """Sharding of a token batch: `leading` unsharded dims (e.g. micro-batches), then batch, then length."""
    spec = logical_to_spec((None,) * leading + ("batch",) + ("length",) * (ndim - leading - 1), rules, mesh)
    return NamedSharding(mesh, spec)


# --- activations ---------------------------------------------------------------------------------------

_ACTIVATIONS: contextvars.ContextVar = contextvars.ContextVar("activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Rules):
    """Within this context (while a step is traced) `constrain` places activations on `mesh` by `rules`."""
    token = _ACTIVATIONS.set(None if mesh is None or mesh.size == 1 else (mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`x` held sharded by its logical axes (one name or None per dimension) inside `activation_sharding`;
    the identity outside it. Dimensions not divisible by their mesh axes stay replicated."""
    ctx = _ACTIVATIONS.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, rules, logical_axes, x.shape))


def with_activation_sharding(fn, mesh: Mesh | None, rules: Rules):
    """`fn` traced inside `activation_sharding(mesh, rules)` (wrap a step before jitting it)."""

    def wrapped(*args, **kwargs):
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


def describe(shardings: dict) -> list[str]:
    """Human-readable `path: spec` lines, for logs and dry runs."""
    lines = []
    for path, s in jax.tree_util.tree_leaves_with_path(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
        lines.append(f"{jax.tree_util.keystr(path)}: {s.spec}")
    return lines
