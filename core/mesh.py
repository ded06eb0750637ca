"""Device mesh over (data, fsdp, tensor) and the one table mapping logical parameter axes to mesh axes.

Sharding is a data change: edit RULES (or the [mesh] section), not model code.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from core.config import MeshConfig
from core.errors import UserError

AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of axes, or None for replicated)
RULES: dict[str, object] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "inner": "tensor",  # Mamba's expanded channels
    "vocab": None,  # 259 byte ids do not split evenly; the head is small
    "state": None,
    "conv": None,
    "dt_rank": None,
}

# Decoding caches (models/contract.py), by cache type name: the logical axes of each field. Every other cache
# array (lengths, DLCM's J / open-concept sums, pending scan inputs, ...) splits its leading (batch) axis only.
# Keyed by name so that core/ imports no model module.
CACHE_AXES: dict[str, dict[str, tuple]] = {
    "KVCache": {"k": ("batch", "kv_heads", None, None), "v": ("batch", "kv_heads", None, None)},  # [B, G, S, D]
    "RingCache": {"k": ("batch", None, "kv_heads", None), "v": ("batch", None, "kv_heads", None)},  # [B, W, G, D]
    "MambaCache": {"conv": ("batch", None, "inner"), "ssm": ("batch", "inner", "state")},  # [B, K-1, E], [B, E, N]
}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh sizes must be positive with at most one -1; got {dict(zip(AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise UserError(f"mesh {dict(zip(AXES, sizes))} does not divide {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) > n_devices:
        raise UserError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices; {n_devices} available")
    return tuple(sizes)


def parse_mesh_spec(text: str) -> MeshConfig:
    """A command line's mesh, "data=2,tensor=2": the [mesh] section's axis sizes as comma-separated
    axis=size pairs (an axis not named has size 1; one size may be -1, the remaining devices). UserError for
    anything else (one line naming the valid form)."""
    form = f"axis=size pairs separated by commas, axes {', '.join(AXES)}, e.g. data=2,tensor=2"
    sizes: dict[str, int] = {}
    for part in str(text).split(","):
        name, eq, value = part.strip().partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise UserError(f"mesh {text!r}: {part.strip()!r} is not axis=size; want {form}")
        if name in sizes:
            raise UserError(f"mesh {text!r}: axis {name!r} given twice; want {form}")
        try:
            sizes[name] = int(value.strip())
        except ValueError:
            raise UserError(f"mesh {text!r}: size {value.strip()!r} of {name!r} is not an integer; want {form}") \
                from None
    cfg = MeshConfig(**{a: sizes.get(a, 1) for a in AXES})
    try:
        cfg.validate()
    except ValueError as e:
        raise UserError(f"mesh {text!r}: {e}") from None
    return cfg


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    if math.prod(shape) < len(devices):
        if jax.process_count() > 1:
            raise UserError(f"mesh {dict(zip(AXES, shape))} must span all {len(devices)} devices on multi-host")
        devices = devices[:math.prod(shape)]  # an explicit smaller mesh uses the first devices
    # Recent JAX defaults to Explicit axes; this code relies on the compiler propagating shardings (Auto).
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _mesh_axes(logical, dim: int, mesh) -> object:
    target = RULES.get(logical) if logical is not None else None
    if target is None:
        return None
    names = target if isinstance(target, tuple) else (target,)
    names = tuple(n for n in names if mesh.shape[n] > 1)
    size = math.prod(mesh.shape[n] for n in names)
    if not names or dim % size:
        return None  # replicate a dimension that does not split evenly
    return names if len(names) > 1 else names[0]


def logical_to_sharding(logical_spec, shape, mesh) -> NamedSharding:
    if logical_spec is None:
        return NamedSharding(mesh, P())
    spec = tuple(_mesh_axes(ax, d, mesh) for ax, d in zip(tuple(logical_spec), shape))
    return NamedSharding(mesh, P(*spec))


def param_shardings(model: nnx.Module, mesh) -> dict:
    """NamedShardings for the pure-dict parameter tree, from each Param's logical axis names."""
    state = nnx.state(model, nnx.Param)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    shapes = nnx.to_pure_dict(state)
    return jax.tree.map(lambda s, x: logical_to_sharding(s, x.shape, mesh), specs, shapes,
                        is_leaf=lambda s: s is None or isinstance(s, P))


def batch_sharding(mesh) -> NamedSharding:
    """Batch rows split over data x fsdp (the loop checks that the global batch divides evenly)."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def batch_shards(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def state_shardings(state, mesh):
    """NamedShardings for every leaf of `jax.tree.leaves(state)` of an `nnx.State` (parameters by their logical
    axes, any other variable replicated), in that order."""
    leaves = jax.tree.leaves(state)
    specs = jax.tree.leaves(nnx.get_partition_spec(state), is_leaf=lambda s: s is None or isinstance(s, P))
    if len(specs) != len(leaves):  # a variable without sharding metadata flattens to nothing: replicate all
        specs = [None] * len(leaves)
    return [logical_to_sharding(s, x.shape, mesh) for s, x in zip(specs, leaves)]


def cache_shardings(cache, mesh):
    """NamedShardings for a decoding cache (same tree): batch over data x fsdp, KV heads and Mamba channels over
    tensor (where they divide evenly; CACHE_AXES)."""
    def node(x):
        fields = CACHE_AXES.get(type(x).__name__)
        if fields is not None:
            return type(x)(*(logical_to_sharding(fields[f], getattr(x, f).shape, mesh) for f in x._fields))
        if x is None:
            return None
        return logical_to_sharding(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh) if x.ndim else \
            NamedSharding(mesh, P())

    return jax.tree.map(node, cache, is_leaf=lambda x: type(x).__name__ in CACHE_AXES)


def batch_rows_sharding(x, mesh) -> NamedSharding:
    """Rows of a [B, ...] array over data x fsdp when B divides evenly, else replicated."""
    return logical_to_sharding(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)
