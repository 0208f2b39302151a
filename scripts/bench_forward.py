"""Forward throughput (tokens/s) of our jitted decoder vs transformers (torch CPU), both fp32.

    HF_HUB_OFFLINE=1 python scripts/convert_gguf.py --model smollm2 --out /tmp/smollm2
    HF_HUB_OFFLINE=1 python scripts/bench_forward.py --model-dir /tmp/smollm2 --batch 8 --seq 128

Same random tokens for both, full attention mask, logits for every position. Each side runs
`--warmup` untimed forwards (our first one compiles), then `--repeats` timed ones; the table
reports the median. torch uses `--threads` intra-op threads; XLA's CPU backend uses its own pool.
Expected: a table with both rows and `ours / torch` ratio; max |Δlogits| ≲ 1e-3.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _time(fn, warmup: int, repeats: int) -> tuple[float, object]:
    """Median seconds of `fn()` over `repeats` calls after `warmup` calls; and the last output."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_ours(model_dir: str, tokens, warmup: int, repeats: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lorarl_jax.model.hf import load_hf_model
    from lorarl_jax.model.transformer import Transformer, positions_from_mask

    cfg, params = load_hf_model(model_dir)
    model = Transformer(cfg)

    @jax.jit
    def forward(p, tok_BxT, pos_BxT, mask_BxT):
        return model.apply({"params": p}, tok_BxT, pos_BxT, mask_BxT)[0]

    tok = jnp.asarray(tokens, jnp.int32)
    mask = jnp.ones_like(tok)
    pos = positions_from_mask(mask)
    t0 = time.perf_counter()
    forward(params, tok, pos, mask).block_until_ready()
    compile_s = time.perf_counter() - t0
    sec, out = _time(lambda: forward(params, tok, pos, mask).block_until_ready(), warmup, repeats)
    return sec, compile_s, np.asarray(out)


def bench_torch(model_dir: str, tokens, warmup: int, repeats: int, attn: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn
    ).eval()
    tok = torch.tensor(tokens, dtype=torch.long)
    mask = torch.ones_like(tok)

    def forward():
        with torch.inference_mode():
            return model(input_ids=tok, attention_mask=mask, use_cache=False).logits

    sec, out = _time(forward, warmup, repeats)
    return sec, out.float().numpy()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True, help="HF checkpoint directory")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--attn", default="sdpa", help="transformers attn_implementation")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from lorarl_jax.model.config import load_config

    vocab = load_config(args.model_dir).vocab_size
    tokens = np.random.default_rng(0).integers(0, vocab, (args.batch, args.seq))
    n_tok = args.batch * args.seq

    ours_s, compile_s, ours_logits = bench_ours(args.model_dir, tokens, args.warmup, args.repeats)
    torch_s, torch_logits = bench_torch(
        args.model_dir, tokens, args.warmup, args.repeats, args.attn
    )
    diff = float(np.abs(ours_logits - torch_logits).max())

    print(f"model {args.model_dir}  batch {args.batch} x seq {args.seq}  fp32  CPU")
    print(f"{'impl':<26}{'median s/forward':>18}{'tokens/s':>12}")
    print(f"{'lorarl_jax (jit)':<26}{ours_s:>18.4f}{n_tok / ours_s:>12.0f}")
    label = f"transformers ({args.attn}, {args.threads} thr)"
    print(f"{label:<26}{torch_s:>18.4f}{n_tok / torch_s:>12.0f}")
    print(f"ours / torch throughput: {torch_s / ours_s:.2f}x   (jit compile {compile_s:.1f} s)")
    print(f"max |Δlogits| = {diff:.2e}")
    return {"ours_s": ours_s, "torch_s": torch_s, "ratio": torch_s / ours_s, "diff": diff}


if __name__ == "__main__":
    main()
