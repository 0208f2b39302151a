"""Scanned decoder layers (model.scan_layers) == the unrolled decoder: values and adapter grads."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import left_padded_batch

from lorarl_jax.model.hf import load_hf_model
from lorarl_jax.model.lora import LoraConfig, init_lora
from lorarl_jax.model.scan import hidden_states, layer_period, stack_layers, unstack_layers
from lorarl_jax.model.transformer import Transformer, positions_from_mask
from lorarl_jax.rl.logprobs import shared_prompt_logprobs

S, F = "sliding_attention", "full_attention"


def _gemma(hf_dir, layer_types):
    """The tiny Gemma 3 with another layer pattern, random weights (no HF file needed)."""
    cfg, _ = load_hf_model(hf_dir("gemma3"))
    cfg = dataclasses.replace(cfg, num_layers=len(layer_types), layer_types=tuple(layer_types))
    tok = jnp.zeros((1, 4), jnp.int32)
    v = Transformer(cfg).init(jax.random.key(5), tok, positions_from_mask(tok + 1), tok + 1)
    return cfg, nn.unbox(v["params"])


def _case(hf_dir, name):
    if name == "llama":
        return load_hf_model(hf_dir("llama"))
    if name == "qwen2_nf4":
        return load_hf_model(hf_dir("qwen2"), quantization="nf4")
    return _gemma(hf_dir, {"gemma_p2": [S, F, S, F], "gemma_p3": [S, F, S]}[name])


def test_layer_period_and_stacking_round_trip():
    class C:
        num_layers = 6

        def __init__(self, kinds):
            self.kinds = kinds

        def layer_is_sliding(self, i):
            return self.kinds[i]

    assert layer_period(C([False] * 6)) == 1
    assert layer_period(C([True, True, False] * 2)) == 3  # Gemma 3's pattern, shorter
    assert layer_period(C([True] * 5 + [False])) == 6
    layers = [{"w": jnp.full((2,), i)} for i in range(6)]
    st = stack_layers(layers, 3)
    assert len(st) == 3 and st[1]["w"][:, 0].tolist() == [1, 4]
    back = unstack_layers(st, 6)
    assert [int(x["w"][0]) for x in back] == list(range(6))


@pytest.mark.parametrize(
    "name,remat",
    [
        ("llama", False),
        ("llama", True),
        ("qwen2_nf4", False),
        ("gemma_p2", True),
        ("gemma_p3", False),
    ],
)
def test_scanned_equals_unrolled_logprobs_and_adapter_grads(name, remat, hf_dir):
    """Shared-prompt log-probs (a prompt pass writing the cache, a response pass reading it) and
    their gradient w.r.t. every adapter leaf, scanned vs unrolled."""
    cfg, base = _case(hf_dir, name)
    lcfg = LoraConfig(r=4, lora_alpha=8)
    lora = init_lora(base, lcfg, jax.random.key(0))
    leaves, tdef = jax.tree.flatten(lora)  # nonzero B as well, so every leaf gets a gradient
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noise = [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    lora = tdef.unflatten(noise)
    prompt, pmask = left_padded_batch(cfg.vocab_size, [6, 3], 6, seed=1)
    resp = np.random.default_rng(2).integers(1, cfg.vocab_size, (4, 5)).astype(np.int32)
    rmask = np.ones((4, 5), np.int32)
    rmask[1, 3:] = 0

    def run(c):
        def loss(lo):
            lp, ent = shared_prompt_logprobs(
                c, lcfg, base, lo, prompt, pmask, resp, rmask, n=2, chunk=2
            )
            return jnp.sum(lp * rmask) + 0.1 * jnp.sum(ent * rmask), (lp, ent)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(lora)

    (l0, (lp0, ent0)), g0 = run(dataclasses.replace(cfg, remat=remat))
    (l1, (lp1, ent1)), g1 = run(dataclasses.replace(cfg, remat=remat, scan_layers=True))
    np.testing.assert_allclose(lp1, lp0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent1, ent0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        assert float(jnp.abs(b).max()) > 0
        np.testing.assert_allclose(a, b, atol=2e-5 * scale)


def test_scanned_hidden_without_cache_and_dropout_keys(hf_dir):
    """No cache: equals the unrolled model; with LoRA dropout, a key gives a fixed result and
    another key another one."""
    cfg, base = load_hf_model(hf_dir("llama"))
    lcfg = LoraConfig(r=4, lora_dropout=0.5)
    lora = jax.tree.map(lambda x: x + 0.1, init_lora(base, lcfg, jax.random.key(0)))
    tokens, mask = left_padded_batch(cfg.vocab_size, [7, 4], 7, seed=3)
    pos = positions_from_mask(jnp.asarray(mask))
    v = {"params": base, "lora": lora}
    h0, _ = hidden_states(cfg, lcfg, v, tokens, pos, mask)
    sc = dataclasses.replace(cfg, scan_layers=True)
    h1, _ = hidden_states(sc, lcfg, v, tokens, pos, mask)
    np.testing.assert_allclose(h1, h0, rtol=1e-5, atol=1e-5)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a = hidden_states(sc, lcfg, v, tokens, pos, mask, dropout_key=k1)[0]
    b = hidden_states(sc, lcfg, v, tokens, pos, mask, dropout_key=k1)[0]
    c = hidden_states(sc, lcfg, v, tokens, pos, mask, dropout_key=k2)[0]
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-3 and float(jnp.abs(a - h1).max()) > 1e-3
