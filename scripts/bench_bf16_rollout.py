"""bf16 rollouts: which weights can the sampler decode on? Speed, memory and policy fidelity.

    flock /tmp/bench.lock python scripts/bench_bf16_rollout.py [--batch 4] [--n 4] [--new-tokens 32]

SmolLM2-135M with a bf16 base (compute and parameters) and an r=16 adapter on all seven
projections whose B is what one Adam step at lr 1e-4 makes of a zero B (every entry ±1e-4). The
trainer's policy is the bf16 forward with the adapter unmerged (what the policy step computes).
Rollout options, timed alternately in one process (best of --repeats after a compile round):
  bf16-merged    W' = bf16(W + s·A·B)                      (rollout.merge=always)
  bf16-unmerged  bf16 base, adapter added to each output    (rollout.merge=auto, the default)
  fp32-merged    W' = fp32(W) + s·A·B, fp32 matmuls          (a float32 merged copy)
  fp32 base      float32 base merged (what a float32 run does; speed reference)
Columns: new tokens/s of `generate` (every row emits --new-tokens), bytes of the weights held
during the rollout, the share of adapted kernel entries that the merge leaves unchanged, and the
mean |log π_sampler − log π_trainer| over the sampled tokens (the sync gate's quantity).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _distinct_bytes(*trees) -> int:
    import jax

    seen = {}
    for x in jax.tree.leaves(trees):
        seen[x.unsafe_buffer_pointer()] = x.nbytes
    return sum(seen.values())


def main():
    import dataclasses

    import jax
    import jax.numpy as jnp
    from bench_qlora import _prompts
    from flax import traverse_util
    from measure_logp_gap import cpu_model

    from lorarl_jax.model.gguf import cache_dir
    from lorarl_jax.model.hf import load_hf_model
    from lorarl_jax.model.lora import LoraConfig, init_lora, merge
    from lorarl_jax.rl.step import compute_logprobs
    from lorarl_jax.sampling.sampler import SamplingParams, generate

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default=str(cache_dir() / "hf" / "smollm2"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    ids, mask, pad_id = _prompts(args.model_dir, args.batch)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    bf = dict(dtype="bfloat16", param_dtype="bfloat16")
    cfg16, base16 = load_hf_model(args.model_dir, **bf)
    cfg32, base32 = load_hf_model(args.model_dir)
    lcfg = LoraConfig(r=16, lora_alpha=32.0)
    lora = init_lora(base32, lcfg, jax.random.key(0))
    sign = lambda path, x: (  # noqa: E731
        1e-4 * jnp.sign(jax.random.normal(jax.random.key(zlib.crc32(str(path).encode())), x.shape))
        if path[-1].key == "lora_b"
        else x
    )
    lora = jax.tree_util.tree_map_with_path(sign, lora)
    jit_merge = jax.jit(merge, static_argnums=(2, 3))
    up = lambda b: jax.tree.map(lambda x: x.astype(jnp.float32), b)  # noqa: E731
    cfg16_as32 = dataclasses.replace(cfg16, dtype="float32", param_dtype="float32")
    options = {
        "bf16-merged": (cfg16, jit_merge(base16, lora, lcfg.scale, jnp.bfloat16), None),
        "bf16-unmerged": (cfg16, base16, lora),
        "fp32-merged": (cfg16_as32, jit_merge(up(base16), lora, lcfg.scale, jnp.float32), None),
        "fp32 base": (cfg32, jit_merge(base32, lora, lcfg.scale, jnp.float32), None),
    }
    flat16 = traverse_util.flatten_dict(base16)
    kw = dict(n=args.n, max_new_tokens=args.new_tokens, stop_ids=(), pad_id=pad_id)
    times = {k: [] for k in options}
    outs = {}
    for r in range(args.repeats + 1):
        for name, (cfg, params, lo) in options.items():
            t0 = time.perf_counter()
            out = generate(
                cfg, params, ids, mask, jax.random.key(r), sp=SamplingParams(), lora=lo,
                lcfg=lcfg if lo is not None else None, **kw,
            )  # fmt: skip
            jax.block_until_ready(out)
            if r:
                times[name].append(time.perf_counter() - t0)
            outs[name] = out
    tokens = args.batch * args.n * args.new_tokens
    print(f"CPU: {cpu_model()}; jax {jax.__version__}; {args.batch} prompts × {args.n} × "
          f"{args.new_tokens} new tokens")  # fmt: skip
    print("| rollout weights | tokens/s | vs bf16-unmerged | weights held (MiB) | "
          "adapted entries unchanged | gap to the bf16 trainer |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    ref_tps = tokens / min(times["bf16-unmerged"])
    for name, (_, params, lo) in options.items():
        out = outs[name]
        batch = {
            "prompt_tokens": ids,
            "prompt_mask": mask,
            "responses": out.tokens,
            "response_mask": out.mask,
        }
        logp, _ = compute_logprobs(
            cfg16, lcfg, base16, lora, batch, n=args.n, temperature=1.0, chunk=32
        )
        m = np.asarray(out.mask, np.float32)
        gap = float(
            (np.abs(np.asarray(out.logp) - np.asarray(logp, np.float32)) * m).sum() / m.sum()
        )
        unchanged = "-"
        if name == "bf16-merged":
            flat = traverse_util.flatten_dict(params)
            same = total = 0
            for path in traverse_util.flatten_dict(lora):
                if path[-1] == "lora_a":
                    k = path[:-1] + ("kernel",)
                    same += int(jnp.sum(flat[k] == flat16[k]))
                    total += flat[k].size
            unchanged = f"{same / total:.1%}"
        held = _distinct_bytes(params, lo) if lo is not None else _distinct_bytes(params)
        tps = tokens / min(times[name])
        print(f"| {name} | {tps:.0f} | {tps / ref_tps:.2f}× | {held / 2**20:.0f} | {unchanged} | "
              f"{gap:.2g} |")  # fmt: skip


if __name__ == "__main__":
    main()
