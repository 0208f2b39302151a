"""Run guards: checks after each step that stop a run which trains on nothing or on garbage.

Design: each guard reads the step's metrics on the host, keeps at most a counter, and raises a
`ValueError` subclass with one line (main prints it, exit code 2) *before* the step's checkpoint
is written, so the last checkpoint is the last good state. A warning alone is not enough for
these failures: a run that silently scores 0 or skips every update still looks alive.

- `LogpGapGate` (rollout.max_logp_gap / logp_gap_action): the sampler and the trainer disagree on
  the log-probs of the same weights (a broken weight sync).
- `RunGuards`:
  - data.max_failed_reward_steps: a reward function gave nothing usable (every sample an error,
    timeout, None or NaN) for that many consecutive steps;
  - algo.max_skipped_steps: every update of that many consecutive steps was skipped (non-finite
    loss or gradient; a step that made no update, DAPO's filters leaving nothing, does not count);
  - algo.max_adapter_absmax: an adapter weight is non-finite or above the limit (a finite but
    catastrophic update, e.g. optim.lr far too high, which the non-finite skip cannot see).
  0 turns a guard off; a non-finite adapter always stops the run.
"""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp

from lorarl_jax.rl.rewards import failed_functions


class LogpGapError(ValueError):
    """The sampler's log-probs do not match the trainer's on the same weights (main: one line)."""


class RunStopped(ValueError):
    """A run guard stopped training (main: one line)."""


@jax.jit
def _absmax(tree) -> jax.Array:
    return jnp.max(
        jnp.stack([jnp.max(jnp.abs(x)).astype(jnp.float32) for x in jax.tree.leaves(tree)])
    )


def adapter_absmax(tree) -> float:
    """max |w| over every leaf (NaN if any is NaN)."""
    return float(_absmax(tree))


class LogpGapGate:
    """`rollout.max_logp_gap` / `rollout.logp_gap_action`: a loud check that rollouts sample the
    policy being trained. The most reported silent LoRA-RL failure is a weight sync that never
    reaches the sampler; the mean |log π_sampler − log π_trainer| over the sampled tokens (the
    same weights, computed by the sampler and by the training forward) shows it at once.
    `warn`: one line on stderr, repeated at most every `WARN_EVERY` steps; `error`: raise before
    the step's checkpoint is written, so the last checkpoint stays the last good state."""

    WARN_EVERY = 10

    def __init__(self, threshold: float, action: str):
        self.threshold, self.action, self.last_warned = threshold, action, None
        self.fired = 0

    def check(self, step: int, metrics: dict) -> None:
        gap = metrics.get("rollout/logp_gap_mean")
        if self.action == "off" or gap is None or gap <= self.threshold:
            return
        self.fired += 1
        msg = (
            f"step {step}: sampler-vs-trainer log-prob gap {gap:.4g} (max "
            f"{metrics.get('rollout/logp_gap_max', float('nan')):.3g}) > rollout.max_logp_gap="
            f"{self.threshold:g}: rollouts do not sample the trained policy (a stale or broken "
            "adapter sync, or low-precision merged kernels: try rollout.merge=never)"
        )
        if self.action == "error":
            raise LogpGapError(msg)
        if self.last_warned is None or step - self.last_warned >= self.WARN_EVERY:
            print(f"WARNING: {msg}", file=sys.stderr, flush=True)
            self.last_warned = step


class RunGuards:
    """Consecutive-failure counters of one run (module docstring); `check` after every step."""

    def __init__(
        self, max_failed_reward_steps: int, max_skipped_steps: int, max_absmax: float, updates: int
    ):
        self.max_failed, self.max_skipped, self.max_absmax = (
            max_failed_reward_steps,
            max_skipped_steps,
            max_absmax,
        )
        self.updates = updates  # updates per step: all skipped means the step learned nothing
        self.failed: dict[str, int] = {}
        self.skipped = 0

    @classmethod
    def from_config(cls, cfg, updates_per_step: int) -> RunGuards:
        a = cfg.algo
        return cls(
            cfg.data.max_failed_reward_steps,
            a.max_skipped_steps,
            a.max_adapter_absmax,
            updates_per_step,
        )

    def check(self, step: int, metrics: dict, samples: int) -> None:
        bad = set(failed_functions(metrics, samples))
        self.failed = {name: self.failed.get(name, 0) + 1 for name in bad}
        for name, count in self.failed.items():
            if self.max_failed and count >= self.max_failed:
                raise RunStopped(
                    f"step {step}: reward {name!r} scored none of the {samples} samples "
                    f"(errors, timeouts, None or NaN: reward/* in metrics.jsonl) for {count} "
                    f"consecutive steps (data.max_failed_reward_steps={self.max_failed}); "
                    "fix the reward function"
                )
        updates = metrics.get("actor/updates", self.updates)  # DAPO's filters may leave none
        if updates:
            all_skipped = metrics.get("actor/skipped", 0.0) >= updates
            self.skipped = self.skipped + 1 if all_skipped else 0
        if self.max_skipped and self.skipped >= self.max_skipped:
            raise RunStopped(
                f"step {step}: every update of the last {self.skipped} steps was skipped for a "
                f"non-finite loss or gradient (algo.max_skipped_steps={self.max_skipped}); "
                "lower optim.lr or check the rewards"
            )
        absmax = metrics.get("actor/adapter_absmax", 0.0)
        if not math.isfinite(absmax) or (self.max_absmax and absmax > self.max_absmax):
            raise RunStopped(
                f"step {step}: adapter weights reached |w| = {absmax:.3g} > "
                f"algo.max_adapter_absmax={self.max_absmax:g}: a catastrophic update (is optim.lr "
                "too high?); stopped before checkpointing it"
            )
