"""Sampler-vs-trainer log-prob gap of correct and broken weight syncs: the data behind the
defaults of `rollout.max_logp_gap` (config.LOGP_GAP_DEFAULTS) and `rollout.merge=auto`.

    python scripts/measure_logp_gap.py [--model smollm2] [--steps 4] [--dtypes float32,bfloat16]

`--dtypes bf16w`: a float32 run with `rollout.weight_dtype=bfloat16` (the fp32 merge rounded to
bf16 for decode, fp32 activations).

For each dtype (compute and parameter dtype alike) it trains the demo task (GRPO + LoRA r=16 on
all seven projections, lr 5e-4, a small batch) in this process with the rollout weights
  ok:     the trained adapter (the real run; merged in float32, unmerged in bf16: merge=auto)
  merged: float32 math, cast back to the kernel dtype (rollout.merge=always; bf16 only)
  stale:  the adapter of the previous step (a sync one step late)
  base:   the base without the adapter (a sync that never happens: verl #7495, OpenRLHF #660)
and prints `rollout/logp_gap_mean` per step. The gate is off during the measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from lorarl_jax.config import from_config_dict
from lorarl_jax.rl import setup, trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_model  # noqa: E402,F401  (bench_bf16_rollout imports it here)


class BrokenSync:
    """Rollout weights from the previous step's adapter (`stale`) or from no adapter (`base`)."""

    def __init__(self, merge, kind: str):
        self.merge, self.kind, self.prev = merge, kind, None

    def __call__(self, base, lora):
        if self.kind == "base":
            return self.merge(base, jax.tree.map(jnp.zeros_like, lora))
        w = self.merge(base, lora if self.prev is None else self.prev)
        self.prev = jax.tree.map(jnp.copy, lora)  # before the step donates it
        return w


def config(args, dtype: str, sync: str, out: str):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
    spec = importlib.util.spec_from_file_location("demo_config", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    c = demo.get_config()
    c.model.path = args.model
    if dtype == "bf16w":  # a float32 run whose rollouts decode bf16-rounded merged weights
        c.model.update(dtype="float32", param_dtype="float32")
        c.rollout.weight_dtype = "bfloat16"
    else:
        c.model.update(dtype=dtype, param_dtype=dtype)
    c.rollout.update(num_generations=4, max_new_tokens=32, logp_gap_action="off")
    c.rollout.merge = "always" if sync == "merged" else "auto"
    c.data.update(batch_size=2, max_val_samples=0)
    c.trainer.update(
        steps=args.steps, output_dir=out, ckpt_interval=0, eval_interval=0, tensorboard=False
    )
    c.trainer.export_adapter = False
    return from_config_dict(c)


def measure(args, dtype: str, sync: str) -> list[float]:
    import json
    import os
    import tempfile

    out = tempfile.mkdtemp(prefix=f"gap_{dtype}_{sync}_")
    run = setup.build(config(args, dtype, sync, out))
    if sync in ("stale", "base"):
        run.programs = dataclasses.replace(run.programs, merge=BrokenSync(run.programs.merge, sync))
    trainer.train_run(run)
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return [x["rollout/logp_gap_mean"] for x in lines if "rollout/logp_gap_mean" in x]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args()
    rows = []
    for dtype in args.dtypes.split(","):
        syncs = ["ok", "stale", "base"] + (["merged"] if dtype == "bfloat16" else [])
        for sync in syncs:
            gaps = measure(args, dtype, sync)
            rows.append((dtype, sync, gaps))
            print(dtype, sync, " ".join(f"{g:.3g}" for g in gaps), flush=True)
    print(f"\nCPU: {cpu_model()}; model {args.model}; jax {jax.__version__}")
    print("| dtype | rollout weights | gap per step (1 … n) | max over steps 2 … n |")
    print("|---|---|---|---|")
    for dtype, sync, gaps in rows:
        tail = max(gaps[1:]) if len(gaps) > 1 else float("nan")
        print(f"| {dtype} | {sync} | {' '.join(f'{g:.2g}' for g in gaps)} | {tail:.2g} |")


if __name__ == "__main__":
    main()
