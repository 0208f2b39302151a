"""What the benchmarks share: the CPU they ran on, the model's FLOPs, a matmul rate measured in the
same run (the reference an achieved GFLOP/s is read against)."""

from __future__ import annotations

import platform
import time


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def layer_shapes(cfg) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's linear maps: q, k, v, o, gate, up, down."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return [(D, q), (D, kv), (D, kv), (q, D), (D, F), (D, F), (F, D)]


def linear_flops(cfg) -> int:
    """Multiply-add FLOPs (2 per MAC) of the decoder layers' linear maps for one token."""
    return 2 * cfg.num_layers * sum(i * o for i, o in layer_shapes(cfg))


def head_flops(cfg) -> int:
    """FLOPs of the LM head for one token."""
    return 2 * cfg.hidden_size * cfg.vocab_size


def attention_flops(cfg, context: float) -> float:
    """FLOPs of q·kᵀ and p·v for one token attending to `context` positions, all layers."""
    return 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context


def prefill_flops(cfg, prompts: int, P: int) -> float:
    """FLOPs of a prefill of `prompts` prompts of P tokens (causal: each attends to P/2 on
    average), with the LM head on each prompt's last position."""
    return prompts * P * (linear_flops(cfg) + attention_flops(cfg, P / 2)) + prompts * head_flops(
        cfg
    )


def decode_step_flops(cfg, rows: int, context: float) -> float:
    """FLOPs of one decode step of `rows` rows attending to `context` positions."""
    return rows * (linear_flops(cfg) + head_flops(cfg) + attention_flops(cfg, context))


def lora_flops(cfg, r: int) -> int:
    """FLOPs of rank-r LoRA branches (x·A then ·B) on a layer's 7 linear maps, one token."""
    return 2 * cfg.num_layers * sum(r * (i + o) for i, o in layer_shapes(cfg))


def matmul_rate(
    cfg, rows: int, head: bool = True, repeats: int = 5, dtype: str = "float32"
) -> float:
    """GFLOP/s of `x[rows, in] @ w[in, out]` over one layer's linear shapes (and the LM head),
    each jitted alone, best of `repeats`: the rate XLA reaches on this machine at these shapes.
    `dtype` bfloat16: both operands in bf16, fp32 result (how the rollout's dots run on
    `rollout.weight_dtype=bfloat16` weights, `model/lora.py`)."""
    import jax
    import jax.numpy as jnp

    shapes = layer_shapes(cfg) + ([(cfg.hidden_size, cfg.vocab_size)] if head else [])
    mm = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    flops, seconds = 0.0, 0.0
    for i, o in shapes:
        x = jax.random.normal(jax.random.key(0), (rows, i), jnp.float32).astype(dtype)
        w = jax.random.normal(jax.random.key(1), (i, o), jnp.float32).astype(dtype)
        jax.block_until_ready(mm(x, w))
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(mm(x, w))
            best = min(best, time.perf_counter() - t0)
        weight = cfg.num_layers if (i, o) != (cfg.hidden_size, cfg.vocab_size) else 1
        flops += weight * 2 * rows * i * o
        seconds += weight * best
    return flops / seconds / 1e9
