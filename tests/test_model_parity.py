"""Logit parity with transformers (torch CPU, fp32) for tiny random Llama, Qwen2 and Gemma 3."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY, left_padded_batch

from lorarl_jax.model.hf import load_hf_model
from lorarl_jax.model.transformer import Transformer, positions_from_mask


def _hf_logits(model_dir, tokens, mask):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos, dtype=torch.long),
        )
    return out.logits.float().numpy()


def _our_logits(model_dir, tokens, mask):
    cfg, params = load_hf_model(model_dir)
    logits, _ = Transformer(cfg).apply(
        {"params": params}, jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), mask
    )
    return np.asarray(logits)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_logits_match_transformers_left_padded(kind, hf_dir):
    d = hf_dir(kind)
    tokens, mask = left_padded_batch(TINY[kind]["vocab_size"], [12, 7, 1], 12, seed=1)
    ours, theirs = _our_logits(d, tokens, mask), _hf_logits(d, tokens, mask)
    valid = mask.astype(bool)
    diff = np.abs(ours - theirs)[valid].max()
    assert diff <= 1e-4, f"{kind}: max |Δlogits| = {diff}"
    assert np.abs(theirs[valid]).max() > 0.1  # not a vacuous comparison


def test_sliding_window_is_exercised(hf_dir):
    """Gemma 3 tiny model has window 4 < sequence 12: a full-attention mistake would show."""
    from lorarl_jax.model.config import load_config

    cfg = load_config(hf_dir("gemma3"))
    assert cfg.sliding_window == 4 and cfg.layer_is_sliding(0) and not cfg.layer_is_sliding(1)
    assert cfg.rope_local.theta == 10000.0 and cfg.rope.theta == 1000000.0


def test_missing_and_unexpected_tensors_are_named(hf_dir, tmp_path):
    from safetensors.numpy import load_file

    from lorarl_jax.model.config import load_config
    from lorarl_jax.model.hf import params_from_hf_tensors

    d = hf_dir("llama")
    cfg = load_config(d)
    tensors = load_file(f"{d}/model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.9.foo.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as e:
        params_from_hf_tensors(tensors, cfg, d)
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "model.layers.9.foo.weight" in msg
    tensors = load_file(f"{d}/model.safetensors")
    tensors["model.norm.weight"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="shape mismatch.*model.norm.weight"):
        params_from_hf_tensors(tensors, cfg, d)


def test_sharded_safetensors_index(hf_dir, tmp_path):
    """A checkpoint split over two files with an index loads to the same params."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    d = hf_dir("qwen2")
    tensors = load_file(f"{d}/model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    parts = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(f"{d}/config.json", out / "config.json")
    weight_map = {}
    for fname, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, str(out / fname))
        weight_map.update({k: fname for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, p1 = load_hf_model(d)
    _, p2 = load_hf_model(str(out))
    import jax

    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), p1, p2)))
