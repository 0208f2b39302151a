"""Runtime switches of the decoder: gradient checkpointing and the compute dtype."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import left_padded_batch

from lorarl_jax.model.config import load_config
from lorarl_jax.model.hf import load_hf_model
from lorarl_jax.model.lora import LoraConfig, init_lora
from lorarl_jax.model.transformer import Transformer, positions_from_mask


def _loss(cfg, lcfg, base, lora, tokens, mask):
    logits, _ = Transformer(cfg, lcfg).apply(
        {"params": base, "lora": lora}, tokens, positions_from_mask(mask), mask
    )
    return (jax.nn.log_softmax(logits) * mask[..., None]).mean()


def test_remat_gives_identical_loss_and_adapter_grads(hf_dir):
    d = hf_dir("gemma3")
    cfg, base = load_hf_model(d)
    lcfg = LoraConfig(r=4, lora_alpha=8)
    lora = jax.tree.map(lambda x: x + 0.05, init_lora(base, lcfg, jax.random.key(0)))
    tokens, mask = (jnp.asarray(x) for x in left_padded_batch(128, [8, 5], 8))
    f = jax.value_and_grad(lambda lo, c: _loss(c, lcfg, base, lo, tokens, mask))
    l1, g1 = jax.jit(f, static_argnums=1)(lora, cfg)
    l2, g2 = jax.jit(f, static_argnums=1)(lora, cfg.replace(remat=True))
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)
    assert load_config(d, remat=True).remat


def test_bf16_compute_is_close_to_fp32(hf_dir):
    d = hf_dir("llama")
    cfg, base = load_hf_model(d)
    tokens, mask = (jnp.asarray(x) for x in left_padded_batch(128, [8, 5], 8))
    pos = positions_from_mask(mask)
    f32, _ = Transformer(cfg).apply({"params": base}, tokens, pos, mask)
    cfg16 = cfg.replace(dtype="bfloat16")
    b16, _ = Transformer(cfg16).apply({"params": base}, tokens, pos, mask)
    assert b16.dtype == jnp.float32  # logits are returned in fp32
    valid = np.asarray(mask, bool)
    err = np.abs(np.asarray(b16) - np.asarray(f32))[valid].max()
    scale = np.abs(np.asarray(f32))[valid].max()
    assert 0 < err < 0.05 * scale  # bf16 really ran (not identical) and stays close
