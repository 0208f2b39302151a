"""DAPO's data side (Yu et al. 2025): dynamic sampling and overlong reward shaping / filtering.

Shapes: G prompts (groups) of n generations, R = G·n rows (row g·n + j is generation j of group
g), P prompt length (left-padded), N response length.

- `overlong_penalty`: the soft length penalty added to the task score, with L_max =
  `rollout.max_new_tokens`, L_buf = `algo.overlong_buffer_len`, f = `algo.overlong_penalty_factor`:

      p(L) = min(0, −(L − (L_max − L_buf)) / L_buf · f)

  0 up to L_max − L_buf tokens, then linear down to −f at L_max (L counts the stop token).
- `truncated_rows`: responses cut at L_max without a stop token; `algo.overlong_filter` takes
  them out of the loss (they stay in the group statistics of the advantages).
- `informative_groups`: groups whose n task scores are not all equal. A group of equal scores
  has zero advantage under the group-relative estimators (grpo, drgrpo, rloo): no policy
  gradient. The trainer tests the task reward, before the overlong penalty (verl's DAPO recipe,
  `filter_groups.metric=acc`): a group that differs only in length would otherwise get
  std-normalised advantages of full size from the penalty alone, a pure "be shorter" signal.
- `assemble`: with `algo.filter_groups` the trainer generates batch after batch of fresh prompts
  until it holds G informative groups or made `algo.max_num_gen_batches` batches. The step then
  trains on the first G informative groups; when fewer were found, filtered groups fill the
  remaining slots with `loss_rows = 0` (left out of every loss term and denominator) so the
  jitted step keeps its shapes, and `loss_minibatches` never makes an update of fillers only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lorarl_jax.sampling.sampler import Rollout

PROMPT_KEYS = ("input_ids", "attention_mask")  # [G, P] arrays; the other batch keys are lists


def overlong_penalty(lengths_R, max_new_tokens: int, buffer_len: int, factor: float):
    """p(L) = min(0, −(L − (L_max − L_buf)) / L_buf · f) per row (module docstring); zeros
    when `buffer_len` is 0 (shaping off)."""
    lengths = np.asarray(lengths_R, np.float64)
    if buffer_len <= 0:
        return np.zeros(lengths.shape, np.float32)
    exceed = lengths - (max_new_tokens - buffer_len)
    return np.minimum(-exceed / buffer_len * factor, 0.0).astype(np.float32)


def truncated_rows(tokens_RxN, lengths_R, stop_ids: Sequence[int]):
    """bool [R]: the response used all N tokens and its last one is not a stop token."""
    tokens, lengths = np.asarray(tokens_RxN), np.asarray(lengths_R)
    N = tokens.shape[1]
    if N == 0:
        return np.zeros(lengths.shape, bool)
    return (lengths >= N) & ~np.isin(tokens[:, N - 1], np.asarray(list(stop_ids)))


def informative_groups(scores_R, n: int):
    """bool [G]: the group's n scores are not all equal (verl's filter_groups: std > 0); a
    group of one generation is always kept."""
    s = np.asarray(scores_R, np.float64).reshape(-1, n)
    if n == 1:
        return np.ones(s.shape[0], bool)
    return s.max(axis=1) > s.min(axis=1)


@dataclasses.dataclass
class GenBatch:
    """One generation batch: its prompts (the data pipeline's dict), host rollout, the scores
    the advantages read, and which of its groups are informative."""

    batch: dict
    rollout: Rollout
    scores_R: np.ndarray
    keep_G: np.ndarray


def _left_pad(x_GxP, P: int, fill: int):
    x = np.asarray(x_GxP)
    return np.pad(x, ((0, 0), (P - x.shape[1], 0)), constant_values=fill)


def assemble(parts: Sequence[GenBatch], groups: int, n: int, pad_id: int):
    """The step's batch from the generation batches: (batch, rollout, scores_R, loss_rows_R,
    kept). The first `groups` informative groups in generation order, then (only when fewer
    were found) filtered groups in generation order as fillers; `loss_rows_R` is 1 for the rows
    of informative groups and 0 for fillers; prompts are re-padded on the left to the longest
    batch's P (attention mask 0)."""
    picks = [(i, g) for i, p in enumerate(parts) for g in np.flatnonzero(p.keep_G)][:groups]
    kept = len(picks)
    fill = [(i, g) for i, p in enumerate(parts) for g in np.flatnonzero(~p.keep_G)]
    picks += fill[: groups - kept]
    if len(picks) < groups:
        raise ValueError(f"{len(picks)} groups generated for a batch of {groups}")
    P = max(np.asarray(p.batch["input_ids"]).shape[1] for p in parts)
    batch = {}
    for key in parts[0].batch:
        if key in PROMPT_KEYS:
            fillv = pad_id if key == "input_ids" else 0
            padded = [_left_pad(p.batch[key], P, fillv) for p in parts]
            batch[key] = np.stack([padded[i][g] for i, g in picks]).astype(np.int32)
        else:
            batch[key] = [parts[i].batch[key][g] for i, g in picks]

    def take(get):
        return np.concatenate([np.asarray(get(parts[i]))[g * n : (g + 1) * n] for i, g in picks])

    rollout = Rollout(
        tokens=take(lambda p: p.rollout.tokens),
        mask=take(lambda p: p.rollout.mask),
        logp=take(lambda p: p.rollout.logp),
        lengths=take(lambda p: p.rollout.lengths),
    )
    scores = take(lambda p: p.scores_R).astype(np.float32)
    loss_rows = np.repeat((np.arange(groups) < kept).astype(np.float32), n)
    return batch, rollout, scores, loss_rows, kept


def loss_minibatches(live_G, per_batch: int, rng: np.random.Generator, shuffle: bool):
    """Group-index mini-batches of one epoch: the live groups (any row in the loss; shuffled if
    asked), the last mini-batch completed with dead ones (fillers, or groups `overlong_filter`
    emptied), so there are ceil(live / per_batch) updates and none learns from nothing. With
    every group live this is `experience.minibatch_indices` (the same permutation)."""
    live_G = np.asarray(live_G, bool)
    live, dead = np.flatnonzero(live_G), np.flatnonzero(~live_G)
    order = rng.permutation(live) if shuffle else live
    n_mb = -(-len(live) // per_batch)
    order = np.concatenate([order, dead[: n_mb * per_batch - len(live)]])
    return [order[i : i + per_batch] for i in range(0, n_mb * per_batch, per_batch)]
