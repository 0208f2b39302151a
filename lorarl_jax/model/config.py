"""Model architecture config: one frozen dataclass for Llama, Qwen2/2.5 and Gemma 3 text.

Built once from a Hugging Face `config.json` (or the equivalent dict that the GGUF reader produces).
We let `transformers.AutoConfig` fill in the family defaults and normalise the RoPE fields (the
runtime imports transformers' config classes only, never torch), then read every field we need into
plain Python values. Everything downstream (the Flax decoder, the name-mapping table, the sampler)
reads this dataclass, never the HF object.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax.numpy as jnp

SUPPORTED = ("llama", "qwen2", "gemma3_text")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention kind: `inv_freq` is derived from these fields."""

    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    max_position_embeddings: int = 8192
    attention_bias: bool = False  # Qwen2: q/k/v biases
    mlp_bias: bool = False
    # Gemma 3 specifics.
    rope_local: RopeConfig | None = None  # RoPE of sliding-window layers
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # "sliding_attention" | "full_attention" per layer
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Runtime switches (not from HF).
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # "" or "bfloat16": the linear maps and the LM head take operands of this dtype and accumulate
    # in the compute dtype (bf16 rollout weights with fp32 activations, `rollout.weight_dtype`)
    dot_dtype: str = ""
    remat: bool = False
    scan_layers: bool = False  # training passes run the decoder layers under lax.scan (scan.py)
    quantization: str = "none"  # "nf4": decoder linear kernels stored as NF4 (model/quant.py)
    double_quant: bool = False  # NF4 scales quantized to 8 bits as well

    @property
    def dense(self) -> ModelConfig:
        """The same model with a full-precision base (what a dequantized / merged tree needs)."""
        return dataclasses.replace(self, quantization="none", double_quant=False)

    def __post_init__(self):
        if self.quantization not in ("none", "nf4"):
            raise ValueError(f"quantization must be 'none' or 'nf4', got {self.quantization!r}")

    @property
    def is_gemma(self) -> bool:
        return self.model_type == "gemma3_text"

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def attn_scale(self) -> float:
        if self.query_pre_attn_scalar is not None:
            return float(self.query_pre_attn_scalar) ** -0.5
        return self.head_dim**-0.5

    def layer_is_sliding(self, i: int) -> bool:
        return bool(self.layer_types) and self.layer_types[i] == "sliding_attention"

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def _rope_from(params: dict[str, Any] | None, default_theta: float) -> RopeConfig:
    params = dict(params or {})
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"rope_type {rope_type!r} is not supported (default, linear, llama3)")
    return RopeConfig(
        theta=float(params.get("rope_theta", default_theta)),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0) or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def from_hf_dict(d: dict[str, Any], **runtime) -> ModelConfig:
    """Builds a ModelConfig from a HF config dict; `runtime` sets dtype / param_dtype / remat /
    quantization / double_quant."""
    from transformers import AutoConfig  # config classes only; no torch is imported

    model_type = d.get("model_type")
    if model_type == "gemma3":  # multimodal wrapper: use its text tower config
        d = d["text_config"]
        model_type = "gemma3_text"
    if model_type not in SUPPORTED:
        raise ValueError(f"model_type {model_type!r} is not supported; expected one of {SUPPORTED}")
    kw = {k: v for k, v in d.items() if k != "model_type"}
    hf = AutoConfig.for_model(model_type, **kw)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    rope_params = getattr(hf, "rope_parameters", None) or {}
    local = None
    if model_type == "gemma3_text":
        rope = _rope_from(rope_params.get("full_attention"), 1_000_000.0)
        local = _rope_from(rope_params.get("sliding_attention"), 10_000.0)
    else:
        if not rope_params:  # transformers 4.x layout
            rope_params = dict(getattr(hf, "rope_scaling", None) or {})
            rope_params["rope_theta"] = getattr(hf, "rope_theta", 10000.0)
        rope = _rope_from(rope_params, 10000.0)
    layer_types = tuple(getattr(hf, "layer_types", None) or ())
    use_sliding = model_type == "gemma3_text" or getattr(hf, "use_sliding_window", False)
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=int(hf.vocab_size),
        hidden_size=int(hf.hidden_size),
        intermediate_size=int(hf.intermediate_size),
        num_layers=int(hf.num_hidden_layers),
        num_heads=int(hf.num_attention_heads),
        num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.rms_norm_eps),
        rope=rope,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        max_position_embeddings=int(getattr(hf, "max_position_embeddings", 8192)),
        attention_bias=bool(getattr(hf, "attention_bias", model_type == "qwen2")),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        rope_local=local,
        sliding_window=getattr(hf, "sliding_window", None) if use_sliding else None,
        layer_types=layer_types if use_sliding else (),
        query_pre_attn_scalar=getattr(hf, "query_pre_attn_scalar", None),
        attn_logit_softcapping=getattr(hf, "attn_logit_softcapping", None),
        final_logit_softcapping=getattr(hf, "final_logit_softcapping", None),
        **runtime,
    )
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    return cfg


def load_config(path: str, **runtime) -> ModelConfig:
    """`path` is a checkpoint directory or a config.json file."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"model config not found: {path}")
    with open(path) as f:
        return from_hf_dict(json.load(f), **runtime)


def rope_inv_freq(rope: RopeConfig, head_dim: int):
    """inv_freq[i] = theta^(-2i/d), then linear or Llama-3 frequency scaling."""
    inv = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    return inv
