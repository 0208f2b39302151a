"""Which weights rollouts decode on: `rollout.merge = auto | always | never`.

- `always`: once per RL step, W' = dequant(W) + s·A·B (fp32 math, stored in the compute dtype) for
  every adapted layer, and NF4 layers dequantized; decode runs on these plain dense params. The
  fastest decode (one matmul per layer, no adapter or dequantization work per token), for the
  memory of a dense copy of the weights while the rollout runs: for an NF4 base that is ~3.6×
  (bf16) to ~7× (fp32) the packed linear weights, i.e. the saving QLoRA made.
- `never`: decode on the base as stored + the adapter unmerged (`Transformer(cfg, lcfg)` on
  {params, lora}). No extra weight memory; every decode step pays the dequantization of every
  NF4 layer and the two thin adapter matmuls of every adapted layer.
- `auto`: weights are merged only where the merged kernel can hold the adapter's update: the
  compute dtype and the kernels' dtype must be float32. In bfloat16 (8 mantissa bits) W + s·A·B
  rounds back to W for every entry whose update is below half a bf16 step of W: on SmolLM2-135M
  after one Adam step at lr 1e-4, 97.6 % of the adapted kernel entries do not change
  (scripts/bench_bf16_rollout.py), so the sampler would draw from another policy than the
  trained one. A low-precision base is therefore decoded
  unmerged (as vLLM's native LoRA does): the adapter's contribution x·A·B·s is added to the
  layer's output, where it is rounded relative to the output, not to W; the sampler then runs the
  trainer's own arithmetic. A float32 base is merged; an NF4 base with a float32 compute dtype is
  merged when the dense linear weights fit in half of the free device memory (the rest is left
  for the KV cache and activations), decoded unmerged otherwise. Measurements: README.
- `rollout.weight_dtype=bfloat16` (float32 model, merged): the fp32 merge rounded to bf16 once
  per step (`round_weights`: matrices only), decoded with bf16 × bf16 → fp32 dots
  (`ModelConfig.dot_dtype`) and fp32 activations, norms, softmax and KV cache: half the weight
  memory and bytes read per decode step, faster bf16 dots. The sampler then draws from the
  bf16-rounded policy (updates below half a bf16 step of W are lost, as above), the
  vLLM-bf16-rollout / fp32-trainer split of verl: the trainer's fp32 log-probs stay π_old, the
  gap is measured (`rollout/logp_gap_*`, gated at `config.LOGP_GAP_BF16_WEIGHTS`) and
  `algo.rollout_is` corrects for it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lorarl_jax.model import lora as lora_lib
from lorarl_jax.model import quant
from lorarl_jax.model.config import ModelConfig
from lorarl_jax.model.lora import LoraConfig
from lorarl_jax.model.transformer import abstract_params

FREE_FRACTION = 0.5  # `auto` merges an NF4 base whose dense copy fits in this share of free memory


@dataclasses.dataclass(frozen=True)
class DecodeWeights:
    """What `generate` gets: `cfg` and `params`, plus the adapter when it is not merged."""

    cfg: ModelConfig
    params: Any
    lora: Any = None
    lcfg: LoraConfig | None = None


def dense_linear_bytes(cfg: ModelConfig) -> int:
    """Bytes of the decoder linear kernels dequantized to the compute dtype (the merged copy)."""
    flat = traverse_util.flatten_dict(nn.unbox(abstract_params(cfg.dense)))
    n = sum(
        int(np.prod(v.shape))
        for p, v in flat.items()
        if p[-1] == "kernel" and p[-2] in quant.LINEAR_LAYERS
    )
    return n * cfg.compute_dtype.itemsize


def free_device_bytes(device=None) -> int | None:
    """Free memory of an accelerator (its allocator's limit − in use), or the host's available
    memory on CPU; None when neither is known."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kb * 1024
    except (OSError, StopIteration):
        return None


def low_precision(cfg: ModelConfig) -> str:
    """The dtype name that would round a merged update away ("" when merged kernels are fp32):
    the compute dtype, or the stored kernels' dtype of a dense base."""
    for name in (cfg.dtype, cfg.param_dtype if cfg.quantization == "none" else "float32"):
        if jnp.dtype(name) != jnp.float32:
            return str(jnp.dtype(name))
    return ""


def resolve_merge(mode: str, cfg: ModelConfig, free_bytes: int | None = None) -> tuple[bool, str]:
    """(merge?, reason) for `rollout.merge`; see the module docstring."""
    low = low_precision(cfg)
    if mode == "always" and low:
        return True, (
            f"rollout.merge=always with {low} weights: updates smaller than half a {low} step of "
            "W round away in the merged kernels (rollout.merge=auto decodes unmerged)"
        )
    if mode in ("always", "never"):
        return mode == "always", f"rollout.merge={mode}"
    if mode != "auto":
        raise ValueError(f"rollout.merge must be auto, always or never, got {mode!r}")
    if low:
        return (
            False,
            f"rollout.merge=auto: {low} weights cannot hold the adapter's update, unmerged",
        )
    if cfg.quantization == "none":
        return True, "rollout.merge=auto: full-precision base, merged"
    need = dense_linear_bytes(cfg)
    free = free_device_bytes() if free_bytes is None else free_bytes
    if free is None:
        return False, "rollout.merge=auto: free device memory unknown, adapter kept unmerged"
    fits = need <= FREE_FRACTION * free
    verdict = "merged" if fits else "adapter kept unmerged"
    gib = 2.0**30
    return fits, (
        f"rollout.merge=auto: dense weights {need / gib:.2f} GiB vs {free / gib:.2f} GiB free → "
        f"{verdict}"
    )


def make_rollout_weights(cfg: ModelConfig, lcfg: LoraConfig, merge_fn=None):
    """`fn(base, lora) → DecodeWeights`: merged by `merge_fn(base, lora)` (e.g. `jit_merge` of
    rl/sharding.py, laid out for decode) or, when it is None, base and adapter passed through."""
    if merge_fn is None:
        return lambda base, lora: DecodeWeights(cfg, base, lora, lcfg)
    return lambda base, lora: DecodeWeights(cfg.dense, merge_fn(base, lora))


def round_weights(params, dtype):
    """`rollout.weight_dtype`: the matrices (linear kernels, embedding, LM head) → `dtype`;
    vectors (norm scales, biases) stay as they are."""

    def cast(x):
        return x.astype(dtype) if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, params)


def jit_merge(
    cfg: ModelConfig, lcfg: LoraConfig, in_shardings=None, out_shardings=None, weight_dtype=""
):
    """The jitted merge W' = dequant(W) + s·A·B (NF4 layers dequantized to the compute dtype),
    rounded to `weight_dtype` when given (fp32 math first: W' is the fp32 merge, rounded once);
    with shardings (`rl/programs.py`: base and adapter in, decode layout out), else one device."""
    kw = {}
    if in_shardings is not None:
        kw = dict(in_shardings=in_shardings, out_shardings=out_shardings)

    def merge(b, lo):
        w = lora_lib.merge(b, lo, lcfg.scale, cfg.compute_dtype)
        return round_weights(w, weight_dtype) if weight_dtype else w

    return jax.jit(merge, **kw)
