"""Device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel that also shards parameters),
`tensor` (model parallel inside matmuls). Parameters are annotated with logical names in the model
(`embed`, `mlp`, `q_heads`, …); `LOGICAL_RULES` decides where each goes. Changing a parallelism
strategy means editing this table, nothing else.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("norm", None),
    ("lora_rank", None),
    ("length", None),
)

# The sampler's merged weights: decode reads every weight once per generated token, so weights
# split over fsdp would be all-gathered at every step; replicated over data and fsdp and split
# over tensor (heads, mlp, vocab) instead, at the cost of one weights/tensor copy per device.
DECODE_RULES = tuple((name, None if name == "embed" else axes) for name, axes in LOGICAL_RULES)


def make_mesh(shape: tuple[int, int, int] = (-1, 1, 1), devices=None) -> Mesh:
    """Mesh of (data, fsdp, tensor); one -1 entry takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} does not use the {len(devices)} devices")
    arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_sharding(logical_specs, mesh: Mesh, rules=LOGICAL_RULES):
    """Tree of logical PartitionSpecs/tuples → tree of NamedShardings on `mesh`."""

    def one(spec):
        spec = PartitionSpec(*spec) if isinstance(spec, tuple) else spec
        return NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules))

    return jax.tree.map(one, logical_specs, is_leaf=lambda x: isinstance(x, (PartitionSpec, tuple)))


def param_shardings(boxed_abstract, mesh: Mesh, rules=LOGICAL_RULES):
    """Shardings for a boxed (logically partitioned) abstract param tree."""
    return logical_to_sharding(nn.get_partition_spec(boxed_abstract), mesh, rules)


def logical_axes(boxed_abstract):
    """Tree of logical-name tuples, one per parameter."""
    specs = nn.get_partition_spec(boxed_abstract)
    return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))
