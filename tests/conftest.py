"""Shared fixtures: tiny random HF models (built with transformers + torch CPU) saved to disk."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the whole session (and the trainer subprocesses it starts): most
# tests compile the same tiny-model programs from fresh closures, which `jax.jit`'s in-memory
# cache cannot share. A fresh directory per session, so every run (CI included) starts cold;
# one per pytest-xdist worker (`-n 2`), so no two processes write one entry.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ or "LORARL_TEST_XLA_CACHE" in os.environ:
    import atexit
    import shutil
    import tempfile

    if "LORARL_TEST_XLA_CACHE" not in os.environ:  # this process owns (and removes) the root
        os.environ["LORARL_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="lorarl_jax_xla_cache_")
        atexit.register(shutil.rmtree, os.environ["LORARL_TEST_XLA_CACHE"], True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        os.environ["LORARL_TEST_XLA_CACHE"], worker
    )
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np
import pytest

TINY = {
    "llama": dict(
        model_type="llama",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    ),
    "llama3_rope": dict(
        model_type="llama",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    ),
    "qwen2": dict(
        model_type="qwen2",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=32,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    ),
}


def build_hf_model(kind: str, seed: int = 0):
    """A tiny random transformers model (fp32, eval mode) with non-trivial norms and biases."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(TINY[kind])
    model_type = kw.pop("model_type")
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # random norm weights and biases so a wrong formula shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if "gemma" in model_type else 1.0))
    return model


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """kind → directory holding a saved tiny HF model (config.json + model.safetensors)."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            d = tmp_path_factory.mktemp(f"hf_{kind}")
            build_hf_model(kind).save_pretrained(d, safe_serialization=True)
            cache[kind] = str(d)
        return cache[kind]

    return get


def left_padded_batch(vocab: int, lengths, T: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(lengths), T), np.int32)
    mask = np.zeros((len(lengths), T), np.int32)
    for b, n in enumerate(lengths):
        tokens[b, T - n :] = rng.integers(1, vocab, n)
        mask[b, T - n :] = 1
    return tokens, mask


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = (
    "yes no what is the answer give final after #### + - * ? . , = a an of to and in "
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20"
).split()


def make_tiny_tokenizer():
    """A word-level tokenizer with a chat template, built offline (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    hf.add_special_tokens({"additional_special_tokens": specials[3:]})
    hf.chat_template = CHAT_TEMPLATE
    return hf


def save_tiny_model_dir(path, seed: int = 0, vocab_pad: int = 64):
    """A tiny Llama + tokenizer + generation config: a complete model dir for trainer tests."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = make_tiny_tokenizer()
    assert len(tok) <= vocab_pad
    config = AutoConfig.for_model(
        "llama",
        vocab_size=vocab_pad,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        initializer_range=0.3,  # large enough embeddings that an adapter can steer the logits
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump({"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}, f)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))
