"""The batch arithmetic of one RL step: prompts → mini-batches → micro-batches (`batch_sizes`).

`config.from_config_dict` calls `batch_sizes` once, so a config whose sizes do not divide fails
when it is read, with a one-line error naming the key.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorarl_jax.config import RunConfig


@dataclasses.dataclass(frozen=True)
class BatchSizes:
    """What one RL step's batch splits into (prompts carry `num_generations` rows each)."""

    prompts: int  # data.batch_size
    prompts_per_update: int  # algo.ppo_mini_batch_size, or the whole batch
    updates_per_step: int  # ppo_epochs × mini-batches
    rows_per_micro: int  # algo.micro_batch_size sequences, or the whole mini-batch
    n_micro: int  # micro-batches per update
    total_updates: int  # trainer.steps × updates_per_step: the schedules' length
    # > 1 when a micro-batch holds part of one group (micro_batch_size divides
    # num_generations): each group runs as `group_split` sub-groups, each with its prompt
    group_split: int = 1

    @property
    def off_policy(self) -> bool:
        """More than one update per rollout: π_old must be computed before the first update."""
        return self.updates_per_step > 1


def batch_sizes(cfg: RunConfig) -> BatchSizes:
    """The derived batch sizes, or a one-line ValueError naming the key that does not divide."""
    a, n, prompts = cfg.algo, cfg.rollout.num_generations, cfg.data.batch_size
    per_mb = a.ppo_mini_batch_size or prompts
    if prompts % per_mb:
        raise ValueError(f"algo.ppo_mini_batch_size={per_mb} must divide data.batch_size={prompts}")
    micro = a.micro_batch_size or per_mb * n
    if (micro % n and n % micro) or (per_mb * n) % micro:
        raise ValueError(
            f"algo.micro_batch_size={micro} must divide or be a multiple of "
            f"rollout.num_generations={n}, and divide the mini-batch ({per_mb * n} sequences)"
        )
    updates = a.ppo_epochs * (prompts // per_mb)
    return BatchSizes(
        prompts,
        per_mb,
        updates,
        micro,
        per_mb * n // micro,
        cfg.trainer.steps * updates,
        group_split=max(1, n // micro),
    )
