"""The RL loop: data → merge → rollout → reward → advantages → log-probs → updates → ckpt/export.

Everything the loop needs is built once in `build` (model, tokenizer, data, optimizer, jitted step,
checkpointer, logger) into a `Run`; `train` then runs the steps. Randomness is explicit: the run
key is split into rollout / update / dropout keys, each folded with the step number, so a resumed
run repeats exactly what an uninterrupted one would have done.

Per step (verl's order):
  merged = merge(base, lora)                      once, fp32 math, for the sampler only
                                                  (rollout.merge=never: base + adapter as is)
  rollout = generate(merged, prompts, n)          tokens, response mask, sampler log-probs
  scores = rewards(completions)                   per sequence, on the last response token
  old_logp = π_θ(tokens), ref_logp = π_ref(tokens)   π_ref = base without adapter (zero delta)
  token_rewards = scores − β·KL  (optional)       fixed or adaptive β
  advantages = estimator(token_rewards)           grpo | drgrpo | rloo | reinforce++ | gae
  ppo_epochs × mini-batches of the jitted step    gradients w.r.t. the adapter only
  sync gate                                       sampler vs trainer log-prob gap
                                                  (rollout.max_logp_gap: warn | error | off)
  run guards (rl/guards.py)                       stop, before the checkpoint, on rewards
                                                  that score nothing, all-skipped updates or
                                                  a runaway adapter
  checkpoint                                      never a non-finite adapter
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

from lorarl_jax import distributed, run_dir
from lorarl_jax.config import RunConfig
from lorarl_jax.rl import advantages as adv_lib
from lorarl_jax.rl import losses
from lorarl_jax.rl.evaluate import decode_responses, evaluate
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


def _masked_mean(x, mask):
    mask = np.asarray(mask, np.float32)
    return float((np.asarray(x) * mask).sum() / max(mask.sum(), 1.0))


def rollout_step(run: Run, batch, step: int):
    """Generation + scoring + reference/old log-probs + advantages → (train batch, metrics)."""
    cfg, rc = run.cfg, run.cfg.rollout
    t0 = time.perf_counter()
    w = run.merge(run.base, run.lora)  # merged, or base + adapter unmerged (rollout.merge)
    jax.block_until_ready(w.params)
    t_merge = time.perf_counter() - t0
    key = jax.random.fold_in(run.keys["rollout"], step)
    n = rc.num_generations
    out = run.generate(  # host prompts in, host (replicated) rollout out
        w.cfg,
        w.params,
        batch["input_ids"],
        batch["attention_mask"],
        key,
        n=n,
        max_new_tokens=rc.max_new_tokens,
        stop_ids=run.stop_ids,
        pad_id=run.pad_id,
        sp=run.sampling,
        lora=w.lora,
        lcfg=w.lcfg,
    )
    del w
    t_rollout = time.perf_counter() - t0 - t_merge

    texts = decode_responses(run.tokenizer, out.tokens, out.lengths)
    prompts = [p for p in batch["raw_prompt"] for _ in range(n)]
    columns = {k: [v for v in batch[k] for _ in range(n)] for k in run.reward_columns}
    t1 = time.perf_counter()
    scores, rmetrics = run.reward(prompts, texts, columns)
    scores = distributed.same_on_all_processes(scores)  # e.g. a timeout on one host only
    t_reward = time.perf_counter() - t1

    Nk = trim_length(out.mask, rc.response_bucket)
    resp, rmask, slogp = out.tokens[:, :Nk], out.mask[:, :Nk], out.logp[:, :Nk]
    seqs = {
        "prompt_tokens": np.asarray(batch["input_ids"], np.int32),
        "prompt_mask": np.asarray(batch["attention_mask"], np.int32),
        "responses": np.asarray(resp, np.int32),
        "response_mask": np.asarray(rmask, np.int32),
    }
    t2 = time.perf_counter()
    lp = lambda lora: run.logprobs(run.base, lora, seqs)  # noqa: E731
    # π_old needs its own forward only when the update is off-policy (several epochs or
    # mini-batches); on-policy the step uses its own detached log-probs.
    old_logp = entropy = None
    if run.off_policy or cfg.algo.use_kl_in_reward:
        old_logp, entropy = lp(run.lora)
    ref_logp = None
    if cfg.algo.use_kl_loss or cfg.algo.use_kl_in_reward:  # π_ref: zero delta or initial adapter
        ref_logp = lp(run.ref_lora)[0]
    t_logp = time.perf_counter() - t2

    token_scores = outcome_token_scores(scores, rmask)
    metrics = {}
    if cfg.algo.use_kl_in_reward:
        token_rewards, kl_now = losses.apply_kl_penalty(
            jnp.asarray(token_scores),
            jnp.asarray(old_logp),
            jnp.asarray(ref_logp),
            jnp.asarray(rmask),
            run.kl_ctl.value,
            cfg.algo.kl_penalty,
        )
        metrics["actor/reward_kl_coef"] = run.kl_ctl.value
        run.kl_ctl.update(float(kl_now), len(scores))
    else:
        token_rewards = token_scores
    values = None
    if cfg.algo.adv_estimator == "gae":  # the critic reads the concatenated sequences
        tokens, attn = build_sequences(batch["input_ids"], batch["attention_mask"], resp, rmask, n)
        values = run.critic.values(tokens, attn, Nk)
    advs, returns = adv_lib.compute_advantages(
        cfg.algo.adv_estimator,
        jnp.asarray(token_rewards),
        jnp.asarray(rmask),
        groups=n,
        values_BxT=None if values is None else jnp.asarray(values),
        gamma=cfg.algo.gamma,
        lam=cfg.algo.lam,
        norm_adv_by_std_in_grpo=cfg.algo.norm_adv_by_std_in_grpo,
    )
    lengths = np.asarray(rmask).sum(-1)
    if old_logp is not None:
        metrics["actor/entropy_old"] = _masked_mean(entropy, rmask)
    if run.off_policy:  # sampler vs trainer on the rollout's weights, before any update;
        # on-policy the policy step measures it on its own forward (one value, one key)
        gap = np.abs(np.asarray(slogp) - np.asarray(old_logp)) * rmask
        metrics["rollout/logp_gap_mean"] = float(gap.sum() / max(rmask.sum(), 1))
        metrics["rollout/logp_gap_max"] = float(gap.max())
    if ref_logp is not None:  # KL(π_old ‖ π_ref), k1 estimate, sampled tokens
        ref_from = old_logp if old_logp is not None else slogp
        metrics["actor/kl"] = _masked_mean(np.asarray(ref_from) - np.asarray(ref_logp), rmask)
    metrics.update(
        {
            **rmetrics,
            "response/length_mean": float(lengths.mean()),
            "response/length_max": float(lengths.max()),
            "response/clipped_frac": float((lengths >= rc.max_new_tokens).mean()),
            "time/merge": t_merge,
            "time/rollout": t_rollout,
            "time/reward": t_reward,
            "time/logprobs": t_logp,
            "perf/rollout_tokens_per_s": float(lengths.sum() / max(t_rollout, 1e-9)),
        }
    )
    train_batch = {
        **seqs,
        "sampler_logp": np.asarray(slogp),
        "advantages": np.asarray(advs),
        "returns": np.asarray(returns),
    }
    if run.off_policy:
        train_batch["old_logp"] = np.asarray(old_logp)
    if cfg.algo.use_kl_loss:
        train_batch["ref_logp"] = np.asarray(ref_logp)
    if values is not None:
        train_batch.update(values=np.asarray(values), tokens=tokens, attention_mask=attn)
    return train_batch, metrics


def aggregate_updates(acc: dict[str, list[float]]) -> dict[str, float]:
    """One step's metrics from its updates' values: `*_max` the max, `actor/skipped` the count
    of skipped updates, everything else the mean over the mini-batch updates."""
    out = {k: float(np.max(v) if k.endswith("_max") else np.mean(v)) for k, v in acc.items()}
    out["actor/skipped"] = float(np.sum(acc.get("actor/skipped", [0.0])))
    return out


def update_step(run: Run, tb, step: int):
    """ppo_epochs × mini-batches of the jitted policy step (and critic step for PPO)."""
    algo, n = run.cfg.algo, run.cfg.rollout.num_generations
    prompts = tb["prompt_tokens"].shape[0]
    per_mb = algo.ppo_mini_batch_size or run.cfg.data.batch_size  # prompts per update
    rng = np.random.default_rng([run.cfg.trainer.seed, step])
    acc: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for epoch in range(algo.ppo_epochs):  # mini-batches of whole groups (prompt + its n rows)
        for i, pidx in enumerate(minibatch_indices(prompts, per_mb, rng, shuffle=prompts > per_mb)):
            ridx = (pidx[:, None] * n + np.arange(n)[None, :]).reshape(-1)
            mb = run.place.put(
                {k: v[pidx] if k.startswith("prompt_") else v[ridx] for k, v in tb.items()}
            )
            key = jax.random.fold_in(jax.random.fold_in(run.keys["update"], step), epoch * 997 + i)
            run.lora, run.opt_state, m = run.policy_step(run.lora, run.opt_state, run.base, mb, key)
            if run.critic is not None:
                m = {**m, **run.critic.update(mb)}
            for k, v in jax.device_get(m).items():
                acc.setdefault(k, []).append(float(v))
    out = aggregate_updates(acc)
    out["actor/lr"] = float(run.lr_schedule(run.opt_steps()))
    out["time/update"] = time.perf_counter() - t0
    return out


def run_eval(run: Run, step: int) -> dict[str, float]:
    if not run.val_examples:
        return {}
    rc = run.cfg.rollout
    t0 = time.perf_counter()
    w = run.merge(run.base, run.lora)
    metrics, records = evaluate(
        w.cfg,
        w.params,
        run.val_examples,
        run.tokenizer,
        run.val_reward,
        batch_size=run.cfg.data.val_batch_size,
        max_prompt_length=rc.max_prompt_length,
        max_new_tokens=rc.max_new_tokens,
        stop_ids=run.stop_ids,
        pad_id=run.pad_id,
        pad_multiple=run.cfg.data.pad_multiple,
        generate_fn=run.generate,
        lora=w.lora,
        lcfg=w.lcfg,
    )
    metrics["time/eval"] = time.perf_counter() - t0
    if not distributed.is_primary():
        return metrics
    path = os.path.join(run.cfg.trainer.output_dir, f"val_samples_step{step}.jsonl")
    with open(path, "w") as f:
        for r in records[:50]:
            f.write(json.dumps(r) + "\n")
    return metrics


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
    cfg = run.cfg
    tc = cfg.trainer
    gate = LogpGapGate(cfg.rollout.max_logp_gap, cfg.rollout.logp_gap_action)
    guards = RunGuards.from_config(cfg, run.updates_per_step)
    summary: dict = {"start_step": run.step}
    if tc.eval_before and run.step == 0:
        m = run_eval(run, 0)
        if m:
            run.logger.log(0, m)
            summary["val_before"] = m
    while run.step < tc.steps:
        step = run.step + 1
        t0 = time.perf_counter()
        batch = next(run.data_iter)
        tb, metrics = rollout_step(run, batch, step)
        metrics.update(update_step(run, tb, step))
        metrics["actor/adapter_absmax"] = adapter_absmax(run.lora)
        gate.check(step, metrics)
        guards.check(step, metrics, samples=len(tb["responses"]))  # before the checkpoint
        n_tok = float(np.asarray(tb["response_mask"]).sum())
        metrics["time/step"] = time.perf_counter() - t0
        metrics["perf/tokens_per_s"] = n_tok / metrics["time/step"]
        metrics["data/overlong_filtered"] = float(run.num_overlong)
        run.step = step
        if tc.eval_interval and step % tc.eval_interval == 0 and step < tc.steps:
            metrics.update(run_eval(run, step))
        if step % tc.log_interval == 0 or step == tc.steps:
            run.logger.log(step, metrics)
        save_checkpoint(run, force=step == tc.steps)
    final = run_eval(run, run.step)
    if final:
        run.logger.log(run.step, final)
        summary["val_after"] = final
    summary.update(export_final(run))
    return dataclasses.asdict(cfg.trainer) | summary
