"""Multi-process runs: `jax.distributed` start-up, host copies of global arrays, who writes files.

One Python process per host (a TPU pod worker, a GPU node) drives that host's devices; together
they form one global mesh. `initialize(trainer_cfg)` starts `jax.distributed` before the first JAX
computation when asked to:
- `trainer.distributed=True`: `jax.distributed.initialize()` with cluster auto-detection (Cloud
  TPU pods, SLURM, Open MPI, Kubernetes): what `scripts/launch_tpu_pod.sh` relies on;
- `trainer.coordinator_address="host:port"` (or `JAX_COORDINATOR_ADDRESS`) with
  `trainer.num_processes` and `trainer.process_id`: explicit, e.g. two processes on 127.0.0.1.
On CPU the processes exchange data through gloo, JAX's default CPU collectives.

Every process runs the same program on the same global batch (the data pipeline is deterministic),
so host-side work (rewards, advantages) gives the same result everywhere; `same_on_all_processes`
makes sure of it where a host could disagree (a reward function that times out on one host only).
Only process 0 writes metrics, exports and summaries; orbax coordinates checkpoint writes itself.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec


def initialize(tc) -> bool:
    """Starts jax.distributed if `tc` (a TrainerCfg) or the environment asks for it; idempotent."""
    address = tc.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not (tc.distributed or address):
        return False
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(
            coordinator_address=address or None,
            num_processes=tc.num_processes or None,
            process_id=tc.process_id if tc.process_id >= 0 else None,
        )
    return True


def is_primary() -> bool:
    """The process that writes files (metrics, exports, summaries)."""
    return jax.process_index() == 0


def to_host(tree):
    """Device arrays → numpy on every process. Arrays split across processes are all-gathered:
    a collective, so every process must call this in the same order."""

    def one(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def replicated_key(key, mesh):
    """`key` as a replicated global array: orbax saves only global arrays in multi-process runs,
    and jitted functions take it as is."""
    data = np.asarray(jax.random.key_data(key))
    data = jax.device_put(data, NamedSharding(mesh, PartitionSpec()))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


def same_on_all_processes(x_host):
    """Process 0's copy of a host array, on every process (a no-op with one process)."""
    if jax.process_count() == 1:
        return x_host
    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(x_host)))


class NullLogger:
    """The metrics logger of processes other than 0: logs nothing, writes no file."""

    def log(self, step, metrics) -> None:
        del step, metrics

    def close(self) -> None:
        pass
