"""Turning a rollout into training arrays: sequences, outcome rewards, mini-batches.

Shapes: B prompts, n generations each, R = B·n rows (row i·n + j is generation j of prompt i),
P prompt length (left-padded), N response length.
"""

from __future__ import annotations

import numpy as np


def build_sequences(prompt_ids_BxP, prompt_mask_BxP, resp_RxN, resp_mask_RxN, n: int):
    """prompt ‖ response for every row → (tokens_RxL, attention_mask_RxL), L = P + N."""
    p_ids = np.repeat(np.asarray(prompt_ids_BxP), n, axis=0)
    p_mask = np.repeat(np.asarray(prompt_mask_BxP), n, axis=0)
    tokens = np.concatenate([p_ids, np.asarray(resp_RxN)], axis=1).astype(np.int32)
    mask = np.concatenate([p_mask, np.asarray(resp_mask_RxN)], axis=1).astype(np.int32)
    return tokens, mask


def outcome_token_scores(scores_R, resp_mask_RxN):
    """Places each sequence's scalar score on its last response token (verl's reward tensor)."""
    mask = np.asarray(resp_mask_RxN)
    out = np.zeros(mask.shape, np.float32)
    last = np.maximum(mask.sum(-1) - 1, 0)
    out[np.arange(len(last)), last] = np.asarray(scores_R, np.float32) * (mask.sum(-1) > 0)
    return out


def trim_length(resp_mask_RxN, multiple: int = 32) -> int:
    """Response length to keep: the longest response rounded up to `multiple` (few distinct
    shapes, so few recompiles); `multiple` ≤ 0 keeps the full length (one shape, one compile)."""
    mask = np.asarray(resp_mask_RxN)
    n = mask.shape[1]
    if multiple <= 0:
        return n
    longest = int(mask.sum(-1).max()) if mask.size else 1
    return min(n, max(multiple, -(-longest // multiple) * multiple))


def minibatch_indices(n_items: int, per_batch: int, rng: np.random.Generator, shuffle=True):
    """Index arrays of the optimizer mini-batches of one PPO epoch (items shuffled if asked)."""
    order = rng.permutation(n_items) if shuffle else np.arange(n_items)
    per_batch = per_batch or n_items
    if n_items % per_batch:
        raise ValueError(
            f"{n_items} prompts do not split into mini-batches of {per_batch} "
            "(algo.ppo_mini_batch_size must divide data.batch_size)"
        )
    return [order[i : i + per_batch] for i in range(0, n_items, per_batch)]
