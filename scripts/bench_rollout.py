"""Rollout throughput (new tokens/s) of our jitted KV-cache sampler vs transformers `generate`.

    HF_HUB_OFFLINE=1 python scripts/convert_gguf.py --model smollm2   # -> $LORARL_CACHE/hf/smollm2
    flock /tmp/bench.lock python scripts/bench_rollout.py [--model-dir DIR] [--batch 32]
    flock /tmp/bench.lock python scripts/bench_rollout.py --rl-lengths --task demo --batch 4 \
        --n 8 --new-tokens 48                              # the demo's rollout: 4 prompts x 8
    flock /tmp/bench.lock python scripts/bench_rollout.py --rl-lengths --task gsm8k \
        --gsm8k ../shared/data/gsm8k/train.jsonl --new-tokens 256

Both sides get the same `--batch` chat-templated prompts (left-padded), `--n` samples of each
(GRPO's group: ours shares the prompt's KV cache across the group, and with n > 1 also runs with
the prompt's keys/values copied into every row, the previous sampler; transformers uses
`num_return_sequences`, i.e. copies), with temperature
`--temperature` sampling (no top-k/top-p) and greedy. Default: every row emits exactly
`--new-tokens` tokens (ours: no stop ids; HF: min_new_tokens = max_new_tokens), so both do the
same work. `--rl-lengths`: the RL workload, EOS allowed, and tokens/s counts each row's tokens up
to and including its EOS (the sampled tokens an RL step keeps); each side's mean length is
printed (the two draw different samples from the same model). Our side runs in fp32; transformers
in each of `--hf-dtypes` (fp32 and bf16: CPUs with AMX run torch bf16 matmuls 3-5x faster than
fp32) and each `--attn`; the ratio is against its fastest. Timed = one whole `generate` call,
prefill included (also timed alone: our jitted `prefill`, HF's generate of 1 token), best of
`--repeats` after an untimed warm-up; our compile time is reported on its own.

Per phase, ours: GFLOP/s achieved by the prefill and by a decode step (linear maps, LM head and
attention at the mean context), against the rate of the same fp32 matmul shapes measured alone
in the same run (`bench_common.matmul_rate`).
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_model, decode_step_flops, matmul_rate, prefill_flops  # noqa: E402

MODES = ("sample", "greedy")
OURS = "lorarl_jax (jit, KV cache)"
OURS_PER_ROW = "lorarl_jax (prompt KV copied per row)"
OURS_BF16 = "lorarl_jax (bf16 weights, fp32 activations)"
TASKS = ("arith", "demo", "gsm8k")


def default_model_dir() -> str:
    from lorarl_jax.model.gguf import cache_dir

    return str(cache_dir() / "hf" / "smollm2")


def task_rows(task: str, batch: int, gsm8k: str):
    """arith: +-* with operands ≤ 99; demo: configs/demo.py's task (+-, ≤ 15); gsm8k: the first
    `batch` questions of a GSM8K jsonl (verl's prompt)."""
    from lorarl_jax.datasets import arith_rows, gsm8k_rows_from_jsonl

    if task == "gsm8k":
        if not gsm8k:
            raise SystemExit("--task gsm8k needs --gsm8k PATH (a GSM8K jsonl)")
        return gsm8k_rows_from_jsonl(gsm8k)[:batch]
    if task == "demo":
        return arith_rows(batch, seed=0, ops=("+", "-"), max_operand=15)
    return arith_rows(batch, seed=0)


def make_prompts(model_dir: str, batch: int, task: str = "arith", gsm8k: str = ""):
    """`batch` distinct chat-templated questions → left-padded (ids_BxP, mask_BxP), the pad id
    and the model's stop ids."""
    from transformers import AutoTokenizer

    from lorarl_jax.data import collate_left_padded, encode_prompts, pad_id_of
    from lorarl_jax.model.load import stop_ids_of

    tok = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = encode_prompts(task_rows(task, batch, gsm8k), tok, max_prompt_length=1024)
    pad_id = pad_id_of(tok)
    out = collate_left_padded(examples, pad_id, max_prompt_length=1024, pad_multiple=1)
    return out["input_ids"], out["attention_mask"], pad_id, stop_ids_of(tok, model_dir)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Linux ≥ 4.0: writing 5 to clear_refs resets the peak-RSS high-water mark."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _best(fn, repeats):
    """Min seconds of `fn(r)` over `repeats` calls, and the last output."""
    times, out = [], None
    for r in range(repeats):
        t0 = time.perf_counter()
        out = fn(r)
        times.append(time.perf_counter() - t0)
    return min(times), out


def bench_ours(model_dir, ids, mask, pad_id, stop_ids, args):
    """stop_ids () = every row runs to --new-tokens. Rows: seconds, kept tokens, decode steps."""
    import jax
    import jax.numpy as jnp

    from lorarl_jax.model.hf import load_hf_model
    from lorarl_jax.sampling.rollout_weights import round_weights
    from lorarl_jax.sampling.sampler import prefill

    new_tokens, repeats = args.new_tokens, args.repeats
    cfg, params = load_hf_model(model_dir)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    cache_len = ids.shape[1] + new_tokens
    pre = jax.jit(lambda p, i, m: prefill(cfg, p, i, m, cache_len)).lower(params, ids, mask)
    pre = pre.compile()
    jax.block_until_ready(pre(params, ids, mask))
    prefill_s, _ = _best(lambda r: jax.block_until_ready(pre(params, ids, mask)), repeats)
    variants = {OURS: (True, "")} | ({OURS_PER_ROW: (False, "")} if args.n > 1 else {})
    if "bfloat16" in args.weight_dtypes.split(","):
        variants[OURS_BF16] = (True, "bfloat16")
    rows = {}
    for name, (share, wd) in variants.items():
        c, p = (cfg.replace(dot_dtype=wd), round_weights(params, wd)) if wd else (cfg, params)
        rows[name] = _ours_rows(c, p, ids, mask, pad_id, stop_ids, args, prefill_s, share)
    return cfg, rows


def _ours_rows(cfg, params, ids, mask, pad_id, stop_ids, args, prefill_s, share):
    import jax
    import numpy as np

    from lorarl_jax.sampling.sampler import SamplingParams, generate

    new_tokens, repeats = args.new_tokens, args.repeats
    rows = {}
    for mode in args.modes:
        sp = SamplingParams(greedy=mode == "greedy", temperature=args.temperature, top_k=0)
        kw = dict(n=args.n, max_new_tokens=new_tokens, stop_ids=stop_ids, pad_id=pad_id, sp=sp)
        kw["share"] = share
        key = jax.random.key(0)
        t0 = time.perf_counter()
        compiled = generate.lower(cfg, params, ids, mask, key, **kw).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(params, ids, mask, key))  # warm-up
        run = functools.partial(compiled, params, ids, mask)
        sec, out = _best(
            lambda r, run=run: jax.block_until_ready(run(jax.random.key(r + 1))), repeats
        )
        lengths = np.asarray(out.lengths)
        assert stop_ids or int(lengths.min()) == new_tokens
        rows[mode] = dict(
            sec=sec,
            compile_s=compile_s,
            prefill_s=prefill_s,
            tokens=int(lengths.sum()),
            steps=int(lengths.max()),
        )
    return rows


def bench_hf(model_dir, ids, mask, pad_id, stop_ids, args, attn, dtype):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation=attn
    ).eval()
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    force = not stop_ids

    def run(mode, n_new):
        sampling = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0)
        kw = sampling if mode == "sample" else dict(do_sample=False)
        with torch.inference_mode():
            return model.generate(
                input_ids=ids_t,
                attention_mask=mask_t,
                num_return_sequences=args.n if mode == "sample" else 1,
                max_new_tokens=n_new,
                min_new_tokens=n_new if force else 0,
                eos_token_id=list(stop_ids) or None,
                pad_token_id=pad_id,
                **kw,
            )

    def timed(mode, n_new):
        def once(r):
            torch.manual_seed(r)
            return run(mode, n_new)

        return _best(once, args.repeats)

    def kept_tokens(out):
        """Per row: tokens up to and including the first stop id (all, if none)."""
        new = out[:, ids.shape[1] :].numpy()
        if force:
            return np.full(len(new), new.shape[1])
        stop = np.isin(new, stop_ids)
        first = np.where(stop.any(1), stop.argmax(1) + 1, new.shape[1])
        return first

    rows = {}
    first = "sample" if args.n > 1 else "greedy"  # transformers: greedy takes one sequence
    run(first, 8)  # warm-up
    prefill_s, _ = timed(first, 1)  # generate(max_new_tokens=1) = prefill + one sample
    for mode in args.modes:
        run(mode, 8)  # warm-up
        sec, out = timed(mode, args.new_tokens)
        lengths = kept_tokens(out)
        assert not force or out.shape[1] == ids.shape[1] + args.new_tokens
        rows[mode] = dict(
            sec=sec, prefill_s=prefill_s, tokens=int(lengths.sum()), steps=int(lengths.max())
        )
    return rows


def phase_table(cfg, ours, B, P, n):
    """Achieved GFLOP/s of our prefill (B / n prompts) and decode step (B rows) vs the matmul
    rate at their shapes."""
    r = ours.get("sample") or ours["greedy"]
    Bp = B // n
    pre_flops = prefill_flops(cfg, Bp, P)
    steps = max(r["steps"] - 1, 1)  # the first token comes from the prefill's logits
    step_s = (r["sec"] - r["prefill_s"]) / steps
    step_flops = decode_step_flops(cfg, B, P + r["steps"] / 2)
    pre_rate, dec_rate = matmul_rate(cfg, Bp * P, head=False), matmul_rate(cfg, B)
    print("\nours per phase (sampling)   GFLOP   seconds   GFLOP/s   matmul GFLOP/s   share")
    for name, flops, sec, peak in (
        (f"prefill {Bp}x{P}", pre_flops, r["prefill_s"], pre_rate),
        (f"decode step ({B} rows)", step_flops, step_s, dec_rate),
    ):
        rate = flops / sec / 1e9
        print(
            f"{name:<26}{flops / 1e9:>8.1f}{sec:>10.3f}{rate:>10.1f}{peak:>17.1f}"
            f"{rate / peak:>8.0%}"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=None, help="HF dir; default: convert_gguf output")
    parser.add_argument("--batch", type=int, default=32, help="prompts")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt (GRPO's group)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rl-lengths", action="store_true", help="stop at EOS (RL workload)")
    parser.add_argument("--task", choices=TASKS, default="arith")
    parser.add_argument("--gsm8k", default="", help="GSM8K jsonl for --task gsm8k")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row (min taken)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--attn", default="sdpa", help="transformers attn impls to try")
    parser.add_argument("--hf-dtypes", default="float32,bfloat16", help="transformers dtypes")
    parser.add_argument("--skip-hf", action="store_true", help="only our side")
    parser.add_argument(
        "--weight-dtypes",
        default="float32,bfloat16",
        help="ours: fp32, and bf16 weights with fp32 activations (rollout.weight_dtype=bfloat16)",
    )
    parser.add_argument("--modes", default=",".join(MODES), help="sample,greedy or one of them")
    args = parser.parse_args(argv)
    args.modes = tuple(m for m in MODES if m in args.modes.split(","))
    if args.n > 1 and "greedy" in args.modes:
        parser.error("--n > 1 samples: use --modes sample (greedy gives n equal sequences)")
    model_dir = args.model_dir or default_model_dir()

    ids, mask, pad_id, stop_ids = make_prompts(model_dir, args.batch, args.task, args.gsm8k)
    stop_ids = tuple(stop_ids) if args.rl_lengths else ()
    cfg, ours = bench_ours(model_dir, ids, mask, pad_id, stop_ids, args)
    ours_rss = peak_rss_mb()
    hf = {}
    if not args.skip_hf:
        import gc

        gc.collect()
        for dtype in args.hf_dtypes.split(","):
            for attn in args.attn.split(","):
                reset = reset_peak_rss()
                rows = bench_hf(model_dir, ids, mask, pad_id, stop_ids, args, attn, dtype)
                rows["rss"] = peak_rss_mb() if reset else float("nan")
                hf[f"{attn}, {dtype}"] = rows

    P, B = ids.shape[1], ids.shape[0] * args.n  # B: rows generated
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; model {model_dir}")
    what = "stop at EOS, at most" if stop_ids else "exactly"
    print(f"{args.task} prompts: {ids.shape[0]} × {args.n} samples, prompt {P} tokens "
          f"(left-padded), {what} "
          f"{args.new_tokens} new tokens, temperature {args.temperature}")  # fmt: skip
    print(
        "tokens/s = tokens kept (up to each row's EOS) / generate() seconds; ours fp32, and "
        "with rollout.weight_dtype=bfloat16 (its prefill s: the fp32 prefill's)"
    )
    head = f"{'impl':<46}{'mode':<8}{'s/generate':>11}{'tokens/s':>10}{'mean len':>9}"
    print(head + f"{'prefill s':>10}{'compile s':>10}{'peak RSS MB':>13}")

    def row(label, mode, r, compile_s, rss):
        s = r["sec"]
        print(
            f"{label:<46}{mode:<8}{s:>11.2f}{r['tokens'] / s:>10.0f}{r['tokens'] / B:>9.1f}"
            f"{r['prefill_s']:>10.2f}{compile_s:>10}{rss:>13.0f}"
        )

    for mode in args.modes:
        for name, rows in ours.items():
            row(name, mode, rows[mode], f"{rows[mode]['compile_s']:.1f}", ours_rss)
        for name, rows in hf.items():
            row(f"transformers ({name}, {args.threads} thr)", mode, rows[mode], "-", rows["rss"])
    result = {"ours": ours, "hf": hf}
    for mode in args.modes if hf else ():
        best_name, best = max(
            ((name, rows[mode]["tokens"] / rows[mode]["sec"]) for name, rows in hf.items()),
            key=lambda x: x[1],
        )
        for ours_name, key in ((OURS, f"ratio_{mode}"), (OURS_BF16, f"ratio_{mode}_bf16")):
            if ours_name not in ours:
                continue
            ours_tps = ours[ours_name][mode]["tokens"] / ours[ours_name][mode]["sec"]
            result[key] = ratio = ours_tps / best
            print(f"{mode}: {ours_name} / transformers' fastest ({best_name}) = {ratio:.2f}x")
    phase_table(cfg, ours[OURS], B, P, args.n)
    return result


if __name__ == "__main__":
    main()
