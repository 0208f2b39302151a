"""Explicit shardings for the jitted functions of a run, and batches on and off the mesh.

Design
- A `Placement` holds the mesh and one `NamedSharding` tree per state: the frozen base as loaded
  (`mesh.LOGICAL_RULES`), the adapter (each A / B takes its kernel's in / out axis, the rank is
  replicated), the optimizer state (adapter-shaped moments sharded as the adapter, step counters
  replicated) and the merged weights that the sampler reads (`mesh.DECODE_RULES`). Full-parameter
  RL: the trainable parameters, their moments and the decoded weights are sharded as the base.
- Every batch array is split over ('data', 'fsdp') along its first dimension, so prompts, rows,
  mini-batches and micro-batches must divide by data × fsdp: `check_batch_sizes` says which config
  key does not, once at start-up.
- Every process holds the same global host batch (prompt ids are small and the pipeline is
  deterministic). `Placement.put` builds each global array with `jax.make_array_from_callback`, so
  each process transfers only the rows its own devices hold and the array is the single-process
  one, whatever the mesh or the number of processes.
- What the host reads back (rollout tokens, log-probs, metrics) leaves the jitted functions fully
  replicated, so every process reads the whole result locally and computes the same rewards and
  advantages. The programs themselves are built in `rl/programs.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lorarl_jax import mesh as mesh_lib
from lorarl_jax.model.lora import merge
from lorarl_jax.model.transformer import abstract_params


def data_parallel(mesh: Mesh) -> int:
    """How many ways a batch is split: data × fsdp."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_sizes(mesh: Mesh, prompts: dict[str, int]) -> None:
    """`prompts`: config key (as the user should read it) → prompts per batch. Each must divide
    by data × fsdp; raises a one-line ValueError naming the first one that does not."""
    dp = data_parallel(mesh)
    for key, count in prompts.items():
        if count % dp:
            raise ValueError(
                f"{key}: {count} prompts per batch do not split over data×fsdp={dp} devices of "
                f"trainer.mesh={tuple(mesh.devices.shape)}; use a multiple of {dp} or change "
                "trainer.mesh"
            )


@dataclasses.dataclass(frozen=True)
class Placement:
    mesh: Mesh
    base: Any  # NamedSharding trees shaped like each state
    lora: Any
    opt_state: Any
    decode: Any  # the merged weights of the sampler

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch(self) -> NamedSharding:
        """First dimension over ('data', 'fsdp'), the rest replicated: fits arrays of any rank."""
        return mesh_lib.batch_sharding(self.mesh, 1)

    def put(self, tree):
        """Host arrays (the same global batch on every process) → global arrays on the mesh."""
        dp = data_parallel(self.mesh)

        def one(x):
            x = np.asarray(x)
            if x.shape[0] % dp:
                raise ValueError(
                    f"a batch of {x.shape[0]} rows does not split over data×fsdp={dp} devices "
                    f"(trainer.mesh={tuple(self.mesh.devices.shape)})"
                )
            return jax.make_array_from_callback(x.shape, self.batch, lambda idx: x[idx])

        return jax.tree.map(one, tree)

    def step_shardings(self) -> tuple:
        """(lora, opt_state, base, batch): what `step.make_policy_step` jits with."""
        return self.lora, self.opt_state, self.base, self.batch


def _decode_shardings(model_cfg, merged_abstract, mesh: Mesh):
    """DECODE_RULES shardings of the merged tree; a leaf the model does not name is replicated."""
    axes = traverse_util.flatten_dict(mesh_lib.logical_axes(abstract_params(model_cfg)))
    out = {}
    for path, leaf in traverse_util.flatten_dict(merged_abstract).items():
        names = axes.get(path, ())
        names = names if len(names) == leaf.ndim else ()
        out[path] = mesh_lib.logical_to_sharding(names, mesh, mesh_lib.DECODE_RULES)
    return traverse_util.unflatten_dict(out)


def opt_state_shardings(tx, params, params_sh, mesh: Mesh):
    """Optimizer-state shardings: moments as their parameters (`params_sh`), counters replicated."""
    repl = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        tx,
        lambda _, sh: sh,
        jax.eval_shape(tx.init, params),
        params_sh,
        transform_non_params=lambda _: repl,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )


def make_placement(
    mesh: Mesh, model_cfg, base, lora, tx, scale: float, full: bool = False
) -> Placement:
    """Shardings of a run whose base and adapter are already on `mesh` (see rl/setup.py). In
    full-parameter mode (`full`: `lora` is the policy's parameters, sharded as the base) the
    sampler decodes them as they are trained (no merge, no second layout)."""
    base_sh = jax.tree.map(lambda x: x.sharding, base)
    lora_sh = jax.tree.map(lambda x: x.sharding, lora)
    opt_sh = opt_state_shardings(tx, lora, lora_sh, mesh)
    if full:
        return Placement(mesh, base_sh, lora_sh, opt_sh, lora_sh)
    dtype = model_cfg.compute_dtype  # of the dequantized layers of an NF4 base
    merged = jax.eval_shape(lambda b, lo: merge(b, lo, scale, dtype), base, lora)
    decode = _decode_shardings(model_cfg.dense, merged, mesh)
    return Placement(mesh, base_sh, lora_sh, opt_sh, decode)
