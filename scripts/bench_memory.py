"""Memory of one GRPO step, full fine-tuning vs LoRA vs QLoRA, measured against the estimator.

    flock /tmp/bench.lock python scripts/bench_memory.py [--models smollm2,gemma3] \
        [--modes full,lora,qlora] [--batch 2 --n 4 --prompt-len 64 --new-tokens 64 --chunk 16]

Each (model, mode) runs in a fresh subprocess on the same batch, fp32 on CPU: load the converted
HF checkpoint (`~/.cache/lorarl_jax/hf/<model>`), then one GRPO step as the trainer does it:
rollout with `sampling.sampler.generate` (LoRA: on merged weights; QLoRA: NF4 base + adapter
unmerged, `rollout.merge=auto`; full: on the policy itself), reference log-probs
(`compute_logprobs` on the base / the reference copy), GRPO advantages of random rewards, and one
policy update with the trainer's `make_policy_step` (full: `lora.r=0`'s step, gradients w.r.t.
every base weight, AdamW over all of them, as `python -m lorarl_jax.main --config.lora.r=0` runs).
Prompts are random token ids and every completion runs to `--new-tokens` (no stop id), so all
modes do the same work.

Reported per case:
- XLA's `compiled.memory_analysis()` of the three programs (argument + output − alias + temp):
  the device-memory view the estimator predicts (`train_program`, `rollout`, `log-prob`).
- RSS: every program is compiled first, from shapes alone (`jit(...).lower(ShapeDtypeStruct…)`);
  then freed heap is returned to the OS (malloc_trim), the kernel's high-water mark is reset
  (/proc/self/clear_refs) and the baseline is read, before the model is loaded. `state` = RSS once
  weights, adapter, AdamW state and reference exist; `step peak` = VmHWM over two steps. Both
  minus the baseline are the data the estimator predicts; the compiler's own peak is listed apart
  (it is not what a GPU/TPU user pays).
- optimizer-state bytes (sum of the optax state's nbytes).
XLA:CPU's default scheduler optimizes for concurrency, not memory: it keeps 50-85% of the merge's
fp32 A·B products live and runs remat's recomputation early. Accelerators schedule for memory, so
the cases run with `--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`
(`--cpu-scheduler default`: XLA's default; the train-step analysis is the same within 1-5%).
`lora+remat` (`model.gradient_checkpointing`) checks the estimator's remat column: XLA:CPU honours
remat in this unrolled decoder up to ~4 layers only (3.5 MiB/layer kept vs 3.3 predicted; from 8
layers on each layer keeps ~40 MiB again), so those rows measure well above the estimate;
`--scan-layers` runs the scanned decoder (`model.scan_layers`), where remat holds (README table).
The RSS of the small phases also holds ~100-200 MiB of XLA:CPU runtime memory (kept once the
programs have run) and buffers of the previous phase not yet freed; the estimator has neither.
XLA:CPU keeps ~110-150 MiB of runtime memory once its programs have run (RSS left after a step
above the state, whatever the model size); it is listed as `runtime`, and is in the step peak.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MiB = 2.0**20
MEMORY_SCHEDULER = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
HF_CACHE = Path.home() / ".cache" / "lorarl_jax" / "hf"


def rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> None:
    """Returns freed heap to the OS, then resets the kernel's VmHWM to the current RSS."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def qlora_available() -> bool:
    import dataclasses

    from lorarl_jax.model.config import ModelConfig

    try:
        import lorarl_jax.model.quant  # noqa: F401
    except ImportError:
        return False
    return "quantization" in {f.name for f in dataclasses.fields(ModelConfig)}


def _program(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {
        k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")
    }
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _nbytes(tree) -> int:
    import jax

    return sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def compile_case(model: str, case_mode: str, args):
    """Everything one case runs, compiled from shapes alone (XLA's memory analysis comes with it):
    rollout (`generate`, after `merge` for LoRA), reference log-probs, advantages, policy step."""
    import types

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from lorarl_jax.config import AlgoCfg, FullCfg, OptimCfg
    from lorarl_jax.model.config import load_config
    from lorarl_jax.model.lora import LoraConfig, init_lora, merge
    from lorarl_jax.model.transformer import abstract_params
    from lorarl_jax.rl import advantages, policy
    from lorarl_jax.rl import step as step_lib
    from lorarl_jax.sampling.sampler import SamplingParams, generate

    B, n, P, N, C = args.batch, args.n, args.prompt_len, args.new_tokens, args.chunk
    R, S, i32, f32 = B * n, jax.ShapeDtypeStruct, jnp.int32, jnp.float32
    mode, remat = case_mode.split("+")[0], case_mode.endswith("+remat")
    runtime = dict(dtype="float32", param_dtype="float32", remat=remat)
    runtime |= {"scan_layers": args.scan_layers}
    runtime |= {"quantization": "nf4"} if mode == "qlora" else {}
    cfg = load_config(str(HF_CACHE / model), **runtime)
    lcfg = LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank)
    algo = AlgoCfg(logprob_chunk=C)  # GRPO, low_var_kl loss (coef 0.001), token-mean
    c = types.SimpleNamespace(mode=mode, cfg=cfg, lcfg=lcfg, runtime=runtime, merge=None)
    c.base_abs = nn.unbox(abstract_params(cfg))
    if mode == "full":  # the trainer's lora.r=0 step: every parameter trained (rl/policy.py)
        labels = policy.param_labels(c.base_abs, FullCfg())
        c.tx = step_lib.make_optimizer(OptimCfg(), 10, labels)
        train_abs, step = c.base_abs, step_lib.make_policy_step(cfg, None, algo, c.tx, 1.0, n)
    else:
        c.tx = step_lib.make_optimizer(OptimCfg(), 10)
        train_abs = jax.eval_shape(lambda: init_lora(c.base_abs, lcfg, jax.random.key(0)))
        step = step_lib.make_policy_step(cfg, lcfg, algo, c.tx, 1.0, n)
    key, prompts = jax.random.key(0), S((B, P), i32)
    batch = dict(prompt_tokens=prompts, prompt_mask=prompts, responses=S((R, N), i32),
                 response_mask=S((R, N), i32), advantages=S((R, N), f32))  # fmt: skip
    gen_kw = dict(n=n, max_new_tokens=N, stop_ids=(-1,), pad_id=0, sp=SamplingParams())
    if mode == "lora":  # rollout on merged weights
        c.merge = jax.jit(lambda b, lo: merge(b, lo, lcfg.scale)).lower(c.base_abs, train_abs)
        c.merge = c.merge.compile()
        g_cfg, g_params, g_lora = getattr(cfg, "dense", cfg), c.base_abs, {}
    else:  # full: the policy itself; QLoRA (rollout.merge=auto): NF4 base + adapter unmerged
        g_cfg, g_params = cfg, train_abs if mode == "full" else c.base_abs
        g_lora = {"lora": train_abs, "lcfg": lcfg} if mode == "qlora" else {}
    c.generate = generate.lower(g_cfg, g_params, prompts, prompts, key, **gen_kw, **g_lora)
    c.generate = c.generate.compile()
    lp_kw = dict(n=n, temperature=1.0, chunk=C)
    c.logprobs = step_lib.compute_logprobs.lower(cfg, lcfg, c.base_abs, None, batch, **lp_kw)
    c.logprobs = c.logprobs.compile()
    batch["ref_logp"] = S((R, N), f32)
    opt_abs = jax.eval_shape(c.tx.init, train_abs)
    # full mode: the base argument is the reference copy, which the step does not read (jit
    # prunes it, so the step's XLA memory is the policy's alone)
    s_abs = (train_abs, opt_abs, c.base_abs, batch, key)
    c.step = step.lower(*s_abs).compile()
    adv = lambda r_R, mask: advantages.compute_advantages(  # noqa: E731
        "grpo", jnp.zeros((R, N)).at[:, -1].set(r_R), mask, groups=n
    )[0]  # GRPO advantages of one outcome reward per sequence
    c.advantages = jax.jit(adv).lower(S((R,), f32), S((R, N), i32)).compile()
    c.programs = {"rollout": c.generate, "logprobs": c.logprobs, "train_step": c.step}
    c.programs = {k: _program(v) for k, v in c.programs.items()}
    if c.merge is not None:
        c.programs["merge"] = _program(c.merge)
    return c


def run_case(model: str, case_mode: str, args) -> dict:
    """Compiles, reads the baseline, loads the model, then runs two GRPO steps (module doc)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lorarl_jax.model import hf
    from lorarl_jax.model.lora import init_lora

    c = compile_case(model, case_mode, args)
    B, R, P, key = args.batch, args.batch * args.n, args.prompt_len, jax.random.key(0)

    def build_state(base):
        if c.mode == "full":  # the policy moves; π_ref is a copy of the initial weights
            trainable, ref = base, jax.tree.map(lambda x: jnp.array(x, copy=True), base)
        else:
            trainable, ref = init_lora(base, c.lcfg, jax.random.key(0)), base
        return jax.block_until_ready((trainable, ref, c.tx.init(trainable)))

    # the small eager programs of building the state compile now, outside the measurement
    build_state(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), c.base_abs))
    compile_peak = rss_kib("VmHWM")
    reset_peak_rss()
    baseline = rss_kib()  # imports + runtime + compiled programs, before the model is loaded
    _, base = hf.load_hf_model(str(HF_CACHE / model), **c.runtime)
    trainable, ref, opt_state = build_state(base)
    reset_peak_rss()
    state = rss_kib()
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(3, c.cfg.vocab_size, (B, P)), jnp.int32)
    pmask = jnp.ones((B, P), jnp.int32)
    phase_peak, phase_end = {}, {}

    def phase(name, value):
        """Blocks on `value`, records the RSS high-water mark of the phase, resets it."""
        jax.block_until_ready(value)
        phase_peak[name] = rss_kib("VmHWM") / 1024
        reset_peak_rss()
        phase_end[name] = rss_kib() / 1024
        return value

    def one_step(trainable, opt_state):
        if c.mode == "lora":  # the merged copy is freed once generate is done
            out = c.generate(c.merge(base, trainable), prompts, pmask, key)
        else:
            lora = {"lora": trainable} if c.mode == "qlora" else {}
            out = c.generate(trainable if c.mode == "full" else base, prompts, pmask, key, **lora)
        out = phase("rollout", out)
        rewards = jnp.asarray(rng.integers(0, 2, (R,)), jnp.float32)
        b = {"prompt_tokens": prompts, "prompt_mask": pmask, "responses": out.tokens,
             "response_mask": out.mask, "advantages": c.advantages(rewards, out.mask)}  # fmt: skip
        b["ref_logp"] = phase("logprobs", c.logprobs(ref, None, b)[0])
        trainable, opt_state, m = c.step(trainable, opt_state, ref, b, key)
        loss = m["actor/loss"]
        return phase("update", (trainable, opt_state, float(loss)))

    for _ in range(2):  # the second step runs with every buffer pool already grown
        trainable, opt_state, loss = one_step(trainable, opt_state)
    return {
        "model": model,
        "mode": case_mode,
        "loss": loss,
        "compile_peak_mib": compile_peak / 1024,
        "baseline_mib": baseline / 1024,
        "state_mib": state / 1024,
        "phase_peak_mib": phase_peak,  # of the second step
        "phase_end_mib": phase_end,  # RSS left when the phase is over (after malloc_trim)
        "step_peak_mib": max(phase_peak.values()),
        "opt_state_bytes": _nbytes(opt_state),
        "trainable_bytes": _nbytes(trainable),
        "base_bytes": _nbytes(base),
        "programs": c.programs,
    }


def estimated(model: str, case_mode: str, args) -> dict:
    from lorarl_jax import estimate as est_lib
    from lorarl_jax.model.lora import LoraConfig

    prec = est_lib.Precision(param_dtype="float32", dtype="float32")
    cfg = est_lib.model_config(str(HF_CACHE / model), prec)
    lcfg = LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank)
    wl = est_lib.Workload(
        batch=args.batch,
        num_generations=args.n,
        seq=args.prompt_len,
        max_new_tokens=args.new_tokens,
        logprob_chunk=args.chunk,
        remat=case_mode.endswith("+remat"),
        scan_layers=args.scan_layers,
    )
    return est_lib.estimate(cfg, lcfg, wl, prec, est_lib.Options())[
        case_mode.split("+")[0]
    ].as_dict()


def run_in_subprocess(model: str, mode: str, argv: list[str]) -> dict:
    """One case in a fresh interpreter, so that its RSS is its own."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, __file__, *argv, "--case", f"{model}:{mode}", "--json-out", path]
    subprocess.run(cmd, check=True)
    with open(path) as f:
        return json.load(f)


XLA_COLS = (  # (label, estimator key, measured program)
    ("train step", "train_program", "train_step"),
    ("rollout (generate)", "rollout_program", "rollout"),
    ("ref log-probs", "logprob_program", "logprobs"),
)
RSS_COLS = (  # (label, estimator keys summed, measured phase; None: the state before the step)
    ("state", ("resident",), None),
    ("rollout phase", ("resident", "rollout_phase"), "rollout"),
    ("log-prob phase", ("resident", "logprob_phase"), "logprobs"),
    ("update phase", ("resident", "train_phase"), "update"),
    ("step peak", ("peak",), "step"),
)


def _pair(est: float, meas: float) -> str:
    return f"{est / MiB:>9.0f} /{meas / MiB:>6.0f} ({est / meas:4.2f})"


def _rows(results, cols, cells) -> list[str]:
    hdr = f"{'model':<9}{'mode':<12}" + "".join(f"{c[0]:>26}" for c in cols)
    lines = [hdr, "-" * len(hdr)]
    for r in results:
        if "skipped" in r:
            lines.append(f"{r['model']:<9}{r['mode']:<12}  n/a ({r['skipped']})")
        else:
            lines.append(f"{r['model']:<9}{r['mode']:<12}" + "".join(cells(r)))
    return lines


def table(results: list[dict], args) -> str:
    """Estimate / measured (ratio) in MiB: XLA's view of each program, then RSS per phase."""

    def xla(r):
        e = r["estimate"]
        out = [_pair(e["optimizer"], r["opt_state_bytes"])]
        return out + [_pair(e[k], r["programs"][m]["total"]) for _, k, m in XLA_COLS]

    def rss(r):
        e, base = r["estimate"], r["baseline_mib"]
        meas = {"step": r["step_peak_mib"], None: r["state_mib"], **r["phase_peak_mib"]}
        return [_pair(sum(e[k] for k in ks), (meas[m] - base) * MiB) for _, ks, m in RSS_COLS]

    title = (
        f"GRPO step, {args.batch} prompts x {args.n} generations, prompt {args.prompt_len} + "
        f"{args.new_tokens} new tokens, LoRA r={args.rank} on all 7 projections, fp32, CPU. "
        "MiB, estimate / measured (ratio)."
    )
    lines = [title, "", "Device memory (XLA memory_analysis: argument + output - alias + temp)"]
    lines += _rows(results, [("AdamW state",), *XLA_COLS], xla)
    lines += ["", "Peak RSS - baseline (baseline: after imports and compilation, before loading)"]
    lines += _rows(results, RSS_COLS, rss)
    compile_peaks = ", ".join(
        f"{r['model']}/{r['mode']} {r['compile_peak_mib']:.0f}"
        for r in results
        if "skipped" not in r
    )
    lines += ["", f"RSS while compiling (not counted above; not a GPU/TPU cost): {compile_peaks}"]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="smollm2,gemma3", help="dirs under ~/.cache/lorarl_jax/hf")
    p.add_argument(
        "--modes",
        default="full,lora,qlora,lora+remat",
        help="full | lora | qlora, each optionally +remat (gradient checkpointing)",
    )
    p.add_argument(
        "--cpu-scheduler",
        choices=("memory", "default"),
        default="memory",
        help="XLA:CPU scheduler: memory-optimized (as accelerators) or XLA's default",
    )
    p.add_argument("--batch", type=int, default=2, help="prompts")
    p.add_argument("--n", type=int, default=4, help="generations per prompt")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--chunk", type=int, default=16, help="LM-head positions per log-prob chunk")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--scan-layers", action="store_true", help="model.scan_layers=True")
    p.add_argument("--case", default="", help="(internal) model:mode to run in this process")
    p.add_argument("--json-out", default="", help="(internal) where --case writes its result")
    p.add_argument("--save", default="", help="also write all results as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.case:
        if args.cpu_scheduler == "memory":  # before JAX is imported (run_case imports it)
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = f"{flags} {MEMORY_SCHEDULER}".strip()
        model, mode = args.case.split(":")
        result = run_case(model, mode, args)
        with open(args.json_out, "w") as f:
            json.dump(result, f)
        return [result]
    results = []
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            if mode.startswith("qlora") and not qlora_available():
                results.append(
                    {"model": model, "mode": mode, "skipped": "quantization not available"}
                )
                continue
            r = run_in_subprocess(model, mode, argv)
            r["estimate"] = estimated(model, mode, args)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "estimate"}), flush=True)
    print(table(results, args))
    if args.save:
        with open(args.save, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
