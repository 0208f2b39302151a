"""One step's rollouts: merge once → sample → score, and DAPO's dynamic sampling.

`collect` is the trainer's first stage. Without `algo.filter_groups` it samples the step's
prompt batch once; with it, it keeps drawing prompt batches from the data iterator until the
step has `data.batch_size` groups whose rewards differ or `algo.max_num_gen_batches` batches were
generated, and `rl/dapo.py` assembles the step's batch from them. `score` adds DAPO's overlong
penalty (`algo.overlong_buffer_len`) to the task reward; the group filter reads the task reward.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from lorarl_jax import distributed
from lorarl_jax.rl import dapo
from lorarl_jax.rl.evaluate import decode_responses
from lorarl_jax.rl.rewards import merge_reward_metrics
from lorarl_jax.rl.setup import Run
from lorarl_jax.rl.state import REWARD_COLUMNS, TrainState


def sample(run: Run, w, batch, key):
    """`n` samples per prompt of one batch on the step's weights `w` → (host Rollout, texts)."""
    out = run.programs.generate(  # host prompts in, host (replicated) rollout out
        w, batch["input_ids"], batch["attention_mask"], key, run.static.rollout
    )
    return out, decode_responses(run.static.tokenizer, out.tokens, out.lengths)


def score(run: Run, batch, out, texts):
    """Rewards of every completion (`data.reward_fns`), plus DAPO's overlong penalty →
    (task scores_R, scores_R the advantages read, reward metrics)."""
    a, spec = run.static.cfg.algo, run.static.rollout
    n = spec.n
    prompts = [p for p in batch["raw_prompt"] for _ in range(n)]
    columns = {k: [v for v in batch[k] for _ in range(n)] for k in REWARD_COLUMNS}
    t1 = time.perf_counter()
    scores, rmetrics = run.reward(prompts, texts, columns)
    scores = distributed.same_on_all_processes(scores)  # e.g. a timeout on one host only
    rmetrics["time/reward"] = time.perf_counter() - t1
    if not a.overlong_buffer_len:
        return scores, scores, rmetrics
    penalty = dapo.overlong_penalty(
        out.lengths, spec.max_new_tokens, a.overlong_buffer_len, a.overlong_penalty_factor
    )
    rmetrics["reward/overlong_penalty"] = float(penalty.mean())
    return scores, scores + penalty, rmetrics


def collect(run: Run, state: TrainState, batch, step: int):
    """Merge once, then sample and score `batch`; with `algo.filter_groups` (DAPO's dynamic
    sampling) further batches from the data iterator until `data.batch_size` informative groups
    or `algo.max_num_gen_batches` batches (`rl/dapo.py`) → (batch, rollout, scores_R, loss_rows_R
    or None, metrics). Batch g ≥ 1 samples with the step's rollout key folded with g."""
    static, a = run.static, run.static.cfg.algo
    n, groups = static.rollout.n, static.sizes.prompts
    t0 = time.perf_counter()
    w = run.programs.merge(run.base, state.lora)  # merged, or base + adapter (rollout.merge)
    jax.block_until_ready(w.params)
    times = {"time/merge": time.perf_counter() - t0, "time/rollout": 0.0, "time/reward": 0.0}
    parts, rewards, kept = [], [], 0
    while True:
        key = state.rollout_key(step)
        if parts:
            key = jax.random.fold_in(key, len(parts))
        t1 = time.perf_counter()
        out, texts = sample(run, w, batch, key)
        times["time/rollout"] += time.perf_counter() - t1
        task, scores, rm = score(run, batch, out, texts)
        times["time/reward"] += rm.pop("time/reward")
        # the task reward decides, not the length penalty (verl's DAPO: filter_groups.metric=acc)
        keep = dapo.informative_groups(task, n) if a.filter_groups else np.ones(groups, bool)
        parts.append(dapo.GenBatch(batch, out, scores, keep))
        rewards.append((task, rm))
        kept += int(keep.sum())
        cap = a.max_num_gen_batches
        if kept >= groups or (cap and len(parts) >= cap):
            break
        batch = next(run.data_iter)  # its position is checkpointed after the step
    del w
    metrics = merge_reward_metrics([m for _, m in rewards], [t for t, _ in rewards])
    if len(parts) == 1 and parts[0].keep_G.all():
        batch, out, scores, loss_rows = batch, parts[0].rollout, parts[0].scores_R, None
    else:
        batch, out, scores, loss_rows, kept = dapo.assemble(parts, groups, n, static.rollout.pad_id)
        loss_rows = None if loss_rows.all() else loss_rows  # one program while no filler is needed
    if a.filter_groups and kept < groups and distributed.is_primary():
        print(
            f"step {step}: {kept} of {groups} groups have differing rewards after {len(parts)} "
            f"generation batches (algo.max_num_gen_batches={a.max_num_gen_batches}); the "
            "update trains on those only",
            file=sys.stderr,
        )
    if a.filter_groups:
        metrics["data/gen_batches"] = float(len(parts))
        metrics["data/gen_samples"] = float(len(parts) * groups * n)
        metrics["data/groups_kept"] = float(min(kept, groups))
    if a.overlong_filter:
        cut = dapo.truncated_rows(out.tokens, out.lengths, static.rollout.stop_ids)
        metrics["data/overlong_masked"] = float(cut.sum())
        loss_rows = (np.ones(len(cut), np.float32) if loss_rows is None else loss_rows) * ~cut
    return batch, out, scores, loss_rows, {**metrics, **times}
