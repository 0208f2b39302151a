"""Held-out evaluation: greedy decoding of the current policy, answer correctness with its noise.

Reports strict accuracy (`#### N` near the end), flexible accuracy (last number in the text) and
the mean reward, each with its binomial standard error √(p(1−p)/n), so a before/after comparison
can be judged against sampling noise. Batches are padded to a fixed size so one compiled
generate serves the whole set.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lorarl_jax.data import collate_left_padded
from lorarl_jax.rl.rewards import RewardManager, gsm8k_accuracy_metrics


def decode_responses(tokenizer, tokens_RxN, lengths_R) -> list[str]:
    toks = np.asarray(tokens_RxN)
    return [
        tokenizer.decode(toks[i, : int(n)].tolist(), skip_special_tokens=True)
        for i, n in enumerate(np.asarray(lengths_R))
    ]


def evaluate(
    generate_fn,
    examples,
    tokenizer,
    reward: RewardManager,
    *,
    batch_size: int,
    max_prompt_length: int,
    pad_id: int,
    pad_multiple: int | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Greedy completions for every example → (metrics, per-sample records).

    `generate_fn(tokens_BxP, mask_BxP, key) → Rollout` decodes one padded batch greedily (the
    trainer's is its evaluation program on the current weights, `rl/programs.py`)."""
    completions, records = [], []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)  # fixed batch shape: one compile
        batch = collate_left_padded(chunk, pad_id, max_prompt_length, pad_multiple)
        out = generate_fn(
            jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]), jax.random.key(0)
        )
        texts = decode_responses(tokenizer, out.tokens, out.lengths)[:real]
        completions += texts
        records += [
            {"prompt": ex["raw_prompt"], "completion": t, "ground_truth": ex["ground_truth"]}
            for ex, t in zip(chunk[:real], texts, strict=True)
        ]
    columns = {
        "ground_truth": [ex["ground_truth"] for ex in examples],
        "data_source": [ex["data_source"] for ex in examples],
        "extra_info": [ex.get("extra_info", {}) for ex in examples],
    }
    prompts = [ex["raw_prompt"] for ex in examples]
    scores, rmetrics = reward(prompts, completions, columns)
    acc = gsm8k_accuracy_metrics(completions, columns)
    n = len(examples)
    metrics = {"val/n": float(n), "val/reward_mean": float(np.mean(scores))}
    for key, name in (("reward/accuracy_strict", "strict"), ("reward/accuracy_flexible", "flex")):
        if key in acc:
            p = float(acc[key])
            full = "val/accuracy_strict" if name == "strict" else "val/accuracy_flexible"
            metrics[full] = p
            metrics[full + "_stderr"] = math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))
    for rec, s in zip(records, scores, strict=True):
        rec["score"] = float(s)
    return metrics, records
