"""One whole GRPO + LoRA step (rollout → rewards → log-probs → one update): ours vs TRL + PEFT, CPU.

    flock /tmp/bench.lock env HF_HUB_OFFLINE=1 python scripts/bench_step.py [--model-dir DIR]

Same model, prompts and batch on both sides: `--prompts` synthetic arithmetic prompts (the
default task when `data.train_files` is empty, in order, no shuffle) × `--generations` samples ×
at most `--max-new-tokens` tokens, LoRA r=16 α=32 on all 7 projections, KL coefficient 0.04 with
the k3 estimator (TRL's; verl's `low_var_kl` is k3 clipped to ±10), temperature 1.0, fp32, one
AdamW update per step (constant lr, grad-norm clip 1.0), token-mean loss (TRL's `dapo`).
Both sides stop at EOS; `--force-length` makes every completion `--max-new-tokens` long instead
(ours: no stop id; TRL: `min_new_tokens`, which masks EOS), so both do exactly the same work.

Each side runs in its own subprocess so its peak RSS (VmHWM) is its own. Each runs `--warmup`
untimed steps (our first one compiles), then `--steps` timed ones; the table reports the median.
Ours also reports the XLA compile seconds caught by `jax.monitoring` (first step, plus any shape
recompile in a timed step, which is subtracted from that step and listed). TRL uses
`--threads` torch threads and its default gradient checkpointing unless `--no-trl-gc`.
Ours runs twice: the default config, and a lower-memory one: `--memory-config half-group`
(default; `algo.micro_batch_size` = half a group, each prompt run once per sub-group) or
`scan-remat` (`model.scan_layers` + `gradient_checkpointing`, as TRL checkpoints by default);
`--no-memory-config` skips the second.
`--weight-dtype bfloat16`: ours decodes on bf16-rounded merged weights (`rollout.weight_dtype`).
Ours also prints per phase (rollout, reference log-probs, update) the GFLOP it ran, the GFLOP/s
it reached and the matmul rate of its shapes measured in the same process (`phase_rates`).
Measured (Intel Xeon, 2 cores, trl 1.16.0, same run, clean clone at 312dc3c): ours 30.1 s/step
(rollout 9.2, reference log-probs 5.3, update 15.2), 3.39 GiB; low-memory config 39.1 s,
2.82 GiB; TRL 60.0 s, 8.28 GiB: 1.99x (1.54x low-memory). Per phase: rollout 620 GFLOP at 68
GFLOP/s, reference 619 at 116 (83 % of the matmul rate), update 1436 at 95 (61 %). Why not 3x:
the rollout is at its probe's rate; the other two at 100 % would make the step 23.0 s, 2.6x TRL.
AMD EPYC (Zen 4, 2 cores, 2026-12-03, 59071e8): ours 31.3 s/step, 3.11 GiB; low-memory 44.5 s,
2.39 GiB; TRL 174.4 s, 8.16 GiB: 5.58x (3.92x low-memory); per phase 87 / 65 / 60 % of the rate.
AMD EPYC again (2026-12-04, clean clone of 75e5b65, quiet): ours 21.4 s/step, 3.04 GiB; low-memory
28.9 s, 2.30 GiB; TRL 67.3 s, 7.86 GiB: 3.15x (2.33x low-memory); per phase 85 / 81 / 72 %.
AMD EPYC (2026-12-04, bc9a2c5): ours 25.39 s/step, 3.04 GiB; micro-batch of half a group 25.69 s,
2.41 GiB; TRL 74.63 s: 2.94x / 2.90x. With --weight-dtype bfloat16 (the demo's rollout setting),
next run: 22.35 s, 3.04 GiB; half a group 21.88 s, 2.42 GiB; TRL 74.54 s, 8.13 GiB: 3.34x / 3.41x.
Under load from other processes TRL slows far more than ours, so check the printed load averages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common

# our second, lower-memory run (`--memory-config`): its row's label and extra arguments
MEMORY_CONFIGS = {
    "half-group": (
        "micro-batch of half a group",
        lambda a: ["--micro-batch-size", str(max(1, a.generations // 2))],
    ),
    "scan-remat": ("scan + grad ckpt", lambda a: ["--scan-layers", "--remat"]),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def peak_rss_gib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2**20


def our_config(args, total_steps: int, out_dir: str) -> dict:
    return {
        "model": {
            "path": args.model_dir,
            "dtype": "float32",
            "param_dtype": "float32",
            "scan_layers": args.scan_layers,
            "gradient_checkpointing": args.remat,
        },
        "lora": {"r": args.rank, "lora_alpha": float(args.alpha), "target_modules": TARGETS},
        "rollout": {
            "num_generations": args.generations,
            "temperature": 1.0,
            "max_prompt_length": 256,
            "max_new_tokens": args.max_new_tokens,
            "response_bucket": 0,  # train on all max_new_tokens columns: one shape, one compile
            "weight_dtype": args.weight_dtype,
        },
        "algo": {
            "adv_estimator": "grpo",
            "use_kl_loss": True,
            "kl_loss_coef": args.beta,
            "kl_loss_type": "low_var_kl",
            "loss_agg_mode": "token-mean",
            "micro_batch_size": args.micro_batch_size,
            "logprob_chunk": args.logprob_chunk,
        },
        "optim": {"lr": args.lr, "schedule": "constant", "weight_decay": 0.0, "grad_clip": 1.0},
        "data": {
            "batch_size": args.prompts,
            "max_val_samples": 0,
            "shuffle": False,
            "arith_n_train": args.prompts * total_steps,
            "arith_n_val": 8,
        },
        "trainer": {
            "steps": total_steps,
            "seed": args.seed,
            "output_dir": out_dir,
            "eval_before": False,
            "ckpt_interval": 0,
            "export_adapter": False,
            "tensorboard": False,
        },
    }


def bench_ours(args) -> dict:
    from lorarl_jax import process

    process.configure()  # what `lorarl_jax.main` does first: one malloc arena, no torch
    import jax

    from lorarl_jax.config import from_config_dict
    from lorarl_jax.rl.setup import build
    from lorarl_jax.rl.trainer import rollout_step, update

    compile_s = [0.0]
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **_: (
            compile_s.__setitem__(0, compile_s[0] + secs) if event in _COMPILE_EVENTS else None
        )
    )
    total = args.warmup + args.steps
    t0 = time.perf_counter()
    run = build(from_config_dict(our_config(args, total, tempfile.mkdtemp(prefix="bench_ours_"))))
    build_s = time.perf_counter() - t0
    if args.force_length:  # no token id is -1: every completion runs to max_new_tokens
        spec = dataclasses.replace(run.static.rollout, stop_ids=(-1,))
        run.static = dataclasses.replace(run.static, rollout=spec)
    steps = []
    for step in range(1, total + 1):
        c0, t0 = compile_s[0], time.perf_counter()
        state, tb, m = rollout_step(run, run.state, next(run.data_iter), step)
        state, um = update(run, state, tb, step)
        run.state = state.replace(step=step)
        m.update(um)
        wall = time.perf_counter() - t0
        m.update({"wall": wall, "compile": compile_s[0] - c0})
        steps.append(m)
        shapes = (tb["prompt_tokens"].shape[1], tb["responses"].shape[1])
        print(f"[ours] step {step}: {wall:.2f} s (compile {m['compile']:.2f} s)", flush=True)
    run.logger.close()
    timed = steps[args.warmup :]
    keys = ("time/merge", "time/rollout", "time/reward", "time/logprobs", "time/update")
    breakdown = {k: statistics.median(m[k] for m in timed) for k in keys}
    decoded = statistics.median(m["response/length_max"] for m in timed)
    rates = phase_rates(args, run.static.model_cfg, shapes, decoded, breakdown)
    return {
        "step_s": [m["wall"] - m["compile"] for m in timed],
        "raw_step_s": [m["wall"] for m in timed],
        "recompile_s": [m["compile"] for m in timed],
        "first_step_s": steps[0]["wall"],
        "compile_s": sum(m["compile"] for m in steps),
        "build_s": build_s,
        "length": statistics.mean(m["response/length_mean"] for m in timed),
        "reward": statistics.mean(m["reward/mean"] for m in timed),
        "breakdown": breakdown,
        "phase_rates": rates,
        "peak_rss_gib": peak_rss_gib(),
    }


def phase_rates(args, cfg, shapes, decoded: float, breakdown: dict) -> list[tuple]:
    """(phase, GFLOP, seconds, GFLOP/s, matmul GFLOP/s at the phase's row count) for the rollout,
    reference log-probs and update, from the shapes the programs ran (padded prompt P, response
    columns N, `decoded` steps of the longest row) and a matmul rate measured in this process.
    Counted: linear maps, LM head and attention products (2 FLOPs per multiply-add).
    - rollout: prefill of the b prompts (P each), then `decoded` steps of all B rows over a
      context of P + t (merged weights: no LoRA branch).
    - reference log-probs: the prompt once per group plus B × N response positions through the
      base (`shared_prompt_logprobs`), the head on the B × N.
    - update: the prompt once per group plus B × N response positions, forward + backward. The
      base is frozen, so its backward is dX only (= the forward's FLOPs); the LoRA branches pay
      forward, dX, dA and dB (3×); the chunked head is recomputed in the backward (3×); the
      attention products 3×; `gradient_checkpointing` adds one more decoder forward."""
    from bench_common import (
        attention_flops,
        decode_step_flops,
        head_flops,
        linear_flops,
        lora_flops,
        matmul_rate,
        prefill_flops,
    )

    P, N = shapes
    B, b = args.prompts * args.generations, args.prompts
    head = head_flops(cfg)
    att = b * P * attention_flops(cfg, P / 2) + B * N * attention_flops(cfg, P + N / 2)
    lin = (b * P + B * N) * linear_flops(cfg)  # the prompt once per group, then the responses
    lora = (b * P + B * N) * lora_flops(cfg, args.rank)
    rollout = prefill_flops(cfg, b, P) + decoded * decode_step_flops(cfg, B, P + decoded / 2)
    ref = lin + att + B * N * head
    upd = 2 * lin + 3 * att + 3 * lora + 3 * B * N * head
    if args.remat:
        upd += lin + att + lora
    train_rate = matmul_rate(cfg, B * N)  # the reference and the update run the same rows
    rollout_rate = matmul_rate(cfg, B, dtype=args.weight_dtype or "float32")  # its weights' dtype
    rows = (
        ("rollout (prefill + decode)", rollout, breakdown["time/rollout"], rollout_rate),
        ("reference log-probs", ref, breakdown["time/logprobs"], train_rate),
        ("update (fwd + bwd)", upd, breakdown["time/update"], train_rate),
    )
    return [(name, f / 1e9, s, f / s / 1e9, peak) for name, f, s, peak in rows]


def _trl_config(args, total: int):
    from trl import GRPOConfig

    rows = args.prompts * args.generations
    return GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=args.trl_gc,
        per_device_train_batch_size=rows,
        generation_batch_size=rows,
        gradient_accumulation_steps=1,
        num_generations=args.generations,
        max_completion_length=args.max_new_tokens,
        generation_kwargs={"min_new_tokens": args.max_new_tokens} if args.force_length else None,
        temperature=1.0,
        beta=args.beta,
        loss_type="dapo",  # token-mean over the batch, as ours
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=total,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        shuffle_dataset=False,
        seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def bench_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from lorarl_jax.datasets import arith_rows
    from lorarl_jax.rl.reward_fns import gsm8k_score

    torch.set_num_threads(args.threads)
    total = args.warmup + args.steps
    rows = arith_rows(args.prompts * total, args.seed, ("+", "-"))  # our default task, same order
    ds = Dataset.from_list(
        [{"prompt": r["prompt"], "ground_truth": r["reward_model"]["ground_truth"]} for r in rows]
    )

    def arith_reward(prompts, completions, ground_truth, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [
            gsm8k_score(t, g, method="strict") for t, g in zip(texts, ground_truth, strict=True)
        ]

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)
            print(f"[trl] step {len(times)}: {times[-1]:.2f} s", flush=True)

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=list(TARGETS),
        task_type="CAUSAL_LM",
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=arith_reward,
        args=_trl_config(args, total),
        train_dataset=ds,
        processing_class=AutoTokenizer.from_pretrained(args.model_dir),
        peft_config=lora,
        callbacks=[StepTimer()],
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h][args.warmup :]
    return {
        "step_s": times[args.warmup :],
        "first_step_s": times[0],
        "length": statistics.mean(h["completions/mean_length"] for h in logs),
        "reward": statistics.mean(h["reward"] for h in logs),
        "peak_rss_gib": peak_rss_gib(),
    }


def run_side(side: str, argv: list[str]) -> dict:
    """Runs one side in a fresh interpreter (its own peak RSS) and returns its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, *argv, "--side", side, "--json-out", out]
    subprocess.run(cmd, check=True)
    with open(out) as f:
        r = json.load(f)
    # each side's result as soon as it is in, should a later side fail
    print(f"[{side}] {' '.join(argv)}: median {statistics.median(r['step_s']):.2f} s/step, "
          f"peak RSS {r['peak_rss_gib']:.2f} GiB, {out}", flush=True)  # fmt: skip
    return r


def print_table(args, ours: dict, trl: dict, mem: dict | None = None) -> None:
    """`mem`: ours in the lower-memory config (`--memory-config`), or None."""
    o, t = statistics.median(ours["step_s"]), statistics.median(trl["step_s"])
    mode = "forced to" if args.force_length else "stop at EOS, max"
    from bench_common import cpu_model

    print(f"\nCPU: {cpu_model()}, {os.cpu_count()} cores")
    print(
        f"GRPO+LoRA step, {args.prompts} prompts × {args.generations} generations, {mode} "
        f"{args.max_new_tokens} new tokens, r={args.rank} α={args.alpha}, 7 projections, fp32, CPU"
    )
    hdr = f"{'side':<42}{'median s/step':>14}{'peak RSS GiB':>14}{'mean len':>10}{'reward':>8}"
    print(hdr + "\n" + "-" * len(hdr))
    gc = "grad ckpt" if args.trl_gc else "no grad ckpt"
    rows = [("lorarl_jax (jit)", ours), (f"TRL GRPOTrainer+PEFT ({gc})", trl)]
    if mem is not None:
        rows.insert(1, (f"lorarl_jax ({MEMORY_CONFIGS[args.memory_config][0]})", mem))
    for name, r in rows:
        row = f"{name:<42}{statistics.median(r['step_s']):>14.2f}{r['peak_rss_gib']:>14.2f}"
        print(row + f"{r['length']:>10.1f}{r['reward']:>8.3f}")
    print(f"speed-up TRL / ours: {t / o:.2f}x   RSS ours / TRL: "
          f"{ours['peak_rss_gib'] / trl['peak_rss_gib']:.2f}")  # fmt: skip
    if mem is not None:
        m, label = statistics.median(mem["step_s"]), MEMORY_CONFIGS[args.memory_config][0]
        print(f"{label}: speed-up TRL / ours {t / m:.2f}x, RSS ours / TRL "
              f"{mem['peak_rss_gib'] / trl['peak_rss_gib']:.2f}, compile {mem['compile_s']:.1f} s, "
              "per phase " + ", ".join(f"{k.split('/')[1]} {v:.2f}"
                                       for k, v in mem["breakdown"].items()))  # fmt: skip
    print(
        f"ours: compile {ours['compile_s']:.1f} s (first step {ours['first_step_s']:.1f} s, "
        f"build {ours['build_s']:.1f} s); timed steps {[round(s, 2) for s in ours['step_s']]}, "
        f"recompile in timed steps {[round(s, 2) for s in ours['recompile_s']]}"
    )
    print("ours per phase (median s): " + ", ".join(
        f"{k.split('/')[1]} {v:.2f}" for k, v in ours["breakdown"].items()
    ))  # fmt: skip
    print(f"\nours per phase{'':<14}GFLOP   seconds   GFLOP/s   matmul GFLOP/s   share")
    for name, gflop, sec, rate, peak in ours["phase_rates"]:
        print(f"{name:<28}{gflop:>6.0f}{sec:>10.2f}{rate:>10.1f}{peak:>17.1f}{rate / peak:>8.0%}")
    print(
        f"TRL: first step {trl['first_step_s']:.1f} s; timed {[round(s, 2) for s in trl['step_s']]}"
    )
    print(f"1-min load average at start/end: ours {ours.get('loadavg')}, TRL {trl.get('loadavg')}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model-dir",
        default=None,
        help="HF checkpoint directory; default: SmolLM2 as the trainer converts it (converted now "
        "if missing)",
    )
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (k3)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side")
    p.add_argument("--steps", type=int, default=2, help="timed steps per side")
    p.add_argument(
        "--micro-batch-size", type=int, default=8, help="ours: rows per grad micro-batch"
    )
    p.add_argument(
        "--logprob-chunk", type=int, default=16, help="ours: LM-head positions per chunk"
    )
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (TRL side)")
    p.add_argument("--force-length", action="store_true", help="every completion max length")
    p.add_argument("--no-trl-gc", dest="trl_gc", action="store_false",
                   help="turn off TRL's default gradient checkpointing")  # fmt: skip
    p.add_argument("--scan-layers", action="store_true", help="ours: model.scan_layers")
    p.add_argument("--remat", action="store_true", help="ours: model.gradient_checkpointing")
    p.add_argument("--weight-dtype", default="", help="ours: rollout.weight_dtype (bfloat16)")
    p.add_argument("--memory-config", choices=tuple(MEMORY_CONFIGS), default="half-group",
                   help="our second run: micro-batches of half a group, or scan_layers + grad "
                   "ckpt")  # fmt: skip
    p.add_argument("--no-memory-config", dest="memory_config", action="store_const", const=None,
                   help="skip our second run")  # fmt: skip
    p.add_argument("--side", choices=("both", "ours", "trl"), default="both")
    p.add_argument("--json-out", default="", help="(internal) where a single side writes results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.model_dir is None:  # the shipped SmolLM2, converted once as `model.path=smollm2` does
        from lorarl_jax.model.convert import ensure_shipped

        args.model_dir = str(ensure_shipped("smollm2"))
        argv = [*argv, "--model-dir", args.model_dir]
    if args.side != "both":
        load0 = os.getloadavg()[0]
        result = (bench_ours if args.side == "ours" else bench_trl)(args)
        result["loadavg"] = [load0, os.getloadavg()[0]]  # > 2 on 2 cores: others were busy
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(result, f)
        return result
    ours = run_side("ours", argv)  # a later --side wins
    mem = None
    if args.memory_config:
        mem = run_side("ours", argv + MEMORY_CONFIGS[args.memory_config][1](args))
    trl = run_side("trl", argv)
    print_table(args, ours, trl, mem)
    return {"ours": ours, "ours_memory_config": mem, "trl": trl}


if __name__ == "__main__":
    main()
