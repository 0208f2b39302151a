"""What a run is made of: immutable facts (`Static`) and the trainable state (`TrainState`).

Design (nanodo's split):
- `Static` holds what never changes during a run: the validated config (whose `lora` is the
  adapter's own, also when a PEFT adapter was loaded: one source for rank and scale), the model
  config, the tokenizer, the batch sizes (`config_batches.batch_sizes`) and the two generation specs
  (rollout and greedy evaluation; `rollout.sampling.temperature` is the τ of every log-prob).
- `TrainState` is a pytree of everything the run updates and a checkpoint saves: the adapter
  (with `lora.r=0` the policy's parameters, saved as the `params` item: `rl/policy.py`), its
  optimizer state, the root PRNG key, the step, the KL-in-reward coefficient and the critic
  (PPO). `checkpoint_items` / `from_checkpoint_items` map it to the items of `checkpoint.py`
  (plus the data iterator's position, which the iterator owns); nothing else is saved, and the
  frozen base never is.
- Keys: the root key is split once into (adapter init, rollout, update) keys; rollouts fold in
  the step, updates the step and the mini-batch, so a resumed run repeats exactly what an
  uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax

from lorarl_jax.config import RunConfig
from lorarl_jax.config_batches import BatchSizes
from lorarl_jax.model.config import ModelConfig
from lorarl_jax.model.lora import LoraConfig
from lorarl_jax.sampling.sampler import GenerateSpec

REWARD_COLUMNS = ("ground_truth", "data_source", "extra_info")  # dataset columns rewards read


@dataclasses.dataclass(frozen=True)
class Static:
    cfg: RunConfig
    model_cfg: ModelConfig
    model_dir: str  # resolved model path (what run_config.json records)
    tokenizer: Any
    sizes: BatchSizes
    rollout: GenerateSpec  # n samples per prompt, rollout.temperature / top-k / top-p
    evaluation: GenerateSpec  # greedy, one sample per prompt

    @property
    def lcfg(self) -> LoraConfig | None:
        """The adapter's config; None in full-parameter mode (`lora.r=0`: nothing to apply)."""
        return None if self.cfg.lora.full else self.cfg.lora

    @property
    def full(self) -> bool:
        return self.cfg.lora.full

    @property
    def temperature(self) -> float:
        return self.rollout.sampling.temperature


def split_root(rng) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(adapter init, rollout, update) keys of the run's root key."""
    k_lora, k_rollout, k_update = jax.random.split(rng, 3)
    return k_lora, k_rollout, k_update


@flax.struct.dataclass
class TrainState:
    lora: Any  # the trainable tree on the mesh: the adapter, or (full mode) the policy's params
    opt_state: Any  # AdamW state, masked to the trainable leaves
    rng: jax.Array  # the root key (typed); see split_root
    step: int = flax.struct.field(pytree_node=False, default=0)  # RL steps done
    kl_coef: float = flax.struct.field(pytree_node=False, default=0.0)  # KL-in-reward β
    critic_params: Any = None  # PPO: {'backbone', 'value_head'}
    critic_opt_state: Any = None
    full: bool = flax.struct.field(pytree_node=False, default=False)  # lora.r=0

    @property
    def trainable_item(self) -> str:
        """The checkpoint item holding `lora`: "lora" (an adapter) or "params" (full mode)."""
        return "params" if self.full else "lora"

    def rollout_key(self, step: int) -> jax.Array:
        return jax.random.fold_in(split_root(self.rng)[1], step)

    def update_key(self, step: int, epoch: int, minibatch: int) -> jax.Array:
        key = jax.random.fold_in(split_root(self.rng)[2], step)
        return jax.random.fold_in(key, epoch * 997 + minibatch)

    def checkpoint_items(self, data_state: dict) -> dict:
        """The state dict `checkpoint.Checkpointer.save` writes."""
        items = {
            self.trainable_item: self.lora,
            "opt_state": self.opt_state,
            "step": self.step,
            "rng": self.rng,
            "data_state": data_state,
            "kl_ctl": {"value": float(self.kl_coef)},
        }
        if self.critic_params is not None:
            items["critic"], items["critic_opt_state"] = self.critic_params, self.critic_opt_state
        return items

    def from_checkpoint_items(self, items: dict) -> TrainState:
        """This state with every field restored from `Checkpointer.restore`'s dict."""
        return self.replace(
            lora=items[self.trainable_item],
            opt_state=items["opt_state"],
            rng=items["rng"],
            step=int(items["step"]),
            kl_coef=float(items["kl_ctl"]["value"]),
            critic_params=items.get("critic", self.critic_params),
            critic_opt_state=items.get("critic_opt_state", self.critic_opt_state),
        )
