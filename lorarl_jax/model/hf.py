"""Hugging Face interop through one declarative name-mapping table, used in both directions.

`RULES` pairs a HF tensor-name template with our tree-path template and says whether the tensor is
transposed (HF Linear weights are [out, in], Flax kernels [in, out]). The same table
- imports a HF checkpoint directory (single or sharded safetensors),
- exports merged weights as a HF safetensors directory,
- names PEFT adapter tensors (`<hf module>.lora_A.weight` is our `lora_a`ᵀ, [r, in]).
Loading checks every expected tensor and shape and names what is missing or unexpected. With
`quantization="nf4"` each decoder linear kernel is quantized as soon as it is read (tensors are
read one at a time), so a full-precision copy of the whole model never exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from lorarl_jax.model import quant
from lorarl_jax.model.config import ModelConfig, load_config
from lorarl_jax.model.lora import LoraConfig
from lorarl_jax.model.transformer import abstract_params

_ALTS = {
    "i": r"\d+",
    "attn": "q_proj|k_proj|v_proj|o_proj",
    "mlp": "gate_proj|up_proj|down_proj",
    "qknorm": "q_norm|k_norm",
    "norm": "input_layernorm|post_attention_layernorm|pre_feedforward_layernorm"
    "|post_feedforward_layernorm",
}

# (HF name, tree path, transposed)
RULES = (
    ("model.embed_tokens.weight", "embed_tokens/embedding", False),
    ("model.norm.weight", "norm/scale", False),
    ("lm_head.weight", "lm_head/kernel", True),
    ("model.layers.{i}.self_attn.{attn}.weight", "layers_{i}/self_attn/{attn}/kernel", True),
    ("model.layers.{i}.self_attn.{attn}.bias", "layers_{i}/self_attn/{attn}/bias", False),
    ("model.layers.{i}.self_attn.{qknorm}.weight", "layers_{i}/self_attn/{qknorm}/scale", False),
    ("model.layers.{i}.mlp.{mlp}.weight", "layers_{i}/mlp/{mlp}/kernel", True),
    ("model.layers.{i}.mlp.{mlp}.bias", "layers_{i}/mlp/{mlp}/bias", False),
    ("model.layers.{i}.{norm}.weight", "layers_{i}/{norm}/scale", False),
)
IGNORED_HF = (r".*\.rotary_emb\.inv_freq",)
PEFT_PREFIX = "base_model.model."


def _regex(template: str) -> re.Pattern:
    out = re.escape(template)
    for name, alt in _ALTS.items():
        out = out.replace(re.escape("{" + name + "}"), f"(?P<{name}>{alt})")
    return re.compile(out + "$")


_COMPILED = tuple((_regex(h), _regex(t), h, t, tr) for h, t, tr in RULES)


def hf_to_path(name: str) -> tuple[tuple[str, ...], bool] | None:
    """HF tensor name → (tree path, transposed), or None if no rule matches."""
    for hf_re, _, _, tree_t, tr in _COMPILED:
        m = hf_re.match(name)
        if m:
            return tuple(tree_t.format(**m.groupdict()).split("/")), tr
    return None


def path_to_hf(path: tuple[str, ...]) -> tuple[str, bool]:
    """Tree path → (HF tensor name, transposed); the inverse of `hf_to_path`."""
    joined = "/".join(path)
    for _, tree_re, hf_t, _, tr in _COMPILED:
        m = tree_re.match(joined)
        if m:
            return hf_t.format(**m.groupdict()), tr
    raise KeyError(f"no HF name for parameter {joined}")


# ---------------------------------------------------------------- checkpoints


def _safetensor_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, f) for f in files]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


@contextlib.contextmanager
def safe_open(path: str):
    """`safetensors.safe_open` whose failures (a truncated, random or missing file) are one
    ValueError / FileNotFoundError naming the file, not a SafetensorError traceback."""
    from safetensors import SafetensorError
    from safetensors import safe_open as _open

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such safetensors file")
    try:
        with _open(path, framework="flax") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    out = {}
    with safe_open(path) as f:
        for k in f.keys():
            out[k] = np.asarray(f.get_tensor(k))
    return out


class _LazyTensors:
    """A safetensors checkpoint whose `items()` reads each tensor only when it is reached. The
    file is mapped again for each tensor: pages of a mapping held open stay resident."""

    def __init__(self, files: list[str]):
        self.names = []
        for path in files:
            with safe_open(path) as f:
                self.names += [(k, path) for k in f.keys()]

    def items(self):
        for name, path in self.names:
            with safe_open(path) as f:
                yield name, np.asarray(f.get_tensor(name))


def params_from_hf_tensors(
    tensors: dict[str, np.ndarray], cfg: ModelConfig, source: str = "", put=None
):
    """Maps HF-named arrays onto the tree, checking names and shapes against the model; an NF4
    `cfg` gets its decoder linear kernels quantized one tensor at a time. `put(path, leaf)`, if
    given, turns each leaf into what the tree keeps as soon as it is read (a device array: the
    host copy of one tensor at a time, not of the whole model, is alive at once)."""
    dense = abstract_params(cfg.dense)
    expected = {p: v for p, v in traverse_util.flatten_dict(nn.unbox(dense)).items()}
    nf4 = cfg.quantization == "nf4"
    flat, seen, unexpected, bad_shape = {}, set(), [], []
    for name, arr in tensors.items():
        hit = hf_to_path(name)
        if hit is None or hit[0] not in expected:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some tied checkpoints store a copy of the embedding
            if not any(re.match(p, name) for p in IGNORED_HF):
                unexpected.append(name)
            continue
        path, tr = hit
        arr = arr.T if tr else arr
        if arr.shape != expected[path].shape:
            bad_shape.append(f"{name}: {arr.shape} vs expected {expected[path].shape}")
            continue
        leaf = np.asarray(arr, dtype=expected[path].dtype)
        leaves = quant.quantize_leaf(path, leaf, cfg.double_quant) if nf4 else {path: leaf}
        flat.update({p: put(p, v) for p, v in leaves.items()} if put else leaves)
        seen.add(path)
    missing = [path_to_hf(p)[0] for p in expected if p not in seen]
    where = f" in {source}" if source else ""
    problems = []
    if missing:
        problems.append(
            f"missing tensors{where}: {sorted(missing)[:8]}" + ("…" * (len(missing) > 8))
        )
    if unexpected:
        problems.append(f"unexpected tensors{where}: {sorted(unexpected)[:8]}")
    if bad_shape:
        problems.append(f"shape mismatch{where}: {bad_shape[:4]}")
    if problems:
        raise ValueError("; ".join(problems))
    return traverse_util.unflatten_dict(flat)


def load_hf_model(model_dir: str, shardings=None, **runtime):
    """Loads (config, params) from a HF directory or a .gguf file; params are device arrays."""
    if not os.path.exists(model_dir):
        raise FileNotFoundError(f"model path does not exist: {model_dir}")
    if model_dir.endswith(".gguf"):
        from lorarl_jax.model.config import from_hf_dict
        from lorarl_jax.model.gguf import load_gguf

        hf_config, tensors = load_gguf(model_dir)
        cfg = from_hf_dict(hf_config, **runtime)
    else:
        cfg = load_config(model_dir, **runtime)
        tensors = _LazyTensors(_safetensor_files(model_dir))
    if shardings is None:
        put = lambda _, x: jax.numpy.asarray(x)  # noqa: E731
    else:
        flat_sh = traverse_util.flatten_dict(shardings)
        put = lambda p, x: jax.device_put(x, flat_sh[p])  # noqa: E731
    return cfg, params_from_hf_tensors(tensors, cfg, model_dir, put)


def save_hf_model(params, out_dir: str, src_dir: str | None = None, hf_config: dict | None = None):
    """Writes (merged) params as a HF safetensors directory with config and tokenizer files."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    flat = traverse_util.flatten_dict(nn.unbox(params))
    tensors = {}
    for path, v in flat.items():
        name, tr = path_to_hf(path)
        arr = np.asarray(jax.device_get(v), dtype=np.float32)
        tensors[name] = np.ascontiguousarray(arr.T if tr else arr)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if src_dir and os.path.isdir(src_dir):
        for f in os.listdir(src_dir):
            if f.endswith((".json", ".jinja", ".model", ".txt")) and not f.startswith("model."):
                if f != "adapter_config.json":
                    shutil.copy(os.path.join(src_dir, f), os.path.join(out_dir, f))
    if hf_config is not None:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)


# ---------------------------------------------------------------- PEFT adapters


def save_peft_adapter(lora_params, lcfg: LoraConfig, out_dir: str, base_model: str = ""):
    """Writes adapter_model.safetensors + adapter_config.json in PEFT's LoRA format."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for path, v in traverse_util.flatten_dict(lora_params).items():
        module = path_to_hf(path[:-1] + ("kernel",))[0][: -len(".weight")]
        which = "lora_A" if path[-1] == "lora_a" else "lora_B"
        arr = np.asarray(jax.device_get(v), dtype=np.float32).T  # [r, in] / [out, r]
        tensors[f"{PEFT_PREFIX}{module}.{which}.weight"] = np.ascontiguousarray(arr)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), {"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lcfg.r,
        "lora_alpha": lcfg.lora_alpha,
        "lora_dropout": lcfg.lora_dropout,
        "target_modules": sorted(lcfg.target_modules),
        "use_rslora": lcfg.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load_peft_adapter(adapter_dir: str, dtype=np.float32):
    """Reads a PEFT LoRA adapter directory → (lora tree, LoraConfig)."""
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"adapter_config.json not found in {adapter_dir}")
    with open(cfg_path) as f:
        c = json.load(f)
    if c.get("peft_type", "LORA") != "LORA" or c.get("use_dora"):
        raise ValueError(f"{cfg_path}: only plain LoRA adapters are supported (use_dora is not)")
    # Options that would change the math silently if ignored. (`layers_to_transform` needs no
    # support: only the layers present in the file get an adapter.)
    unsupported = [k for k in ("rank_pattern", "alpha_pattern") if c.get(k)]
    unsupported += ["bias"] if c.get("bias", "none") != "none" else []
    if unsupported:
        raise ValueError(f"{cfg_path}: unsupported LoRA options {unsupported}")
    r = int(c["r"])
    tensors = read_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"))
    pat = re.compile(r"^(?:base_model\.model\.)?(.*)\.(lora_A|lora_B)(?:\.[\w-]+)?\.weight$")
    flat = {}
    for name, arr in tensors.items():
        m = pat.match(name)
        hit = hf_to_path(m.group(1) + ".weight") if m else None
        if hit is None:
            raise ValueError(f"{adapter_dir}: unexpected adapter tensor {name}")
        which = m.group(2)
        if arr.shape[0 if which == "lora_A" else 1] != r:
            raise ValueError(f"{adapter_dir}: {name} has shape {arr.shape}, but r = {r}")
        leaf = "lora_a" if which == "lora_A" else "lora_b"
        flat[hit[0][:-1] + (leaf,)] = np.asarray(arr, dtype=dtype).T
    if not flat:
        raise ValueError(f"{adapter_dir}: no LoRA tensors in adapter_model.safetensors")
    # PEFT may store target_modules as names, full module paths (its "all-linear" expansion) or a
    # regex; the tensors say which layers are adapted, so the names come from them.
    lcfg = LoraConfig(
        r=r,
        lora_alpha=float(c["lora_alpha"]),
        target_modules=tuple(sorted({p[-2] for p in flat})),
        lora_dropout=float(c.get("lora_dropout", 0.0)),
        use_rslora=bool(c.get("use_rslora", False)),
    )
    return traverse_util.unflatten_dict(flat), lcfg
