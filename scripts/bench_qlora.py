"""QLoRA rollout trade-off: decode speed and memory of `rollout.merge = always | never`.

    flock /tmp/bench.lock python scripts/bench_qlora.py [--model-dir DIR] [--batch 8] [--n 4]

Each case runs in its own process (fresh peak RSS), on SmolLM2-135M fp32 CPU with an r=16 adapter
on all 7 projections (random, non-zero B): `dense` = full-precision base merged (what a LoRA run
does), `nf4-always` = NF4 base, adapter merged into dequantized weights once, `nf4-never` = NF4 base
decoded with the adapter unmerged. Reported: weight bytes held during the rollout (base + merged
copy + adapter), the compiled `generate`'s temporary buffers, peak RSS, the merge time, and new
tokens/s of a whole `generate` (prefill included; batch × n rows, every row emits --new-tokens,
temperature-1 sampling, best of --repeats after a warm-up). The two NF4 cases also report greedy
token agreement with each other. A last process times always and never alternately (best and
median), which a shared machine's varying load hits alike.

Measured here (2 shared CPU cores, 8 prompts × 4 samples × 64 new tokens, MiB):
    case        weights held  merged copy  generate temps  peak RSS  tokens/s (interleaved)
    dense           1045          513           188          2870        = nf4-always
    nf4-always       697          513           188          2300        333 best, 316 median
    nf4-never        184            0           197          1590        228 best, 210 median
Greedy tokens of nf4-always and nf4-never: identical (32 rows × 64 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = ("dense", "nf4-always", "nf4-never")


def _prompts(model_dir: str, batch: int):
    from transformers import AutoTokenizer

    from lorarl_jax.data import collate_left_padded, encode_prompts, pad_id_of
    from lorarl_jax.datasets import arith_rows

    tok = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = encode_prompts(arith_rows(batch, seed=0), tok, max_prompt_length=1024)
    out = collate_left_padded(examples, pad_id_of(tok), max_prompt_length=1024, pad_multiple=1)
    return out["input_ids"], out["attention_mask"], pad_id_of(tok)


def _distinct_bytes(*trees) -> int:
    """Bytes of the distinct device buffers among the leaves of `trees`."""
    import jax

    seen = {}
    for x in jax.tree.leaves(trees):
        seen[x.unsafe_buffer_pointer()] = x.nbytes
    return sum(seen.values())


def run_case(case: str, args) -> dict:
    import jax
    import jax.numpy as jnp

    from lorarl_jax.model import quant
    from lorarl_jax.model.hf import load_hf_model
    from lorarl_jax.model.lora import LoraConfig, init_lora
    from lorarl_jax.sampling import rollout_weights as rw
    from lorarl_jax.sampling.sampler import SamplingParams, generate

    ids, mask, pad_id = _prompts(args.model_dir, args.batch)
    q = {} if case == "dense" else {"quantization": "nf4"}
    t0 = time.perf_counter()
    cfg, base = load_hf_model(args.model_dir, **q)
    load_s = time.perf_counter() - t0
    lcfg = LoraConfig(r=16, lora_alpha=32.0)
    lora = init_lora(base, lcfg, jax.random.key(0))
    noise = lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape)  # noqa: E731
    lora = jax.tree.map(noise, lora)  # B ≠ 0: the adapter changes the policy
    merge = case != "nf4-never"
    fn = rw.make_rollout_weights(cfg, lcfg, rw.jit_merge(cfg, lcfg) if merge else None)
    fn(base, lora)  # compile the merge
    t0 = time.perf_counter()
    w = fn(base, lora)
    jax.block_until_ready(w.params)
    merge_s = time.perf_counter() - t0 if merge else 0.0

    def gen(sp, key=0):
        return generate(
            w.cfg,
            w.params,
            jnp.asarray(ids),
            jnp.asarray(mask),
            jax.random.key(key),
            n=args.n,
            max_new_tokens=args.new_tokens,
            stop_ids=(),
            pad_id=pad_id,
            sp=sp,
            lora=w.lora,
            lcfg=w.lcfg,
        )

    sp = SamplingParams(temperature=1.0)
    lowered = generate.lower(
        w.cfg,
        w.params,
        jnp.asarray(ids),
        jnp.asarray(mask),
        jax.random.key(0),
        n=args.n,
        max_new_tokens=args.new_tokens,
        stop_ids=(),
        pad_id=pad_id,
        sp=sp,
        lora=w.lora,
        lcfg=w.lcfg,
    )
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    t0 = time.perf_counter()
    jax.block_until_ready(gen(sp))
    compile_s = time.perf_counter() - t0
    best = float("inf")
    for r in range(args.repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(gen(sp, r + 1))
        best = min(best, time.perf_counter() - t0)
    greedy = np.asarray(gen(SamplingParams(greedy=True)).tokens)
    rows = args.batch * args.n
    held = _distinct_bytes(base, lora, w.params)  # merged leaves passed through are not copies
    assert int(np.asarray(out.lengths).sum()) == rows * args.new_tokens
    return {
        "case": case,
        "rows": rows,
        "new_tokens": args.new_tokens,
        "tokens_per_s": rows * args.new_tokens / best,
        "generate_s": best,
        "compile_s": compile_s,
        "merge_s": merge_s,
        "load_s": load_s,
        "base_mb": quant.nbytes(base) / 2**20,
        "merged_copy_mb": (held - _distinct_bytes(base, lora)) / 2**20,
        "weights_held_mb": held / 2**20,
        "generate_temp_mb": temp / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "greedy": greedy.tolist(),
    }


def interleaved(args) -> dict:
    """tokens/s of always vs never in one process, alternating runs (a shared machine's load
    then hits both alike): best and median of `2 · repeats` runs each."""
    import jax
    import jax.numpy as jnp

    from lorarl_jax.model.hf import load_hf_model
    from lorarl_jax.model.lora import LoraConfig, init_lora
    from lorarl_jax.sampling import rollout_weights as rw
    from lorarl_jax.sampling.sampler import SamplingParams, generate

    ids, mask, pad_id = _prompts(args.model_dir, args.batch)
    cfg, base = load_hf_model(args.model_dir, quantization="nf4")
    lcfg = LoraConfig(r=16, lora_alpha=32.0)
    lora = init_lora(base, lcfg, jax.random.key(0))
    ws = {
        "always": rw.make_rollout_weights(cfg, lcfg, rw.jit_merge(cfg, lcfg))(base, lora),
        "never": rw.make_rollout_weights(cfg, lcfg)(base, lora),
    }
    kw = dict(n=args.n, max_new_tokens=args.new_tokens, stop_ids=(), pad_id=pad_id)
    tokens = args.batch * args.n * args.new_tokens
    times = {m: [] for m in ws}
    for r in range(2 * args.repeats + 1):
        for m, w in ws.items():
            t0 = time.perf_counter()
            out = generate(
                w.cfg, w.params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(r),
                sp=SamplingParams(), lora=w.lora, lcfg=w.lcfg, **kw,
            )  # fmt: skip
            jax.block_until_ready(out)
            if r:  # the first round compiles
                times[m].append(time.perf_counter() - t0)
    return {
        f"{m}_tokens_per_s_{k}": tokens / f(t)
        for m, t in times.items()
        for k, f in (("best", min), ("median", np.median))
    }


def main():
    from lorarl_jax.model.gguf import cache_dir

    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", default=str(cache_dir() / "hf" / "smollm2"))
    p.add_argument("--batch", type=int, default=8, help="prompts")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--case", choices=CASES + ("interleaved",), help="one case, this process")
    args = p.parse_args()
    if args.case:
        one = interleaved(args) if args.case == "interleaved" else run_case(args.case, args)
        print(json.dumps(one))
        return
    results = {}
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[case] = json.loads(out.strip().splitlines()[-1])
    a, b = (np.asarray(results[c].pop("greedy")) for c in ("nf4-always", "nf4-never"))
    results["dense"].pop("greedy")
    print(
        f"{'case':<11} {'tok/s':>7} {'weights MB':>10} {'merged MB':>9} {'temp MB':>8} "
        f"{'RSS MB':>7} {'merge s':>7}"
    )
    for r in results.values():
        print(
            f"{r['case']:<11} {r['tokens_per_s']:>7.1f} {r['weights_held_mb']:>10.1f} "
            f"{r['merged_copy_mb']:>9.1f} {r['generate_temp_mb']:>8.1f} {r['peak_rss_mb']:>7.0f} "
            f"{r['merge_s']:>7.2f}"
        )
    print(f"greedy tokens equal, nf4-always vs nf4-never: {(a == b).mean():.4f}")
    cmd = [sys.executable, __file__, "--case", "interleaved"] + sys.argv[1:]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    inter = json.loads(out.strip().splitlines()[-1])
    print("interleaved, tokens/s:", {k: round(v, 1) for k, v in inter.items()})
    print(json.dumps(list(results.values()) + [inter]))


if __name__ == "__main__":
    main()
