"""Checkpoint → PEFT adapter / merged HF model, using the run's recorded configuration.

A run writes `run_config.json` (the validated RunConfig) once its checks pass (`run_dir.py`);
export rebuilds the adapter's abstract tree from it and the base model's shapes, restores only
the `lora` item of the orbax checkpoint, and writes it through the same HF name table as the
trainer's final export. A full-parameter run (`lora.r=0`) restores its `params` item instead
and exports it as a HF model (`--merged`).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from lorarl_jax.checkpoint import Checkpointer
from lorarl_jax.model import hf
from lorarl_jax.model.lora import LoraConfig, init_lora, merge
from lorarl_jax.run_dir import RUN_CONFIG


def read_run_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, RUN_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training output_dir?")
    with open(path) as f:
        return json.load(f)


def base_quantization(rc: dict) -> dict:
    """The run's base-loading options: an NF4 run's policy is its adapter on the NF4 base."""
    m = rc.get("model", {})
    return dict(
        quantization=m.get("quantization", "none"), double_quant=m.get("double_quant", False)
    )


def restore_adapter(run_dir: str, step: int | None, base, rc: dict | None = None):
    """The `lora` item of a run's orbax checkpoint (latest if `step` is None) on a loaded base
    → (lora, LoraConfig, step)."""
    rc = rc or read_run_config(run_dir)
    lcfg = LoraConfig(
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in rc["lora"].items()}
    )
    abstract = jax.eval_shape(lambda: init_lora(base, lcfg, jax.random.key(0)))
    ckpt = Checkpointer(os.path.join(run_dir, "ckpt"), save_interval_steps=1, max_to_keep=None)
    try:
        restored = ckpt.restore(step, abstract_state={"lora": abstract, "rng": jax.random.key(0)})
    finally:
        ckpt.close()
    return jax.tree.map(jnp.asarray, restored["lora"]), lcfg, restored["step"]


def restore_params(run_dir: str, step: int | None, base):
    """The `params` item of a full-parameter run's checkpoint (`lora.r=0`), shaped as the base
    → (params, step)."""
    abstract = jax.eval_shape(lambda: base)
    ckpt = Checkpointer(os.path.join(run_dir, "ckpt"), save_interval_steps=1, max_to_keep=None)
    try:
        restored = ckpt.restore(step, abstract_state={"params": abstract, "rng": jax.random.key(0)})
    finally:
        ckpt.close()
    return restored["params"], restored["step"]


def export_checkpoint(run_dir: str, step: int | None, peft_dir: str | None, merged_dir: str | None):
    rc = read_run_config(run_dir)
    model_dir = rc["resolved_model_path"]
    cfg, base = hf.load_hf_model(model_dir, **base_quantization(rc))
    if rc["lora"]["r"] == 0:  # full-parameter RL: the trained model itself, no adapter
        if peft_dir:
            raise ValueError(
                f"{run_dir} is a full-parameter run (lora.r=0): no adapter to "
                "export; use --merged for the trained HF model"
            )
        params, at = restore_params(run_dir, step, base)
        hf.save_hf_model(params, merged_dir, src_dir=model_dir)
        return at
    lora, lcfg, at = restore_adapter(run_dir, step, base, rc)
    if peft_dir:
        hf.save_peft_adapter(jax.device_get(lora), lcfg, peft_dir, base_model=model_dir)
    if merged_dir:
        hf.save_hf_model(merge(base, lora, lcfg.scale), merged_dir, src_dir=model_dir)
    return at
