"""Parameter leaves of the decoder and its LoRA adapter, and their bytes per device on a mesh.

Shapes are exact: they come from `abstract_params` (jax.eval_shape of the decoder itself, NF4
leaves included for QLoRA) and from `init_lora` under eval_shape. Each leaf is split over the
mesh axes its logical names map to (`mesh.LOGICAL_RULES`, or `DECODE_RULES` for the rollout's
merged copy); uneven splits round up.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from lorarl_jax import mesh as mesh_lib
from lorarl_jax.model.config import ModelConfig
from lorarl_jax.model.lora import LINEAR_NAMES, LoraConfig, init_lora, lora_logical_axes
from lorarl_jax.model.transformer import abstract_params


@dataclasses.dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]
    shape: tuple[int, ...]
    itemsize: int
    axes: tuple  # logical axis names, one per dim

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def in_layers(self) -> bool:
        return self.path[0].startswith("layers_")


def param_leaves(cfg: ModelConfig) -> list[Leaf]:
    """Every base parameter (NF4 leaves when `cfg.quantization == 'nf4'`)."""
    boxed = abstract_params(cfg)
    axes = traverse_util.flatten_dict(mesh_lib.logical_axes(boxed))
    flat = traverse_util.flatten_dict(nn.unbox(boxed)).items()
    return [Leaf(p, tuple(v.shape), _itemsize(v.dtype), tuple(axes[p])) for p, v in flat]


def lora_leaves(cfg: ModelConfig, lcfg: LoraConfig, dtype=jnp.float32) -> list[Leaf]:
    """The adapter `init_lora` would create, with the logical axes the trainer shards it by."""
    boxed = abstract_params(cfg)
    lora = jax.eval_shape(lambda: init_lora(nn.unbox(boxed), lcfg, jax.random.key(0), dtype))
    axes = traverse_util.flatten_dict(lora_logical_axes(mesh_lib.logical_axes(boxed), lora))
    flat = traverse_util.flatten_dict(lora)
    return [Leaf(p, tuple(v.shape), jnp.dtype(dtype).itemsize, axes[p]) for p, v in flat.items()]


def mesh_sizes(mesh: tuple[int, int, int]) -> dict[str, int]:
    return dict(zip(mesh_lib.MESH_AXES, mesh, strict=True))


def shard_elems(leaf: Leaf, mesh: tuple[int, int, int], rules=mesh_lib.LOGICAL_RULES) -> int:
    """Elements of `leaf` held by one device under `rules` (`DECODE_RULES`: merged weights)."""
    sizes = mesh_sizes(mesh)
    spec = nn.logical_to_mesh_axes(leaf.axes, rules)
    n = 1
    for dim, ax in zip(leaf.shape, tuple(spec) + (None,) * len(leaf.shape), strict=False):
        names = ax if isinstance(ax, tuple) else (ax,)
        n *= -(-dim // math.prod(sizes[a] for a in names if a))
    return n


def leaf_bytes(leaves, mesh, itemsize: int | None = None, rules=mesh_lib.LOGICAL_RULES) -> int:
    """Per-device bytes of `leaves`, in their own dtype or `itemsize` bytes per element."""
    return sum(shard_elems(x, mesh, rules) * (itemsize or x.itemsize) for x in leaves)


def is_linear(leaf: Leaf) -> bool:
    """A decoder linear kernel (what QLoRA quantizes), dense or as its NF4 codes."""
    return len(leaf.path) >= 2 and leaf.path[-2] in LINEAR_NAMES and leaf.path[-1] == "kernel"


def nf4_bytes(n: int, double_quant: bool = False) -> int:
    """NF4 bytes of n weights: 4 bits each + an fp32 absmax per 64 (double quantization: an 8-bit
    absmax per 64 + an fp32 scale per 256 absmax values)."""
    blocks = -(-n // 64)
    if double_quant:
        return -(-n // 2) + blocks + 4 * -(-blocks // 256)
    return -(-n // 2) + 4 * blocks


def _itemsize(dtype) -> int:
    return jnp.dtype(dtype).itemsize
