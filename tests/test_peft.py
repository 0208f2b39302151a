"""PEFT interop: our adapter export loads in `peft.PeftModel` with equal logits (and differs from
the base model), re-imports to the same tree, merges into a plain HF checkpoint, and adapters made
by PEFT itself import to the same logits as PEFT's."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from conftest import TINY, left_padded_batch
from flax import traverse_util
from transformers import AutoModelForCausalLM

from lorarl_jax.model.hf import load_hf_model, load_peft_adapter, save_hf_model, save_peft_adapter
from lorarl_jax.model.lora import LoraConfig, init_lora, merge
from lorarl_jax.model.transformer import Transformer, positions_from_mask

QVD = ("q_proj", "v_proj", "down_proj")
CASES = [
    ("llama", LoraConfig(r=4, lora_alpha=8, target_modules=QVD)),
    ("llama", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True)),
    ("qwen2", LoraConfig(r=4, lora_alpha=8, target_modules=QVD)),
    ("qwen2", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")),
    ("gemma3", LoraConfig(r=4, lora_alpha=8, target_modules=QVD, use_rslora=True)),
]
IDS = [f"{k}-{'all' if len(c.target_modules) == 7 else 'qvd'}" for k, c in CASES]


def _batch(kind):
    return left_padded_batch(TINY[kind]["vocab_size"], [11, 5, 1], 11, seed=7)


def _torch_logits(model, tokens, mask):
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos, dtype=torch.long),
        )
    return out.logits.float().numpy()


def _hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()


def _our_logits(cfg, base, lora, lcfg, tokens, mask):
    model = Transformer(cfg, lcfg if lora is not None else None)
    variables = {"params": base} if lora is None else {"params": base, "lora": lora}
    pos = positions_from_mask(jnp.asarray(mask))
    logits, _ = model.apply(variables, jnp.asarray(tokens), pos, jnp.asarray(mask))
    return np.asarray(logits)


def _random_adapter(base, lcfg, seed=0):
    lora = init_lora(base, lcfg, jax.random.key(seed))
    flat = traverse_util.flatten_dict(lora)
    key = jax.random.key(seed + 1)
    for i, path in enumerate(sorted(flat)):
        if path[-1] == "lora_b":
            shape = flat[path].shape
            flat[path] = 0.1 * jax.random.normal(jax.random.fold_in(key, i), shape)
    return traverse_util.unflatten_dict(flat)


def _max_diff(a, b, mask):
    return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.mark.parametrize("kind,lcfg", CASES, ids=IDS)
def test_export_loads_in_peft_and_matches(kind, lcfg, hf_dir, tmp_path):
    d = hf_dir(kind)
    cfg, base = load_hf_model(d)
    lora = _random_adapter(base, lcfg)
    save_peft_adapter(lora, lcfg, str(tmp_path / "adapter"), base_model=d)
    tokens, mask = _batch(kind)
    ours = _our_logits(cfg, base, lora, lcfg, tokens, mask)
    base_torch = _torch_logits(_hf_model(d), tokens, mask)
    peft_model = peft.PeftModel.from_pretrained(_hf_model(d), str(tmp_path / "adapter")).eval()
    theirs = _torch_logits(peft_model, tokens, mask)
    assert _max_diff(ours, theirs, mask) <= 1e-4
    assert _max_diff(theirs, base_torch, mask) > 1e-2  # the adapter is really applied
    # PEFT read the same hyper-parameters we wrote.
    pc = peft_model.peft_config["default"]
    assert (pc.r, pc.lora_alpha, pc.use_rslora) == (lcfg.r, lcfg.lora_alpha, lcfg.use_rslora)
    assert set(pc.target_modules) == set(lcfg.target_modules)
    n_lora = sum("lora_A" in n for n, _ in peft_model.named_parameters())
    assert n_lora == len(lcfg.target_modules) * cfg.num_layers


@pytest.mark.parametrize("kind,lcfg", CASES, ids=IDS)
def test_reimport_is_identical(kind, lcfg, hf_dir, tmp_path):
    _, base = load_hf_model(hf_dir(kind))
    lora = _random_adapter(base, lcfg)
    save_peft_adapter(lora, lcfg, str(tmp_path))
    cfg_json = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg_json["peft_type"] == "LORA" and cfg_json["r"] == lcfg.r
    lora2, lcfg2 = load_peft_adapter(str(tmp_path))
    assert lcfg2 == lcfg
    flat, flat2 = traverse_util.flatten_dict(lora), traverse_util.flatten_dict(lora2)
    assert flat.keys() == flat2.keys()
    for path, v in flat.items():
        assert flat2[path].dtype == np.float32
        np.testing.assert_array_equal(np.asarray(v), flat2[path], err_msg=str(path))


@pytest.mark.parametrize("kind,lcfg", CASES, ids=IDS)
def test_merged_export_loads_in_transformers(kind, lcfg, hf_dir, tmp_path):
    d = hf_dir(kind)
    cfg, base = load_hf_model(d)
    lora = _random_adapter(base, lcfg)
    save_hf_model(merge(base, lora, lcfg.scale), str(tmp_path), src_dir=d)
    tokens, mask = _batch(kind)
    ours = _our_logits(cfg, base, lora, lcfg, tokens, mask)
    theirs = _torch_logits(_hf_model(str(tmp_path)), tokens, mask)
    assert _max_diff(ours, theirs, mask) <= 1e-4
    assert _max_diff(theirs, _torch_logits(_hf_model(d), tokens, mask), mask) > 1e-2


@pytest.mark.parametrize("kind,lcfg", CASES, ids=IDS)
def test_import_adapter_made_by_peft(kind, lcfg, hf_dir, tmp_path):
    d = hf_dir(kind)
    targets = "all-linear" if len(lcfg.target_modules) == 7 else list(lcfg.target_modules)
    peft_cfg = peft.LoraConfig(
        r=lcfg.r,
        lora_alpha=lcfg.lora_alpha,
        target_modules=targets,
        use_rslora=lcfg.use_rslora,
        lora_dropout=0.1,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(0)
    model = peft.get_peft_model(_hf_model(d), peft_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path))
    tokens, mask = _batch(kind)
    theirs = _torch_logits(model, tokens, mask)

    cfg, base = load_hf_model(d)
    lora, got = load_peft_adapter(str(tmp_path))
    assert got == LoraConfig(
        r=lcfg.r,
        lora_alpha=lcfg.lora_alpha,
        target_modules=lcfg.target_modules,
        use_rslora=lcfg.use_rslora,
        lora_dropout=0.1,
    )
    ours = _our_logits(cfg, base, lora, got, tokens, mask)
    assert _max_diff(ours, theirs, mask) <= 1e-4
    assert _max_diff(ours, _our_logits(cfg, base, None, None, tokens, mask), mask) > 1e-2


def test_unsupported_adapter_options_raise(hf_dir, tmp_path):
    _, base = load_hf_model(hf_dir("llama"))
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=QVD)
    save_peft_adapter(_random_adapter(base, lcfg), lcfg, str(tmp_path))
    path = tmp_path / "adapter_config.json"
    good = json.loads(path.read_text())
    for key, value in [
        ("rank_pattern", {"q_proj": 8}),
        ("alpha_pattern", {"q_proj": 8}),
        ("bias", "all"),
        ("use_dora", True),
    ]:
        path.write_text(json.dumps({**good, key: value}))
        with pytest.raises(ValueError, match=key):
            load_peft_adapter(str(tmp_path))


def test_import_peft_adapter_on_some_layers_only(hf_dir, tmp_path):
    """`layers_to_transform`: only the layers in the file are adapted, the others stay base."""
    d = hf_dir("qwen2")
    peft_cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]
    )
    torch.manual_seed(0)
    model = peft.get_peft_model(_hf_model(d), peft_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path))
    tokens, mask = _batch("qwen2")
    cfg, base = load_hf_model(d)
    lora, lcfg = load_peft_adapter(str(tmp_path))
    assert set(lora) == {"layers_1"} and lcfg.target_modules == ("q_proj", "up_proj")
    ours = _our_logits(cfg, base, lora, lcfg, tokens, mask)
    assert _max_diff(ours, _torch_logits(model, tokens, mask), mask) <= 1e-4
