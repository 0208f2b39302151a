"""The RL loop: data → merge → rollout → reward → advantages → log-probs → updates → ckpt/export.

`build` (rl/setup.py) makes a `Run` once: static facts, the jitted programs, the initial
`TrainState` and the resources; `train` then runs the steps. Each stage below is one function
that takes the state it reads and returns the state it changes, so the loop reads as the
diagram. Randomness is explicit: the root key is split into rollout / update keys, each folded
with the step number (`TrainState.rollout_key` / `update_key`), so a resumed run repeats exactly
what an uninterrupted one would have done.

Per step (verl's order):
  sample     merged = merge(base, lora)              once, fp32 math, for the sampler only
                                                     (rollout.merge=never: base + adapter as is)
             rollout = generate(merged, prompts, n)  tokens, response mask, sampler log-probs
  score      scores = rewards(completions)           per sequence, on the last response token
             (+ DAPO's overlong penalty; with algo.filter_groups, sample and score repeat on
             fresh prompts until the step has data.batch_size informative groups: rl/collect.py)
  logprobs   old_logp = π_θ(tokens) (off-policy only), ref_logp = π_ref(tokens): the base with a
             zero adapter delta (or the initial adapter)
  advantages token_rewards = scores − β·KL (optional, β in TrainState.kl_coef, fixed/adaptive),
             then grpo | drgrpo | rloo | reinforce++ | gae (critic values)
  update     ppo_epochs × mini-batches of the jitted step: gradients w.r.t. the adapter only
  checks     sync gate (rollout.max_logp_gap: sampler vs trainer log-prob gap) and run guards
             (rl/guards.py: rewards that score nothing, all-skipped updates, a runaway adapter),
             both before the step's checkpoint
  checkpoint the whole TrainState + data position; never a non-finite adapter
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lorarl_jax import distributed, process, run_dir
from lorarl_jax.config import RunConfig
from lorarl_jax.rl import advantages as adv_lib
from lorarl_jax.rl import dapo, losses
from lorarl_jax.rl.collect import collect, sample, score  # noqa: F401  (sample, score: API)
from lorarl_jax.rl.evaluate import evaluate
from lorarl_jax.rl.experience import (
    build_sequences,
    minibatch_indices,
    outcome_token_scores,
    trim_length,
)
from lorarl_jax.rl.guards import (  # noqa: F401  (LogpGapError: trainer's API)
    LogpGapError,
    LogpGapGate,
    RunGuards,
    adapter_absmax,
)
from lorarl_jax.rl.setup import Run, build, export_final, save_checkpoint
from lorarl_jax.rl.state import TrainState


def _masked_mean(x, mask):
    mask = np.asarray(mask, np.float32)
    return float((np.asarray(x) * mask).sum() / max(mask.sum(), 1.0))


def train_sequences(batch, out, bucket: int):
    """The prompt/response arrays the trainer reads, responses trimmed to a bucket multiple,
    and the sampler's log-probs of the same tokens."""
    Nk = trim_length(out.mask, bucket)
    seqs = {
        "prompt_tokens": np.asarray(batch["input_ids"], np.int32),
        "prompt_mask": np.asarray(batch["attention_mask"], np.int32),
        "responses": np.asarray(out.tokens[:, :Nk], np.int32),
        "response_mask": np.asarray(out.mask[:, :Nk], np.int32),
    }
    return seqs, out.logp[:, :Nk]


def reference_logprobs(run: Run, state: TrainState, seqs):
    """(old_logp, entropy, ref_logp), each None when the step does not need it: π_old needs its
    own forward only off-policy (several epochs or mini-batches; on-policy the step uses its own
    detached log-probs) or for KL in the reward; π_ref for any KL."""
    a = run.static.cfg.algo
    old_logp = entropy = ref_logp = None
    if run.static.sizes.off_policy or a.use_kl_in_reward:
        old_logp, entropy = run.programs.logprobs(run.base, state.lora, seqs)
    if a.use_kl_loss or a.use_kl_in_reward:  # π_ref: zero delta or the initial adapter
        if run.ref_lora is None:
            ref_logp = run.programs.ref_logprobs(run.base, seqs)
        else:
            ref_logp = run.programs.logprobs(run.base, run.ref_lora, seqs)[0]
    return old_logp, entropy, ref_logp


def advantages(run: Run, state: TrainState, batch, seqs, scores, old_logp, ref_logp):
    """(state, advantages, returns, critic inputs, metrics); KL in the reward moves kl_coef."""
    a, n = run.static.cfg.algo, run.static.rollout.n
    rmask = seqs["response_mask"]
    token_rewards, metrics = outcome_token_scores(scores, rmask), {}
    if a.use_kl_in_reward:
        token_rewards, kl_now = losses.apply_kl_penalty(
            jnp.asarray(token_rewards),
            jnp.asarray(old_logp),
            jnp.asarray(ref_logp),
            jnp.asarray(rmask),
            state.kl_coef,
            a.kl_penalty,
        )
        metrics["actor/reward_kl_coef"] = state.kl_coef
        state = state.replace(
            kl_coef=run.kl_ctl.next_value(state.kl_coef, float(kl_now), len(scores))
        )
    critic = {}
    if a.adv_estimator == "gae":  # the critic reads the concatenated sequences
        resp, Nk = seqs["responses"], rmask.shape[1]
        tokens, attn = build_sequences(batch["input_ids"], batch["attention_mask"], resp, rmask, n)
        values = run.programs.critic_values(state.critic_params, tokens, attn, Nk)
        critic = {"values": np.asarray(values), "tokens": tokens, "attention_mask": attn}
    advs, returns = adv_lib.compute_advantages(
        a.adv_estimator,
        jnp.asarray(token_rewards),
        jnp.asarray(rmask),
        groups=n,
        values_BxT=None if not critic else jnp.asarray(critic["values"]),
        gamma=a.gamma,
        lam=a.lam,
        norm_adv_by_std_in_grpo=a.norm_adv_by_std_in_grpo,
    )
    return state, np.asarray(advs), np.asarray(returns), critic, metrics


def rollout_step(run: Run, state: TrainState, batch, step: int):
    """collect (sample → score) → log-probs → advantages: (state, train batch, metrics)."""
    static, a = run.static, run.static.cfg.algo
    process.release_free_memory()  # the last update's temporaries, before the merged copy
    batch, out, scores, loss_rows, cm = collect(run, state, batch, step)
    seqs, slogp = train_sequences(batch, out, static.cfg.rollout.response_bucket)
    rmask = seqs["response_mask"]
    t2 = time.perf_counter()
    old_logp, entropy, ref_logp = reference_logprobs(run, state, seqs)
    t_logp = time.perf_counter() - t2
    state, advs, returns, critic, metrics = advantages(
        run, state, batch, seqs, scores, old_logp, ref_logp
    )
    if old_logp is not None:
        metrics["actor/entropy_old"] = _masked_mean(entropy, rmask)
    if static.sizes.off_policy:  # sampler vs trainer on the rollout's weights, before any
        # update; on-policy the policy step measures it on its own forward (one value, one key)
        gap = np.abs(np.asarray(slogp) - np.asarray(old_logp)) * rmask
        metrics["rollout/logp_gap_mean"] = float(gap.sum() / max(rmask.sum(), 1))
        metrics["rollout/logp_gap_max"] = float(gap.max())
    if ref_logp is not None:  # KL(π_old ‖ π_ref), k1 estimate, sampled tokens
        ref_from = old_logp if old_logp is not None else slogp
        metrics["actor/kl"] = _masked_mean(np.asarray(ref_from) - np.asarray(ref_logp), rmask)
    lengths = np.asarray(rmask).sum(-1)
    times = {k: v for k, v in cm.items() if k.startswith("time/")}
    metrics.update(
        {
            **{k: v for k, v in cm.items() if not k.startswith("time/")},
            "response/length_mean": float(lengths.mean()),
            "response/length_max": float(lengths.max()),
            "response/clipped_frac": float((lengths >= static.rollout.max_new_tokens).mean()),
            **times,
            "time/logprobs": t_logp,
            "perf/rollout_tokens_per_s": float(lengths.sum() / max(times["time/rollout"], 1e-9)),
        }
    )
    tb = {**seqs, "sampler_logp": np.asarray(slogp), "advantages": advs, "returns": returns}
    if loss_rows is not None:  # DAPO: fillers / truncated rows out of every loss term
        tb["loss_rows"] = np.asarray(loss_rows, np.float32)
    if static.sizes.off_policy:
        tb["old_logp"] = np.asarray(old_logp)
    if a.use_kl_loss:
        tb["ref_logp"] = np.asarray(ref_logp)
    tb.update(critic)
    return state, tb, metrics


def aggregate_updates(acc: dict[str, list[float]]) -> dict[str, float]:
    """One step's metrics from its updates' values: `*_max` the max, `actor/skipped` the count
    of skipped updates, `actor/updates` the count of updates (fewer than ppo_epochs ×
    mini-batches when DAPO's filters leave mini-batches empty), the rest the mean."""
    out = {k: float(np.max(v) if k.endswith("_max") else np.mean(v)) for k, v in acc.items()}
    out["actor/skipped"] = float(np.sum(acc.get("actor/skipped", [0.0])))
    out["actor/updates"] = float(len(acc.get("actor/skipped", [])))  # every update reports it
    return out


def update(run: Run, state: TrainState, tb, step: int):
    """ppo_epochs × mini-batches of the jitted policy step (and critic step for PPO)."""
    a, n, sizes = run.static.cfg.algo, run.static.rollout.n, run.static.sizes
    process.release_free_memory()  # the rollout's freed buffers back to the system (process.py)
    prompts, per_mb = tb["prompt_tokens"].shape[0], sizes.prompts_per_update
    rng = np.random.default_rng([run.static.cfg.trainer.seed, step])
    acc: dict[str, list[float]] = {}
    lora, opt, c_params, c_opt = (
        state.lora,
        state.opt_state,
        state.critic_params,
        state.critic_opt_state,
    )
    t0 = time.perf_counter()
    live = None if "loss_rows" not in tb else tb["loss_rows"].reshape(prompts, n).any(-1)
    for epoch in range(a.ppo_epochs):  # mini-batches of whole groups (prompt + its n rows)
        shuffle = prompts > per_mb
        if live is None:
            mbs = minibatch_indices(prompts, per_mb, rng, shuffle=shuffle)
        else:  # DAPO: no update of fillers only (rl/dapo.py)
            mbs = dapo.loss_minibatches(live, per_mb, rng, shuffle=shuffle)
        for i, pidx in enumerate(mbs):
            ridx = (pidx[:, None] * n + np.arange(n)[None, :]).reshape(-1)
            mb = run.place.put(
                {k: v[pidx] if k.startswith("prompt_") else v[ridx] for k, v in tb.items()}
            )
            key = state.update_key(step, epoch, i)
            lora, opt, m = run.programs.policy_step(lora, opt, run.base, mb, key)
            if run.programs.critic_update is not None:
                c_params, c_opt, cm = run.programs.critic_update(c_params, c_opt, mb)
                m = {**m, **cm}
            for k, v in jax.device_get(m).items():
                acc.setdefault(k, []).append(float(v))
    state = state.replace(lora=lora, opt_state=opt, critic_params=c_params, critic_opt_state=c_opt)
    out = aggregate_updates(acc)
    # the schedule's value at the first update of this step (updates done before it)
    out["actor/lr"] = float(run.programs.lr((step - 1) * sizes.updates_per_step))
    out["time/update"] = time.perf_counter() - t0
    return state, out


def run_eval(run: Run, state: TrainState, step: int) -> dict[str, float]:
    """Greedy held-out evaluation on the current adapter; writes val_samples_step{step}.jsonl."""
    if not run.val_examples:
        return {}
    static, programs = run.static, run.programs
    process.release_free_memory()
    t0 = time.perf_counter()
    w = programs.merge(run.base, state.lora)
    spec = static.evaluation  # greedy, one sample per prompt
    metrics, records = evaluate(
        lambda tokens, mask, key: programs.generate(w, tokens, mask, key, spec),
        run.val_examples,
        static.tokenizer,
        run.reward,
        batch_size=static.cfg.data.val_batch_size,
        max_prompt_length=static.cfg.rollout.max_prompt_length,
        pad_id=spec.pad_id,
        pad_multiple=static.cfg.data.pad_multiple,
    )
    metrics["time/eval"] = time.perf_counter() - t0
    _peak(metrics, "eval")
    if not distributed.is_primary():
        return metrics
    path = os.path.join(static.cfg.trainer.output_dir, f"val_samples_step{step}.jsonl")
    with open(path, "w") as f:
        for r in records[:50]:
            f.write(json.dumps(r) + "\n")
    return metrics


def _peak(metrics: dict, phase: str) -> None:
    """`perf/peak_rss_{phase}_gib`: the process's peak RSS so far, read as `phase` ends."""
    gib = process.peak_rss_gib()
    if gib is not None:
        metrics[f"perf/peak_rss_{phase}_gib"] = gib


def train(cfg: RunConfig) -> dict:
    """Runs the whole job; returns a summary (first/last validation and final paths)."""
    return train_run(build(cfg))


def train_run(run: Run) -> dict:
    """The loop over a built run (tests and scripts may swap a part of it first)."""
    try:
        return _loop(run)
    except BaseException:
        if run.ckpt is not None:  # finish pending saves: the last checkpoint stays restorable
            close_after_error(run.ckpt)
        raise


def close_after_error(ckpt) -> None:
    """Closes the checkpointer of a failed run and says which checkpoint a resume will use (a
    save that failed, e.g. on a full disk, never replaces the previous finalised step)."""
    try:
        ckpt.close()
    except Exception as e:  # noqa: BLE001  (the run's own error is the one to report)
        print(
            f"warning: a pending checkpoint save failed: {' '.join(str(e).split())}",
            file=sys.stderr,
        )
    steps = run_dir.checkpoint_steps(str(ckpt.directory))
    if steps and distributed.is_primary():
        print(
            f"note: checkpoint step {max(steps)} in {ckpt.directory} is intact; "
            "--config.trainer.resume=True continues from it",
            file=sys.stderr,
        )


def _loop(run: Run) -> dict:
    cfg = run.static.cfg
    tc = cfg.trainer
    gate = LogpGapGate(cfg.rollout.max_logp_gap, cfg.rollout.logp_gap_action)
    guards = RunGuards.from_config(cfg, run.static.sizes.updates_per_step)
    summary: dict = {"start_step": run.state.step}
    if tc.eval_before and run.state.step == 0:
        m = run_eval(run, run.state, 0)
        if m:
            run.logger.log(0, m)
            summary["val_before"] = m
    while run.state.step < tc.steps:
        state, step = run.state, run.state.step + 1
        t0 = time.perf_counter()
        batch = next(run.data_iter)
        state, tb, metrics = rollout_step(run, state, batch, step)
        _peak(metrics, "rollout")
        state, um = update(run, state, tb, step)
        metrics.update(um)
        _peak(metrics, "update")
        metrics["actor/adapter_absmax"] = adapter_absmax(state.lora)
        gate.check(step, metrics)
        samples = int(metrics.get("data/gen_samples", len(tb["responses"])))
        guards.check(step, metrics, samples=samples)  # before the checkpoint
        n_tok = float(np.asarray(tb["response_mask"]).sum())
        metrics["time/step"] = time.perf_counter() - t0
        metrics["perf/tokens_per_s"] = n_tok / metrics["time/step"]
        metrics["data/overlong_filtered"] = float(run.num_overlong)
        run.state = state = state.replace(step=step)
        if tc.eval_interval and step % tc.eval_interval == 0 and step < tc.steps:
            metrics.update(run_eval(run, state, step))
        if step % tc.log_interval == 0 or step == tc.steps:
            run.logger.log(step, metrics)
        save_checkpoint(run, force=step == tc.steps)
    final = run_eval(run, run.state, run.state.step)
    if final:
        run.logger.log(run.state.step, final)
        summary["val_after"] = final
    summary.update(export_final(run))
    return dataclasses.asdict(tc) | summary
