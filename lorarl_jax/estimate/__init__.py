"""Memory estimator: bytes per device of one RL step, full fine-tuning vs LoRA vs QLoRA.

For a model (a HF config or a preset), a LoRA config, a workload (prompts, generations, lengths,
micro-batch, remat, scan_layers), precisions and a data × fsdp × tensor mesh, `estimate()`
returns a `Breakdown` per mode: resident memory (weights, adapter, AdamW state, reference,
critic), each phase of the step (rollout: merged copy, merge products, KV cache; log-prob pass;
train: activations, gradients, update workspace) and the peak. Parameter counts are exact
(eval_shape of the decoder and of `init_lora`); activations follow XLA's buffer assignment of
the compiled step. Validated against XLA's memory analysis and peak RSS by
`scripts/bench_memory.py`.

- `model.py`: the workload/precision/options inputs, `Breakdown`, activations and `estimate()`
  (its docstring is the design note).
- `params.py`: parameter and adapter leaves and their per-device bytes under the mesh rules.
- `cli.py`: model presets, `model_config()` and the table printed by
  `python -m lorarl_jax.estimate --model qwen2.5-7b --lora.r 16 [--mesh 1,8,1] ...`.
"""

from lorarl_jax.estimate.cli import PRESETS, format_table, from_args, main, model_config
from lorarl_jax.estimate.model import (
    ATTN_COPIES,
    LOGIT_COPIES,
    MODES,
    Breakdown,
    Options,
    Precision,
    Workload,
    activation_bytes,
    estimate,
    kv_cache_bytes,
    layer_elems,
    logprob_work_bytes,
    merge_work_bytes,
    rollout_work_bytes,
)
from lorarl_jax.estimate.params import (
    Leaf,
    is_linear,
    leaf_bytes,
    lora_leaves,
    mesh_sizes,
    nf4_bytes,
    param_leaves,
    shard_elems,
)

__all__ = [
    "ATTN_COPIES",
    "LOGIT_COPIES",
    "MODES",
    "PRESETS",
    "Breakdown",
    "Leaf",
    "Options",
    "Precision",
    "Workload",
    "activation_bytes",
    "estimate",
    "format_table",
    "from_args",
    "is_linear",
    "kv_cache_bytes",
    "layer_elems",
    "leaf_bytes",
    "logprob_work_bytes",
    "lora_leaves",
    "main",
    "merge_work_bytes",
    "mesh_sizes",
    "model_config",
    "nf4_bytes",
    "param_leaves",
    "rollout_work_bytes",
    "shard_elems",
]
