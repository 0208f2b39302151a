"""The seed's experiment on the demo task: LoRA ranks vs full-parameter RL, accuracy and cost.

    python scripts/compare_lora_full.py [--quick] [--out runs/compare] [--steps 20] [--seeds 2]

Every arm is `configs/demo.py` (SmolLM2-135M-Instruct, the arithmetic task, 4 prompts × 8
samples, ≤ 48 tokens, τ = 0.8, GRPO) run by `python -m lorarl_jax.main` in its own process
(its peak RSS is its own, read with `os.wait4`), changing only the keys of the arm:

- LoRA r ∈ {1, 8, 16, 64} on all seven projections, **alpha fixed at 32** for every rank (as
  "LoRA Without Regret" does: with the 1/r scale, a fixed alpha keeps the best learning rate
  nearly independent of the rank, so one LR serves every rank and the ranks compare fairly);
- LoRA r=16 at three learning rates (5e-4, the demo's, and 1e-4 / 1e-5: the seed's practice
  tip "lr 1e-4 vs 1e-5");
- full-parameter RL (`lora.r=0`) at 5e-5 and 1e-5 (published guidance: LoRA's best LR ≈ 10×
  full fine-tuning's), the better one at every seed;
- attention-only LoRA (q/k/v/o, r=16): the seed's other practice tip.

The trainer's seed also draws the task's problems, so each seed is a fresh train/held-out split:
the standard error over seeds holds both sampling and data noise. "Before" accuracy is the base
model's, measured once per seed (the arm that runs first; every arm starts from it).

Reports per arm (markdown table `compare.md`, `compare.json`, `compare.png`): held-out strict and
last-number accuracy after training (mean over seeds ± standard error, and each seed), trainable
parameters, exported adapter / model bytes, checkpoint and optimizer-state bytes on disk, peak
RSS and s/step (steps 2… : step 1 compiles). `--quick`: 1 seed, 12 steps, 100 held-out problems,
arms r=16 and full at one LR each, evaluated at steps 0, 6 and 12 (18 min on 2 Intel Xeon cores).

Sizing of the full run (150 min on 2 cores), from the quick run (Intel Xeon, 2 cores): a LoRA step
takes 23 s and a full-parameter step 29 s; an arm's first run adds ~2.5 min of compiling and
start-up and ~1 min per 200-problem evaluation. 13 runs (9 arms at seed 0; r=1, r=64 and the
best LR of r=16 and of full at seed 1) × 20 steps, evaluated before and after only: ~145 min.
Cut for the budget: the demo's 40 steps (20 here), a third seed, the mid-run evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.bench_common import cpu_model  # noqa: E402

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    r: int
    lr: float
    seeds: int  # how many of the run's seeds this arm runs (the first ones)
    target_modules: tuple[str, ...] = ()  # () = the demo's seven projections
    group: str = ""  # arms of one LR sweep share a group: only its best LR runs every seed


def arms(n_seeds: int, quick: bool) -> list[Arm]:
    if quick:
        return [Arm("LoRA r=16", 16, 5e-4, 1), Arm("full", 0, 5e-5, 1)]
    one = 1
    return [
        Arm("LoRA r=16", 16, 5e-4, n_seeds, group="r16"),
        Arm("full lr 5e-5", 0, 5e-5, one, group="full"),
        Arm("full lr 1e-5", 0, 1e-5, one, group="full"),
        Arm("LoRA r=1", 1, 5e-4, n_seeds),
        Arm("LoRA r=64", 64, 5e-4, n_seeds),
        Arm("LoRA r=8", 8, 5e-4, one),
        Arm("LoRA r=16 lr 1e-4", 16, 1e-4, one, group="r16"),
        Arm("LoRA r=16 lr 1e-5", 16, 1e-5, one, group="r16"),
        Arm("LoRA r=16 attention only", 16, 5e-4, one, target_modules=ATTN),
    ]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _tensor_count(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def run_arm(arm: Arm, seed: int, out: Path, args, eval_before: bool) -> dict:
    """One arm at one seed in its own process → its metrics, sizes, peak RSS and s/step."""
    key = arm.name.replace(" ", "_").replace("=", "")
    run_dir = out / f"{key}_seed{seed}"
    if (run_dir / "summary.json").exists():  # finished earlier: reuse (the script resumes)
        return json.loads((run_dir / "arm.json").read_text())
    flags = {
        "lora.r": arm.r,
        "lora.lora_alpha": 32.0,
        "optim.lr": arm.lr,
        "trainer.seed": seed,
        "trainer.steps": args.steps,
        # the full run evaluates before and after only (a mid-run evaluation of every arm would
        # cost ~1 min × 13 runs of the 150-min budget); --quick also at the midpoint
        "trainer.eval_interval": args.steps // 2 if args.quick else 0,
        "trainer.eval_before": eval_before,
        "trainer.ckpt_interval": args.steps,
        "trainer.output_dir": str(run_dir),
        "trainer.tensorboard": False,
        "data.max_val_samples": args.val,
        "data.arith_n_val": args.val,
    }
    if arm.target_modules:
        flags["lora.target_modules"] = arm.target_modules
    cmd = [sys.executable, "-m", "lorarl_jax.main", "--config", "configs/demo.py"]
    cmd += [
        f"--config.{k}={v!r}" if not isinstance(v, str) else f"--config.{k}={v}"
        for k, v in flags.items()
    ]
    log = open(out / f"{run_dir.name}.log", "w")
    t0 = time.perf_counter()
    # one XLA compilation cache per arm: an arm's later seeds run the same programs and skip
    # their compiles, while its first run (and every other arm) compiles cold, so each arm's
    # peak RSS includes compiling
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(out / "xla_cache" / key)}
    p = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    log.close()
    if status != 0:
        raise SystemExit(f"arm {arm.name} seed {seed} failed (status {status}): see {log.name}")
    lines = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    val = {x["step"]: x for x in lines if "val/accuracy_strict" in x}
    steps = [x for x in lines if "time/step" in x]
    export = run_dir / (
        "model/model.safetensors" if arm.r == 0 else "adapter/adapter_model.safetensors"
    )
    ckpt = run_dir / "ckpt" / str(args.steps)
    result = {
        "arm": arm.name,
        "seed": seed,
        "r": arm.r,
        "lr": arm.lr,
        "val": {
            str(s): {k: v[k] for k in ("val/accuracy_strict", "val/accuracy_flexible")}
            for s, v in val.items()
        },
        "reward": [x["reward/mean"] for x in steps],
        "s_per_step": sum(x["time/step"] for x in steps[1:]) / max(len(steps) - 1, 1),
        "peak_rss_gib": usage.ru_maxrss / 2**20,  # KiB on Linux
        "trainable_params": _tensor_count(export),
        "export_bytes": export.stat().st_size,
        "checkpoint_bytes": _dir_bytes(ckpt),
        "opt_state_bytes": _dir_bytes(ckpt / "opt_state"),
        "wall_s": wall,
    }
    (run_dir / "arm.json").write_text(json.dumps(result, indent=1))
    return result


def _mean_se(xs):
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def _final(r, steps):
    return r["val"][str(steps)]


def table(results: list[dict], before: dict, steps: int) -> str:
    by_arm: dict[str, list[dict]] = {}
    for r in results:
        by_arm.setdefault(r["arm"], []).append(r)
    head = (
        "| arm | seeds | strict acc. (± s.e.) | last-number acc. (± s.e.) "
        "| each seed (strict / last) | trainable params | export | checkpoint "
        "| optimizer state | peak RSS | s/step |"
    )
    rows = [head, "|" + "---|" * 11]
    b_s = [v["val/accuracy_strict"] for v in before.values()]
    b_f = [v["val/accuracy_flexible"] for v in before.values()]
    rows.append(
        f"| base (before training) | {len(b_s)} | {100 * _mean_se(b_s)[0]:.1f} % | "
        f"{100 * _mean_se(b_f)[0]:.1f} % | "
        + ", ".join(f"{100 * s:.1f} / {100 * f:.1f}" for s, f in zip(b_s, b_f, strict=True))
        + " | – | – | – | – | – | – |"
    )
    mib = 2.0**20
    for name, rs in by_arm.items():
        s = [_final(r, steps)["val/accuracy_strict"] for r in rs]
        f = [_final(r, steps)["val/accuracy_flexible"] for r in rs]
        (ms, ss), (mf, sf) = _mean_se(s), _mean_se(f)
        pm = lambda m, e: f"{100 * m:.1f} %" + ("" if math.isnan(e) else f" ± {100 * e:.1f}")  # noqa: E731
        r0 = rs[0]
        rows.append(
            f"| {name} | {len(rs)} | {pm(ms, ss)} | {pm(mf, sf)} | "
            + ", ".join(f"{100 * a:.1f} / {100 * b:.1f}" for a, b in zip(s, f, strict=True))
            + f" | {r0['trainable_params'] / 1e6:.2f} M | {r0['export_bytes'] / mib:.1f} MiB | "
            f"{r0['checkpoint_bytes'] / mib:.1f} MiB | {r0['opt_state_bytes'] / mib:.1f} MiB | "
            f"{max(r['peak_rss_gib'] for r in rs):.2f} GiB | "
            f"{sum(r['s_per_step'] for r in rs) / len(rs):.1f} |"
        )
    return "\n".join(rows)


def plot(results: list[dict], before: dict, steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_arm: dict[str, list[dict]] = {}
    for r in results:
        by_arm.setdefault(r["arm"], []).append(r)
    for name, rs in by_arm.items():
        n = min(len(r["reward"]) for r in rs)
        mean = [sum(r["reward"][i] for r in rs) / len(rs) for i in range(n)]
        ax_r.plot(range(1, n + 1), mean, label=name)
        at = sorted({int(s) for r in rs for s in r["val"]} | {0})
        acc = []
        for s in at:
            vals = [
                (r["val"].get(str(s)) or before[r["seed"]])["val/accuracy_flexible"]
                for r in rs
                if str(s) in r["val"] or s == 0
            ]
            acc.append(100 * sum(vals) / len(vals))
        ax_a.plot(at, acc, marker="o", label=name)
    ax_r.set(xlabel="step", ylabel="training reward (mean over seeds)", title="reward")
    ax_a.set(xlabel="step", ylabel="held-out last-number accuracy, %", title="held-out")
    ax_a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 12 steps, 2 arms (≤ 30 min)")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--steps", type=int, default=0, help="RL steps per arm (default 20; quick 12)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--val", type=int, default=0, help="held-out problems (default 200; quick 100)")
    args = p.parse_args(argv)
    args.steps = args.steps or (12 if args.quick else 20)
    args.val = args.val or (100 if args.quick else 200)
    n_seeds = 1 if args.quick else args.seeds
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_model()}; {args.steps} steps per arm, {n_seeds} seed(s), {args.val} held-out")
    t0 = time.perf_counter()
    results, before, best = [], {}, {}
    plan = arms(n_seeds, args.quick)
    for seed_i in range(n_seeds):
        seed = seed_i
        for arm in plan:
            if seed_i >= arm.seeds and not (arm.group and best.get(arm.group) == arm.name):
                continue
            r = run_arm(arm, seed, out, args, eval_before=seed not in before)
            before.setdefault(seed, r["val"].get("0"))
            results.append(r)
            acc = _final(r, args.steps)["val/accuracy_strict"]
            print(
                f"{arm.name} seed {seed}: strict {acc:.3f}, {r['s_per_step']:.1f} s/step, "
                f"{r['peak_rss_gib']:.2f} GiB, {r['wall_s'] / 60:.1f} min",
                flush=True,
            )
        if seed_i == 0:  # each LR sweep's best arm (last-number accuracy) runs the later seeds
            for g in {a.group for a in plan if a.group}:
                cand = [
                    r for r in results if any(a.name == r["arm"] and a.group == g for a in plan)
                ]
                top = max(cand, key=lambda r: r["val"][str(args.steps)]["val/accuracy_flexible"])
                best[g] = top["arm"]
    md = table(results, before, args.steps)
    wall = (time.perf_counter() - t0) / 60
    header = f"CPU: {cpu_model()}; {args.steps} steps, {args.val} held-out; wall {wall:.0f} min\n\n"
    (out / "compare.md").write_text(header + md + "\n")
    (out / "compare.json").write_text(json.dumps({"results": results, "before": before}, indent=1))
    plot(results, before, args.steps, out / "compare.png")
    print(header + md)
    print(f"wrote {out / 'compare.md'}, {out / 'compare.png'}")


if __name__ == "__main__":
    main()
