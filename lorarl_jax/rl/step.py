"""The jitted policy update: gradients w.r.t. the trainable tree only, masked optax optimizer.

`make_policy_step` builds one function `step(lora, opt_state, base, batch, key)`:
- `jax.value_and_grad` is taken w.r.t. `lora` alone (the adapter; with `lora.r=0` the whole
  policy's parameters, `rl/policy.py`); `base` is a plain (non-differentiated) argument, so in
  LoRA mode no base-sized gradient is ever materialised.
- The optimizer (`make_optimizer`) is built over the trainable tree: AdamW with warmup + constant
  or cosine schedule, global-norm clipping, and an `optax.masked` wrapper whose mask marks the
  adapter leaves (the `lora_a` / `lora_b` leaves) as trainable, so state is 2 × adapter size +
  counters; in full mode AdamW on the parameters `full.*` selects, zero updates on the rest.
- Each prompt is run once for its n samples (`shared_prompt_logprobs`); the batch is split into
  micro-batches of whole groups, accumulated with `lax.scan`. A micro-batch smaller than a group
  (`group_split` = n / micro-batch rows) runs each group as sub-groups of n / group_split rows,
  each with its own copy of the prompt (`split_groups`): the prompt is computed once per
  sub-group, for an XLA temp that scales with the micro-batch's rows. Every loss term is divided
  by the whole mini-batch's denominator (tokens, sequences or Dr.GRPO's B·C,
  `minibatch_denominators`) and the micro-batch gradients are summed, so the update does not
  depend on the micro-batch size or on how many data shards hold the batch.
- `algo.rollout_is` multiplies the per-token policy loss by detached importance weights
  π_old / π_sampler (`rl/rollout_corr.py`).
- A non-finite loss or gradient skips the update (params and optimizer state unchanged) and is
  reported as `actor/skipped`.

Loss (verl): L = pg_loss(ratio clip, dual clip; × rollout IS weight) + kl_loss_coef · KL(π‖π_ref)
− entropy_coeff · H.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lorarl_jax.config import AlgoCfg, OptimCfg
from lorarl_jax.model.config import ModelConfig
from lorarl_jax.model.lora import LoraConfig
from lorarl_jax.rl import losses, policy, rollout_corr
from lorarl_jax.rl.logprobs import batch_logprobs, shared_prompt_logprobs


def lr_schedule(cfg: OptimCfg, total_steps: int):
    warm = max(cfg.warmup_steps, 0)
    if cfg.schedule == "cosine":
        decay = max(total_steps - warm, 1)
        main = optax.cosine_decay_schedule(cfg.lr, decay, alpha=cfg.min_lr_ratio)
    else:
        main = optax.constant_schedule(cfg.lr)
    if warm == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), main], [warm])


def trainable_mask(tree):
    """True on adapter leaves (`lora_a`/`lora_b`), False elsewhere."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: getattr(p[-1], "key", None) in ("lora_a", "lora_b"), tree
    )


def adamw(cfg: OptimCfg, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (grad_clip > 0) then AdamW on `lr_schedule`, over every leaf."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(
            lr_schedule(cfg, total_steps), cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay
        ),
    )


def make_optimizer(cfg: OptimCfg, total_steps: int, labels=None) -> optax.GradientTransformation:
    """The policy's optimizer: `adamw` masked to the adapter leaves; in full mode (`labels`:
    `policy.param_labels` of the base) to the parameters labelled TRAIN."""
    if labels is not None:
        return policy.masked_optimizer(adamw(cfg, total_steps), labels)
    return optax.masked(adamw(cfg, total_steps), trainable_mask)


def loss_mask(mb):
    """The tokens every loss term reads: `response_mask`, times `loss_rows` [R] when the batch
    has rows that are not in the loss (DAPO's fillers and overlong-filtered rows)."""
    mask = mb["response_mask"]
    if "loss_rows" in mb:
        mask = mask * mb["loss_rows"][:, None].astype(mask.dtype)
    return mask


def minibatch_denominators(batch, algo: AlgoCfg) -> dict[str, jax.Array]:
    """The whole mini-batch's denominators, computed once before it is split into micro-batches:
    `loss` (agg_loss's D for `algo.loss_agg_mode`; rows out of the loss are not counted),
    `tokens` (response tokens: token means of the metrics) and `seqs` (non-empty responses)."""
    mask_RxN, rows = loss_mask(batch), batch.get("loss_rows")
    rows = None if rows is None else jnp.sum(rows)
    return {
        "loss": losses.agg_denominator(mask_RxN, algo.loss_agg_mode, algo.loss_scale_factor, rows),
        "tokens": losses.agg_denominator(mask_RxN, "token-mean"),
        "seqs": losses.agg_denominator(mask_RxN, "seq-mean-token-mean"),
    }


def policy_loss_fn(
    lora,
    base,
    mb,
    key,
    denoms,
    *,
    cfg,
    lcfg,
    algo: AlgoCfg,
    temperature: float,
    n: int,
    labels=None,
):
    """Loss and metrics of one micro-batch: `prompt_tokens`/`prompt_mask` [b, P] and the b·n
    rows of `responses`, `response_mask`, `advantages`, (`old_logp`, `ref_logp`,
    `sampler_logp`) [b·n, N]. Every term is divided by the whole mini-batch's `denoms`, so the
    micro-batch losses, gradients and metrics (except `*_max`) add up to the mini-batch's.
    Optional `loss_rows` [b·n]: 0 takes a row out of every loss term (`loss_mask`).
    `lcfg` None: full-parameter mode, `lora` is the policy's parameters (`rl/policy.py`), whose
    `labels` FREEZE leaves get no gradient."""
    use_dropout = lcfg is not None and lcfg.lora_dropout > 0
    params, adapter = policy.forward_variables(lcfg, base, policy.stop_frozen(lora, labels))
    logp, ent = shared_prompt_logprobs(
        cfg,
        lcfg,
        params,
        adapter,
        mb["prompt_tokens"],
        mb["prompt_mask"],
        mb["responses"],
        mb["response_mask"],
        n,
        temperature,
        algo.logprob_chunk,
        dropout_key=key if use_dropout else None,
        frozen_head=lcfg is not None,  # LoRA never targets the head (config.LINEAR_NAMES)
        entropy_grad=bool(algo.entropy_coeff),
    )
    mask = loss_mask(mb)
    agg = dict(
        loss_agg_mode=algo.loss_agg_mode,
        loss_scale_factor=algo.loss_scale_factor,
        denominator=denoms["loss"],
    )
    # On-policy (one epoch, one mini-batch): π_old is the current policy, so its log-probs are
    # this forward's, detached (as TRL does), which saves a whole forward pass per step.
    on_policy = "old_logp" not in mb
    old_logp = jax.lax.stop_gradient(logp) if on_policy else mb["old_logp"]
    metrics, weights = {}, None
    if algo.rollout_is != "none":
        weights, metrics = rollout_corr.rollout_is_weights(
            old_logp,
            mb["sampler_logp"],
            mask,
            level=algo.rollout_is,
            mode=algo.rollout_is_mode,
            threshold=algo.rollout_is_threshold,
            n_tokens=denoms["tokens"],
            n_seqs=denoms["seqs"],
        )
    pg, m = _policy_loss(algo, logp, old_logp, mb["advantages"], mask, weights, denoms, agg)
    loss = pg
    metrics.update({"actor/pg_loss": pg, **{f"actor/{k}": v for k, v in m.items()}})
    if algo.use_kl_loss:
        kl = losses.kl_loss(logp, mb["ref_logp"], mask, algo.kl_loss_type, **agg)
        loss = loss + algo.kl_loss_coef * kl
        metrics["actor/kl_loss"] = kl
    ent_mean = losses.entropy_bonus(ent, mask, **agg)
    if algo.entropy_coeff:
        loss = loss - algo.entropy_coeff * ent_mean
    metrics["actor/entropy"] = ent_mean
    if on_policy and "sampler_logp" in mb:  # sampler vs trainer on the same weights (verl's
        # rollout_probs_diff); off-policy the trainer computes it against π_old before updating
        gap = jnp.abs(mb["sampler_logp"] - old_logp) * mask
        metrics["rollout/logp_gap_mean"] = gap.sum() / denoms["tokens"]
        metrics["rollout/logp_gap_max"] = gap.max()
    return loss, metrics


def _policy_loss(algo: AlgoCfg, logp, old_logp, adv, mask, weights, denoms, agg):
    """`algo.policy_loss`: vanilla (dual-clip PPO) | gspo | gspo_token | cispo (rl/losses.py)."""
    common = dict(weights_BxT=weights, n_tokens=denoms["tokens"], **agg)
    if algo.policy_loss in ("gspo", "gspo_token"):
        return losses.gspo_policy_loss(
            logp,
            old_logp,
            adv,
            mask,
            clip_ratio_low=algo.gspo_clip_ratio_low,
            clip_ratio_high=algo.gspo_clip_ratio_high,
            token_level=algo.policy_loss == "gspo_token",
            **common,
        )
    if algo.policy_loss == "cispo":
        return losses.cispo_policy_loss(
            logp,
            old_logp,
            adv,
            mask,
            clip_ratio_low=algo.cispo_clip_ratio_low,
            clip_ratio_high=algo.cispo_clip_ratio_high,
            **common,
        )
    return losses.policy_loss(
        logp,
        old_logp,
        adv,
        mask,
        clip_ratio_low=algo.clip_ratio_low,
        clip_ratio_high=algo.clip_ratio_high,
        clip_ratio_c=algo.clip_ratio_c,
        **common,
    )


def split_groups(batch, group_split: int):
    """Each prompt row repeated `group_split` times: [b, P] → [b·k, P], so the b·n response rows
    read as b·k groups of n/k (rows are grouped contiguously by prompt)."""
    if group_split == 1:
        return batch
    return {
        k: jnp.repeat(v, group_split, axis=0) if k.startswith("prompt_") else v
        for k, v in batch.items()
    }


def _split_micro(batch, n_micro: int):
    return jax.tree.map(lambda x: x.reshape((n_micro, x.shape[0] // n_micro) + x.shape[1:]), batch)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def accumulate_grads(
    grad_fn, lora, base, batch, key, n_micro: int, algo: AlgoCfg, micro_sh=None, group_split=1
):
    """Σ over micro-batches of (loss, grad, metrics) of `grad_fn(lora, base, mb, key, denoms)`,
    with `denoms` of the whole batch: exactly the whole batch's loss and gradient (up to float
    summation order). `*_max` metrics take the max over micro-batches. `group_split` > 1: the
    groups are split into sub-groups first (`split_groups`; `grad_fn` takes n / group_split)."""
    denoms = minibatch_denominators(batch, algo)
    micro = _split_micro(split_groups(batch, group_split), n_micro)
    if micro_sh is not None and n_micro > 1:  # [M, rows/M, ...]: scan over M, rows split
        micro = jax.lax.with_sharding_constraint(micro, micro_sh)
    keys = jax.random.split(key, n_micro)

    def acc(carry, xs):
        mb, k = xs
        (loss, metrics), g = grad_fn(lora, base, mb, k, denoms)
        return jax.tree.map(jnp.add, carry, g), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, lora)
    grads, (loss_M, metrics_M) = jax.lax.scan(acc, zeros, (micro, keys))
    metrics = {k: v.max() if k.endswith("_max") else v.sum() for k, v in metrics_M.items()}
    return loss_M.sum(), grads, metrics


def make_policy_step(
    cfg: ModelConfig,
    lcfg: LoraConfig,
    algo: AlgoCfg,
    tx: optax.GradientTransformation,
    temperature: float,
    n: int,
    n_micro: int = 1,
    shardings=None,
    labels=None,
    group_split: int = 1,
):
    """Returns jitted `step(lora, opt_state, base, batch, key) → (lora, opt_state, metrics)`.

    `n` samples per prompt; the batch's rows are split into `n_micro` micro-batches, each of
    whole groups (prompts computed once per group) or, with `group_split` k > 1, of one
    sub-group of n/k rows (its prompt computed once per sub-group). `shardings`: the
    `(lora, opt_state, base, batch)` shardings (`rl/sharding.py`), which the step keeps: the
    updated adapter and optimizer state come out as they went in (donated, updated in place),
    each micro-batch stays split over the batch axes, key and metrics are replicated.
    `lcfg` None: full-parameter mode, `labels` its TRAIN / FREEZE leaves (`rl/policy.py`)."""
    loss_fn = functools.partial(
        policy_loss_fn,
        cfg=cfg,
        lcfg=lcfg,
        algo=algo,
        temperature=temperature,
        n=n // group_split,
        labels=labels,
    )
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    jit_kw, micro_sh = {}, None
    if shardings is not None:
        lora_sh, opt_sh, base_sh, batch_sh = shardings
        repl = NamedSharding(batch_sh.mesh, PartitionSpec())
        micro_sh = NamedSharding(batch_sh.mesh, PartitionSpec(None, *batch_sh.spec))
        jit_kw = dict(
            in_shardings=(lora_sh, opt_sh, base_sh, batch_sh, repl),
            out_shardings=(lora_sh, opt_sh, repl),
        )

    @functools.partial(jax.jit, donate_argnums=(0, 1), **jit_kw)
    def step(lora, opt_state, base, batch, key):
        loss, grads, metrics = accumulate_grads(
            grad_fn, lora, base, batch, key, n_micro, algo, micro_sh, group_split
        )
        ok = _all_finite(grads) & jnp.isfinite(loss)

        def apply(_):
            updates, new_opt = tx.update(grads, opt_state, lora)
            return optax.apply_updates(lora, updates), new_opt

        # a cond, not a per-leaf `where(ok, new, old)`: with the predicate reducing every
        # gradient, XLA:CPU took ~100 s longer to compile the 420 adapter leaves' selects
        new_lora, new_opt = jax.lax.cond(ok, apply, lambda _: (lora, opt_state), None)
        metrics.update(
            {
                "actor/loss": loss,
                "actor/grad_norm": optax.tree.norm(grads),
                "actor/skipped": (~ok).astype(jnp.float32),
            }
        )
        return new_lora, new_opt, metrics

    return step


compute_logprobs = jax.jit(  # single device; the run's sharded program: rl/programs.py
    batch_logprobs, static_argnames=("cfg", "lcfg", "n", "temperature", "chunk")
)
