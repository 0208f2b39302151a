"""What a run trains: a LoRA adapter on the frozen base, or the base itself (`lora.r=0`).

Both modes hand the jitted programs the same two trees, so the loop, the checkpoints and the
shardings do not branch:

  mode     `trainable` (TrainState.lora)     `base` (Run.base)            policy forward
  LoRA     the adapter {…, lora_a, lora_b}   the frozen pretrained base    base + adapter
  full     every base parameter (a copy)     the initial weights, frozen   the trainable tree

The reference policy is always "the base applied without an adapter": in LoRA mode that is the
pretrained model at no memory cost; in full mode it is the frozen copy of the initial weights,
the second model in memory that LoRA avoids (verl / TRL keep a reference model for full RL too).
Rollouts decode the merged adapter (LoRA) or the current trainable weights as they are (full).

Full mode trains the parameters selected by `full.trainable` / `full.frozen` (config.FullCfg);
frozen ones get `stop_gradient` in the loss (no gradient is computed for them) and
`optax.set_to_zero` in the optimizer (no state, never updated).
"""

from __future__ import annotations

import re

import jax
import optax
from flax import traverse_util

from lorarl_jax.config import FullCfg, LoraConfig

TRAIN, FREEZE = "train", "freeze"


def is_full(lcfg: LoraConfig | None) -> bool:
    """Full-parameter mode; the programs get `lcfg=None` there (no adapter to apply)."""
    return lcfg is None or lcfg.full


def forward_variables(lcfg: LoraConfig | None, base, trainable):
    """(params, lora) the model is applied with for the current policy: (base, adapter) in LoRA
    mode, (trainable, None) in full mode."""
    return (trainable, None) if is_full(lcfg) else (base, trainable)


def param_labels(params, full: FullCfg):
    """TRAIN / FREEZE per leaf of a base tree: trained when its "/"-joined path matches
    `full.trainable` ("" matches all) and not `full.frozen` ("" matches none)."""
    train = re.compile(full.trainable) if full.trainable else None
    frozen = re.compile(full.frozen) if full.frozen else None

    def label(path):
        name = "/".join(path)
        ok = (train is None or train.search(name)) and not (frozen and frozen.search(name))
        return TRAIN if ok else FREEZE

    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: label(p) for p in flat})


def check_labels(labels, full: FullCfg) -> None:
    """A one-line error when `full.trainable` / `full.frozen` leave nothing to train."""
    if TRAIN not in jax.tree.leaves(labels):
        raise ValueError(
            f"full.trainable={full.trainable!r} / full.frozen={full.frozen!r} leave no "
            "parameter to train (patterns are searched in paths like layers_0/mlp/up_proj/kernel)"
        )


def stop_frozen(trainable, labels):
    """The trainable tree with `stop_gradient` on its FREEZE leaves (labels None: all trained)."""
    if labels is None:
        return trainable
    return jax.tree.map(
        lambda lab, x: jax.lax.stop_gradient(x) if lab == FREEZE else x, labels, trainable
    )


def masked_optimizer(tx: optax.GradientTransformation, labels) -> optax.GradientTransformation:
    """`tx` on the TRAIN leaves, zero updates (and no state) on the FREEZE leaves."""
    if labels is None or FREEZE not in jax.tree.leaves(labels):
        return tx
    return optax.multi_transform({TRAIN: tx, FREEZE: optax.set_to_zero()}, labels)
