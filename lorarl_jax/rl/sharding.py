"""Explicit shardings for the jitted functions of a run, and batches on and off the mesh.

Design
- A `Placement` holds the mesh and one `NamedSharding` tree per state: the frozen base as loaded
  (`mesh.LOGICAL_RULES`), the adapter (each A / B takes its kernel's in / out axis, the rank is
  replicated), the optimizer state (adapter-shaped moments sharded as the adapter, step counters
  replicated) and the merged weights that the sampler reads (`mesh.DECODE_RULES`).
- Every batch array is split over ('data', 'fsdp') along its first dimension, so prompts, rows,
  mini-batches and micro-batches must divide by data × fsdp: `check_batch_sizes` says which config
  key does not, once at start-up.
- Every process holds the same global host batch (prompt ids are small and the pipeline is
  deterministic). `Placement.put` builds each global array with `jax.make_array_from_callback`, so
  each process transfers only the rows its own devices hold and the array is the single-process
  one, whatever the mesh or the number of processes.
- What the host reads back (rollout tokens, log-probs, metrics) leaves the jitted functions fully
  replicated, so every process reads the whole result locally and computes the same rewards and
  advantages.
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
from lorarl_jax.distributed import to_host
from lorarl_jax.model.lora import merge
from lorarl_jax.model.transformer import abstract_params
from lorarl_jax.rl.step import compute_logprobs
from lorarl_jax.sampling.sampler import generate


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


def make_placement(mesh: Mesh, model_cfg, base, lora, tx, scale: float) -> Placement:
    """Shardings of a run whose base and adapter are already on `mesh` (see rl/setup.py)."""
    base_sh = jax.tree.map(lambda x: x.sharding, base)
    lora_sh = jax.tree.map(lambda x: x.sharding, lora)
    opt_sh = opt_state_shardings(tx, lora, lora_sh, mesh)
    dtype = model_cfg.compute_dtype  # of the dequantized layers of an NF4 base
    merged = jax.eval_shape(lambda b, lo: merge(b, lo, scale, dtype), base, lora)
    decode = _decode_shardings(model_cfg.dense, merged, mesh)
    return Placement(mesh, base_sh, lora_sh, opt_sh, decode)


def init_opt_state(pl: Placement, tx, lora):
    return jax.jit(tx.init, in_shardings=(pl.lora,), out_shardings=pl.opt_state)(lora)


def jit_merge(pl: Placement, scale: float, dtype=np.float32):
    """(base, lora) → merged weights, laid out for decode (NF4 layers dequantized to `dtype`)."""
    return jax.jit(
        lambda b, lo: merge(b, lo, scale, dtype),
        in_shardings=(pl.base, pl.lora),
        out_shardings=pl.decode,
    )


def _generate(
    params, tokens, mask, key, cfg, n, max_new_tokens, stop_ids, pad_id, sp, lcfg=None, lora=None
):
    return generate(
        cfg,
        params,
        tokens,
        mask,
        key,
        n=n,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        pad_id=pad_id,
        sp=sp,
        lora=lora,
        lcfg=lcfg,
    )


def make_generate(pl: Placement):
    """`sampler.generate` with host prompts in and a host `Rollout` out (same signature). The
    params are the merged weights (`pl.decode`), or with `lora` the base as stored (`pl.base`)
    and the unmerged adapter (rollout.merge=never, `sampling/rollout_weights.py`)."""
    batch, repl = pl.batch, pl.replicated
    static = dict(static_argnums=tuple(range(4, 11)), out_shardings=repl)
    merged = jax.jit(_generate, in_shardings=(pl.decode, batch, batch, repl), **static)
    unmerged = jax.jit(_generate, in_shardings=(pl.base, batch, batch, repl, pl.lora), **static)

    def sharded_generate(
        cfg, params, tokens_BxP, mask_BxP, key, *, n, max_new_tokens, lora=None, lcfg=None, **kw
    ):
        tokens, mask = pl.put((tokens_BxP, mask_BxP))
        st = (cfg, n, max_new_tokens, kw["stop_ids"], kw["pad_id"], kw["sp"], lcfg)
        if lora is None:
            return to_host(merged(params, tokens, mask, key, *st))
        return to_host(unmerged(params, tokens, mask, key, *st, lora))

    return sharded_generate


def make_logprobs(pl: Placement, model_cfg, lcfg, *, n: int, temperature: float, chunk: int):
    """`logprobs(base, lora, host_batch) → host (logp_RxN, entropy_RxN)`; `lora=None`: π_ref."""

    def run(base, lora, batch):
        lc = None if lora is None else lcfg
        kw = dict(n=n, temperature=temperature, chunk=chunk)
        return compute_logprobs(model_cfg, lc, base, lora, batch, **kw)

    out = pl.replicated
    policy = jax.jit(run, in_shardings=(pl.base, pl.lora, pl.batch), out_shardings=out)
    ref = jax.jit(
        lambda base, batch: run(base, None, batch),
        in_shardings=(pl.base, pl.batch),
        out_shardings=out,
    )

    def logprobs(base, lora, batch_host):
        batch = pl.put(batch_host)
        return to_host(ref(base, batch) if lora is None else policy(base, lora, batch))

    return logprobs
