"""The decoder's layers under `lax.scan`: one compiled layer body instead of L unrolled copies.

Why: XLA compiles an unrolled forward + backward of L layers as one large program, and XLA:CPU
then keeps buffers of many layers live at once: remat was honoured for ~4 layers only. Under scan
the layer body is compiled once and its buffers are reused every iteration; with
`model.gradient_checkpointing` the body is `jax.checkpoint`ed, so the backward pass keeps only
each layer's [B, T, D] input and recomputes the rest, which is what remat promises. SmolLM2's
policy step: XLA temp 1368 MiB unrolled + remat vs 887 MiB scanned + remat, compile 23 s vs 13 s.

Parameters keep their per-layer layout (`layers_i/...`, the HF / PEFT / checkpoint layout);
`stack_layers` stacks them inside the jitted function, a copy of the decoder weights made once
per call. A KV cache (the training passes write the prompt's keys once and read them for the n
responses) stays stacked between the two passes (`init_train_cache`, `repeat_cache_rows`).
Layers with a repeating pattern (Gemma 3: five sliding-window layers, then a global one) are
scanned one period at a time, the period unrolled in the body. The result equals
`Transformer.apply(..., return_hidden=True)` (tested to fp32 rounding); only dropout masks
differ, as they come from per-layer keys split from the one given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lorarl_jax.model.config import ModelConfig
from lorarl_jax.model.lora import LoraConfig
from lorarl_jax.model.transformer import Block, Transformer, init_cache


def layer_period(cfg: ModelConfig) -> int:
    """Smallest p dividing L such that layer i and layer i mod p are of the same kind."""
    kinds = [cfg.layer_is_sliding(i) for i in range(cfg.num_layers)]
    for p in range(1, cfg.num_layers + 1):
        if cfg.num_layers % p == 0 and all(k == kinds[i % p] for i, k in enumerate(kinds)):
            return p
    return cfg.num_layers


def stack_layers(per_layer: list, period: int) -> list:
    """[tree of layer 0, 1, …, L−1] → `period` trees, tree j stacking layers j, j+p, j+2p, …"""
    groups = len(per_layer) // period
    return [
        jax.tree.map(lambda *xs: jnp.stack(xs), *[per_layer[g * period + j] for g in range(groups)])
        for j in range(period)
    ]


def unstack_layers(stacked: list, num_layers: int) -> list:
    """Inverse of `stack_layers`."""
    period = len(stacked)
    return [
        jax.tree.map(lambda x, g=i // period: x[g], stacked[i % period]) for i in range(num_layers)
    ]


def init_train_cache(cfg: ModelConfig, batch: int, length: int):
    """A zeroed KV cache in the layout `hidden_states` reads and returns: a list per layer of
    {'k','v'} [B, K, S, Dh], or with cfg.scan_layers `period` such dicts of [L/p, B, K, S, Dh]."""
    if not cfg.scan_layers:
        return init_cache(cfg, batch, length)
    p = layer_period(cfg)
    one = init_cache(cfg.replace(num_layers=p), batch, length)
    groups = cfg.num_layers // p
    return [jax.tree.map(lambda x: jnp.zeros((groups, *x.shape), x.dtype), c) for c in one]


def repeat_cache_rows(cfg: ModelConfig, cache, n: int):
    """Each row of a `init_train_cache`-layout cache repeated n times (rows i·n … i·n + n − 1)."""
    axis = 1 if cfg.scan_layers else 0
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=axis), cache)


def hidden_states(
    cfg: ModelConfig,
    lcfg: LoraConfig | None,
    variables: dict,
    tokens_BxT,
    positions_BxT,
    kv_mask_BxS,
    cache=None,
    cache_index_B=None,
    dropout_key=None,
):
    """Final-normed hidden states and the updated cache: `Transformer(cfg, lcfg).apply(variables,
    …, return_hidden=True)`, with the layers unrolled or (cfg.scan_layers) scanned. `cache` is in
    the layout of `init_train_cache` and comes back in it."""
    deterministic = dropout_key is None
    model = Transformer(cfg, lcfg, deterministic=deterministic)
    rngs = None if deterministic else {"dropout": dropout_key}
    if not cfg.scan_layers:
        return model.apply(
            variables,
            tokens_BxT,
            positions_BxT,
            kv_mask_BxS,
            cache,
            cache_index_B,
            return_hidden=True,
            rngs=rngs,
        )
    L, p = cfg.num_layers, layer_period(cfg)
    x = model.apply(variables, tokens_BxT, method=Transformer.embed)
    xs = {
        c: stack_layers([tree[f"layers_{i}"] for i in range(L)], p) for c, tree in variables.items()
    }
    if cache is not None:
        xs["cache"] = cache
    if not deterministic:
        xs["key"] = jax.random.split(dropout_key, L // p)
    blocks = [Block(cfg, lcfg, cfg.layer_is_sliding(j), deterministic) for j in range(p)]

    def body(x, xs):
        keys = None if deterministic else jax.random.split(xs["key"], p)
        caches = []
        for j, block in enumerate(blocks):
            v = {c: xs[c][j] for c in variables}
            x, c = block.apply(
                v,
                x,
                positions_BxT,
                kv_mask_BxS,
                None if cache is None else xs["cache"][j],
                cache_index_B,
                rngs=None if deterministic else {"dropout": keys[j]},
            )
            caches.append(c)
        return x, (None if cache is None else caches)

    if cfg.remat:
        body = jax.checkpoint(body)
    x, new_cache = jax.lax.scan(body, x, xs)
    h = model.apply(variables, x, method=Transformer.final_norm)
    return h, new_cache
