"""Memory estimator CLI: the seed's breakdown of one RL step, full / LoRA / QLoRA side by side.

    python -m lorarl_jax.estimate --model qwen2.5-7b --lora.r 16 --batch 4 --num_generations 8 \
        --seq 256 --max_new_tokens 512 --micro_batch 8 --remat --dtype bfloat16 --mesh 1,1,1

`--model` is a HF checkpoint directory, a config.json or a preset (`PRESETS`: HF config fields,
no download). The numbers come from `model.estimate` (pure functions, see its design note); this
module only builds the inputs and prints a table in GiB per device (or `--json` bytes).
`python -m lorarl_jax.estimate` runs `main` (`__main__.py`).
Validated against XLA's memory analysis and peak RSS of real steps: `scripts/bench_memory.py`.
"""

from __future__ import annotations

import argparse
import json
import os

from lorarl_jax.estimate.model import (
    MODES,
    Breakdown,
    Options,
    Precision,
    Workload,
    estimate,
)
from lorarl_jax.model.config import ModelConfig, from_hf_dict, load_config
from lorarl_jax.model.lora import LoraConfig

GiB = 2.0**30
PROG = "python -m lorarl_jax.estimate"
_LLAMA = {"model_type": "llama", "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
PRESETS: dict[str, dict] = {
    "smollm2-135m": _LLAMA | {
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "rope_theta": 100000.0, "tie_word_embeddings": True,
    },
    "gemma3-270m": {
        "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640,
        "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
        "sliding_window": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
    "llama-2-7b": _LLAMA | {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    },
    "llama-3-8b": _LLAMA | {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "rope_theta": 500000.0,
    },
}  # fmt: skip


def model_config(model: str, prec: Precision, remat: bool = False) -> ModelConfig:
    """A preset name, a HF checkpoint directory or a config.json → ModelConfig."""
    runtime = dict(dtype=prec.dtype, param_dtype=prec.param_dtype, remat=remat)
    if model in PRESETS:
        return from_hf_dict(dict(PRESETS[model]), **runtime)
    if os.path.exists(model):
        return load_config(model, **runtime)
    raise ValueError(f"--model {model!r}: not a directory, config.json or preset {list(PRESETS)}")


# ---------------------------------------------------------------------------------- CLI

ROWS = (
    ("model weights", "weights"),
    ("adapter weights (trainable)", "adapter"),
    ("gradients", "gradients"),
    ("AdamW state (m, v)", "optimizer"),
    ("reference model", "reference"),
    ("critic (PPO: weights+grads+AdamW)", "critic"),
    ("rollout: merged weights copy", "merged"),
    ("rollout: merge's fp32 A·B products", "merge_work"),
    ("rollout: KV cache", "kv_cache"),
    ("rollout: logits + prefill", "rollout_work"),
    ("log-prob pass (ref / old policy)", "logprob_work"),
    ("scan_layers: stacked layer weights", "stacked"),
    ("activations, no remat", "activations_no_remat"),
    ("activations, remat", "activations_remat"),
    ("optimizer-update workspace", "update"),
)
TOTALS = (
    ("resident (weights..critic)", "resident"),
    ("rollout phase", "rollout_phase"),
    ("train phase", "train_phase"),
    ("train step program", "train_program"),
    ("PEAK per device", "peak"),
)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_table(cfg: ModelConfig, lcfg, wl: Workload, prec: Precision, opts: Options, est) -> str:
    data, fsdp, tensor = opts.mesh
    head = [
        f"{cfg.model_type}: {_count(est['full'].params)} parameters, {cfg.num_layers} layers, "
        f"hidden {cfg.hidden_size}, vocab {cfg.vocab_size}; LoRA r={lcfg.r} on "
        f"{','.join(lcfg.target_modules)}",
        f"{wl.batch} prompts x {wl.num_generations} generations, prompt {wl.seq} + "
        f"{wl.max_new_tokens} new tokens, micro-batch {wl.micro} sequences, "
        f"remat {'on' if wl.remat else 'off'}, scan {'on' if wl.scan_layers else 'off'}, "
        f"rollout merge {opts.merge}, "
        f"critic {'on' if opts.critic else 'off'}",
        f"weights {prec.param_dtype}, compute {prec.dtype}, adapter {prec.adapter_dtype}, AdamW "
        f"moments {prec.opt_dtype}, NF4 double quant {'on' if prec.double_quant else 'off'}"
        + (f", rollout weights {prec.rollout_weight_dtype}" if prec.rollout_weight_dtype else ""),
        f"mesh data={data} fsdp={fsdp} tensor={tensor}: GiB per device",
        "",
    ]
    cols = [est[m] for m in MODES]
    w = 36
    lines = [f"{'':<{w}}" + "".join(f"{n:>11}" for n in ("full", "LoRA", "QLoRA"))]
    lines.append(
        f"{'trainable parameters':<{w}}" + "".join(f"{_count(b.trainable):>11}" for b in cols)
    )
    for label, key in ROWS:
        lines.append(f"{label:<{w}}" + "".join(f"{getattr(b, key) / GiB:>11.3f}" for b in cols))
    lines.append("-" * (w + 33))
    for label, key in TOTALS:
        lines.append(f"{label:<{w}}" + "".join(f"{getattr(b, key) / GiB:>11.3f}" for b in cols))
    fits = lambda b: "/".join("yes" if b.peak <= g * GiB else "no" for g in (24, 80))  # noqa: E731
    lines.append(f"{'fits a 24 / 80 GiB device':<{w}}" + "".join(f"{fits(b):>11}" for b in cols))
    notes = [
        "",
        "peak = resident + max(rollout phase, log-prob pass, train phase); train phase = max(",
        "activations + gradients alive at the backward start, gradients + update workspace).",
        "LoRA/QLoRA reference = the base without the adapter (free); full FT keeps a copy.",
    ]
    if wl.micro < wl.rows:
        notes.append("micro-batches: the summed gradient is carried through each backward pass.")
    return "\n".join(head + lines + notes)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help=f"HF dir, config.json or one of {list(PRESETS)}")
    p.add_argument("--lora.r", dest="r", type=int, default=16)
    p.add_argument("--lora.target_modules", dest="target_modules", nargs="+",
                   default=["all-linear"], help="names, space- or comma-separated")  # fmt: skip
    p.add_argument("--batch", type=int, default=4, help="prompts per RL step")
    p.add_argument("--seq", type=int, default=256, help="padded prompt length")
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--micro_batch", type=int, default=0, help="sequences per micro-batch")
    p.add_argument("--logprob_chunk", type=int, default=64)
    p.add_argument("--remat", action="store_true", help="gradient checkpointing per block")
    p.add_argument("--scan_layers", action="store_true", help="model.scan_layers")
    p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--param_dtype", default="", help="weights dtype (default: --dtype)")
    p.add_argument("--adapter_dtype", default="float32")
    p.add_argument("--opt_dtype", default="float32", help="AdamW moments dtype")
    p.add_argument("--double_quant", action="store_true", help="QLoRA: 8-bit absmax scales")
    p.add_argument("--rollout_weight_dtype", default="", choices=("", "bfloat16"),
                   help="rollout.weight_dtype: the merged copy's matrices in it")  # fmt: skip
    p.add_argument("--merge", choices=("auto", "always", "never"), default="auto",
                   help="rollout weights: auto = LoRA merged, QLoRA unmerged")  # fmt: skip
    p.add_argument("--critic", action="store_true", help="PPO: add a full-parameter critic")
    p.add_argument("--json", action="store_true", help="print bytes as JSON instead")
    return p.parse_args(argv)


def from_args(args: argparse.Namespace):
    """(cfg, lcfg, workload, precision, options) from parsed arguments."""
    mesh = tuple(int(x) for x in args.mesh.split(","))
    if len(mesh) != 3 or min(mesh) < 1:
        raise ValueError(f"--mesh {args.mesh!r}: expected data,fsdp,tensor (positive integers)")
    prec = Precision(
        param_dtype=args.param_dtype or args.dtype,
        dtype=args.dtype,
        adapter_dtype=args.adapter_dtype,
        opt_dtype=args.opt_dtype,
        double_quant=args.double_quant,
        rollout_weight_dtype=args.rollout_weight_dtype,
    )
    targets = tuple(t for arg in args.target_modules for t in arg.split(",") if t)
    lcfg = LoraConfig(r=args.r, lora_alpha=2.0 * args.r, target_modules=targets)
    wl = Workload(
        batch=args.batch,
        num_generations=args.num_generations,
        seq=args.seq,
        max_new_tokens=args.max_new_tokens,
        micro_batch=args.micro_batch,
        logprob_chunk=args.logprob_chunk,
        remat=args.remat,
        scan_layers=args.scan_layers,
    )
    opts = Options(mesh=mesh, merge=args.merge, critic=args.critic)
    return model_config(args.model, prec, args.remat), lcfg, wl, prec, opts


def main(argv=None) -> dict[str, Breakdown]:
    args = parse_args(argv)
    cfg, lcfg, wl, prec, opts = from_args(args)
    est = estimate(cfg, lcfg, wl, prec, opts)
    if args.json:
        print(json.dumps({m: b.as_dict() for m, b in est.items()}, indent=1))
    else:
        print(format_table(cfg, lcfg, wl, prec, opts, est))
    return est
