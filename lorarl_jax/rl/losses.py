"""PPO-family losses as pure array functions: clipped / dual-clip policy loss, GSPO (sequence
and token level), CISPO, KL estimators, value loss and loss aggregation modes.

Design: each function reproduces its counterpart in verl's `verl/trainer/ppo/core_algos.py`
(`compute_policy_loss_vanilla` / `_gspo` / `_cispo`, `agg_loss`, `kl_penalty`,
`compute_value_loss`) and
`ray_trainer.apply_kl_penalty`, so verl recipes transfer unchanged. Losses
return `(scalar, metrics)` with metrics as a flat dict of scalars; string options are Python
values resolved at trace time, so every function jits with them held static. The train step
combines the pieces (verl's dp_actor):

    loss = pg_loss - entropy_coeff * entropy_bonus + kl_loss_coef * kl_loss

Inputs are token matrices `[B, T]` over response tokens; `mask_BxT` is 1 on response tokens.
The masked reductions (`masked_sum`, `masked_mean`) come from `lorarl_jax.rl.masked`; the
host-side KL controllers for KL-in-reward (fixed / adaptive beta) live in
`lorarl_jax.rl.kl_control`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lorarl_jax.rl.masked import masked_mean, masked_sum

Array = jax.Array

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")


def agg_denominator(
    mask_BxT: Array,
    loss_agg_mode: str,
    loss_scale_factor: float | None = None,
    rows: Array | None = None,
):
    """D of `agg_loss` for a whole (mini-)batch mask; m = mask, B rows, C = loss_scale_factor.

    token-mean:              D = sum(m)                        (tokens)
    seq-mean-token-sum:      D = B                             (sequences)
    seq-mean-token-mean:     D = #{b : sum_t m_bt > 0}         (non-empty sequences)
    seq-mean-token-sum-norm: D = B * C,  C = loss_scale_factor (Dr.GRPO's constant; T if None)

    `rows`: B when some rows are not in the batch at all (DAPO's fillers and filtered rows,
    whose mask is 0: `rl/dapo.py`); None: every row of the mask counts, empty or not.
    The train step computes D once over the whole mini-batch and hands it to every micro-batch's
    `agg_loss`, then sums the micro-batch losses and gradients: the result is the mini-batch's
    loss whatever the micro-batch size or the number of data shards (as verl and TRL now do).
    D is clamped to >= 1, so an all-masked batch gives a zero loss.
    """
    m = mask_BxT.astype(jnp.float32)
    B = jnp.asarray(m.shape[0] if rows is None else rows, jnp.float32)
    if loss_agg_mode == "token-mean":
        d = jnp.sum(m)
    elif loss_agg_mode == "seq-mean-token-sum":
        d = B
    elif loss_agg_mode == "seq-mean-token-mean":
        d = jnp.sum((jnp.sum(m, axis=-1) > 0).astype(jnp.float32))
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        c = loss_scale_factor or m.shape[-1]  # None / 0: this batch's T (config sets a constant)
        d = B * c
    else:
        raise ValueError(f"invalid loss_agg_mode {loss_agg_mode!r}; valid: {list(AGG_MODES)}")
    return jnp.maximum(d, 1.0)


def agg_loss(
    loss_mat_BxT: Array,
    mask_BxT: Array,
    loss_agg_mode: str = "token-mean",
    loss_scale_factor: float | None = None,
    denominator: Array | None = None,
) -> Array:
    """Aggregate a token loss matrix into a scalar: numerator / D; L = loss, m = mask.

    token-mean:              sum(L*m) / sum(m)
    seq-mean-token-sum:      sum_b sum_t L*m / B
    seq-mean-token-mean:     sum_b [sum_t L*m / sum_t m] / #{non-empty rows}  (empty rows left out)
    seq-mean-token-sum-norm: sum(L*m) / (B * C),  C = loss_scale_factor (a fixed constant, verl's
                             name; Dr.GRPO; equals TRL's loss_type="dr_grpo")

    `denominator`: D computed over the whole mini-batch (`agg_denominator`); None: this batch's.
    """
    if denominator is None:
        denominator = agg_denominator(mask_BxT, loss_agg_mode, loss_scale_factor)
    if loss_agg_mode == "seq-mean-token-mean":
        tokens_B = jnp.sum(mask_BxT.astype(loss_mat_BxT.dtype), axis=-1)
        seq_B = masked_sum(loss_mat_BxT, mask_BxT, axis=-1) / jnp.maximum(tokens_B, 1.0)
        numerator = jnp.sum(jnp.where(tokens_B > 0, seq_B, 0.0))
    elif loss_agg_mode in AGG_MODES:
        numerator = masked_sum(loss_mat_BxT, mask_BxT)
    else:
        raise ValueError(f"invalid loss_agg_mode {loss_agg_mode!r}; valid: {list(AGG_MODES)}")
    return numerator / denominator


def token_mean(x_BxT: Array, mask_BxT: Array, n_tokens: Array | None = None) -> Array:
    """sum(x*m) / n_tokens (default: this batch's sum(m), clamped to >= 1); with the whole
    mini-batch's token count, micro-batch values add up to the mini-batch's mean."""
    if n_tokens is None:
        n_tokens = agg_denominator(mask_BxT, "token-mean")
    return masked_sum(x_BxT, mask_BxT) / n_tokens


def policy_loss(
    logp_BxT: Array,
    old_logp_BxT: Array,
    adv_BxT: Array,
    mask_BxT: Array,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
    loss_scale_factor: float | None = None,
    weights_BxT: Array | None = None,
    denominator: Array | None = None,
    n_tokens: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Clipped PPO surrogate with dual clip (verl's compute_policy_loss_vanilla).

    d = clip(logp - old_logp, -20, 20);  r = exp(d)
    L1 = -A*r;  L2 = -A*clip(r, 1-eps_low, 1+eps_high);  Lc = max(L1, L2)
    L3 = -A*c;  L = min(L3, Lc) where A < 0 else Lc          (dual clip, c > 1)
    loss = agg_loss(L * w, mask, loss_agg_mode)   w: detached rollout-correction weights (or 1)
    metrics: pg_clipfrac = mean_m[L2 > L1], pg_clipfrac_lower = mean_m[Lc > L3 and A < 0],
             ppo_kl = mean_m[-d]; token means over `n_tokens` (the mini-batch's count).
    """
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c (dual-clip lower bound) must be > 1.0, got {clip_ratio_c}")
    neg_kl_BxT = jnp.clip(logp_BxT - old_logp_BxT, -20.0, 20.0)
    ratio_BxT = jnp.exp(neg_kl_BxT)
    pg1_BxT = -adv_BxT * ratio_BxT
    pg2_BxT = -adv_BxT * jnp.clip(ratio_BxT, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    clip1_BxT = jnp.maximum(pg1_BxT, pg2_BxT)
    pg3_BxT = -adv_BxT * clip_ratio_c
    clip2_BxT = jnp.minimum(pg3_BxT, clip1_BxT)
    negative_BxT = adv_BxT < 0
    losses_BxT = jnp.where(negative_BxT, clip2_BxT, clip1_BxT)
    if weights_BxT is not None:
        losses_BxT = losses_BxT * jax.lax.stop_gradient(weights_BxT)
    dtype = losses_BxT.dtype
    metrics = {
        "pg_clipfrac": token_mean((pg2_BxT > pg1_BxT).astype(dtype), mask_BxT, n_tokens),
        "pg_clipfrac_lower": token_mean(
            ((clip1_BxT > pg3_BxT) & negative_BxT).astype(dtype), mask_BxT, n_tokens
        ),
        "ppo_kl": token_mean(-neg_kl_BxT, mask_BxT, n_tokens),
    }
    loss = agg_loss(losses_BxT, mask_BxT, loss_agg_mode, loss_scale_factor, denominator)
    return loss, metrics


POLICY_LOSSES = ("vanilla", "gspo", "gspo_token", "cispo")


def sequence_log_ratio(logp_BxT: Array, old_logp_BxT: Array, mask_BxT: Array) -> Array:
    """log s_b = min(sum_t m(logp - old_logp) / max(sum_t m, 1), 10): GSPO's length-normalised
    sequence log-ratio [B] (the log of the geometric mean of the token ratios)."""
    m = mask_BxT.astype(logp_BxT.dtype)
    d_B = masked_sum(logp_BxT - old_logp_BxT, m, axis=-1) / jnp.maximum(m.sum(-1), 1.0)
    return jnp.minimum(d_B, 10.0)


def gspo_policy_loss(
    logp_BxT: Array,
    old_logp_BxT: Array,
    adv_BxT: Array,
    mask_BxT: Array,
    *,
    clip_ratio_low: float = 3e-4,
    clip_ratio_high: float = 4e-4,
    token_level: bool = False,
    loss_agg_mode: str = "seq-mean-token-mean",
    loss_scale_factor: float | None = None,
    weights_BxT: Array | None = None,
    denominator: Array | None = None,
    n_tokens: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """GSPO (Zheng et al. 2025, arXiv:2507.18071; verl `gspo`, TRL importance_sampling_level).

    s_b = exp(log s_b)  (sequence_log_ratio: geometric mean of the token ratios)
    gspo:        r_bt = s_b                      gradient through s_b: s_b · mean_t ∇logp_bt
    gspo_token:  r_bt = exp(sg[log s_b] + logp_bt − sg[logp_bt])   value s_b, gradient
                 s_b · ∇logp_bt (token advantages keep their own weight)
    L_bt = max(−A_bt r_bt, −A_bt clip(r_bt, 1 − eps_low, 1 + eps_high));  no dual clip
    loss = agg_loss(L · w, mask, loss_agg_mode)  (the paper's is seq-mean-token-mean)
    metrics: pg_clipfrac = token mean of [the sequence ratio was clipped], pg_clipfrac_lower
    the part of it below 1 − eps_low, ppo_kl = mean_m[old − logp], seq_ratio_mean = token mean
    of s_b.
    """
    log_s_B = sequence_log_ratio(logp_BxT, old_logp_BxT, mask_BxT)
    if token_level:
        sg = jax.lax.stop_gradient
        log_r_BxT = sg(log_s_B)[:, None] + logp_BxT - sg(logp_BxT)
    else:
        log_r_BxT = jnp.broadcast_to(log_s_B[:, None], logp_BxT.shape)
    ratio_BxT = jnp.exp(log_r_BxT)
    clipped_BxT = jnp.clip(ratio_BxT, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    pg1_BxT, pg2_BxT = -adv_BxT * ratio_BxT, -adv_BxT * clipped_BxT
    losses_BxT = jnp.maximum(pg1_BxT, pg2_BxT)
    if weights_BxT is not None:
        losses_BxT = losses_BxT * jax.lax.stop_gradient(weights_BxT)
    dtype = losses_BxT.dtype
    low_BxT = ratio_BxT < 1.0 - clip_ratio_low
    metrics = {
        "pg_clipfrac": token_mean((pg2_BxT > pg1_BxT).astype(dtype), mask_BxT, n_tokens),
        "pg_clipfrac_lower": token_mean(
            ((pg2_BxT > pg1_BxT) & low_BxT).astype(dtype), mask_BxT, n_tokens
        ),
        "ppo_kl": token_mean(old_logp_BxT - logp_BxT, mask_BxT, n_tokens),
        "seq_ratio_mean": token_mean(jax.lax.stop_gradient(ratio_BxT), mask_BxT, n_tokens),
    }
    loss = agg_loss(losses_BxT, mask_BxT, loss_agg_mode, loss_scale_factor, denominator)
    return loss, metrics


def cispo_policy_loss(
    logp_BxT: Array,
    old_logp_BxT: Array,
    adv_BxT: Array,
    mask_BxT: Array,
    *,
    clip_ratio_low: float = 1.0,
    clip_ratio_high: float = 5.0,
    loss_agg_mode: str = "token-mean",
    loss_scale_factor: float | None = None,
    weights_BxT: Array | None = None,
    denominator: Array | None = None,
    n_tokens: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """CISPO (MiniMax-M1, arXiv:2506.13585; verl `cispo`): clip the importance weight, not the
    update, so no token leaves the gradient.

    r = exp(clip(logp − old_logp, −20, 20));  ŵ = sg[clip(r, 1 − eps_low, 1 + eps_high)]
    L_bt = −ŵ_bt · A_bt · logp_bt     (gradient −ŵ·A·∇logp for every token)
    loss = agg_loss(L · w, mask, loss_agg_mode)
    metrics: pg_clipfrac = mean_m[r > 1 + eps_high], pg_clipfrac_lower = mean_m[r < 1 − eps_low],
    ppo_kl = mean_m[old − logp]. eps_low = 1 (the default): no lower bound, as the paper.
    """
    neg_kl_BxT = jnp.clip(logp_BxT - old_logp_BxT, -20.0, 20.0)
    ratio_BxT = jax.lax.stop_gradient(jnp.exp(neg_kl_BxT))
    w_is_BxT = jnp.clip(ratio_BxT, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    losses_BxT = -w_is_BxT * adv_BxT * logp_BxT
    if weights_BxT is not None:
        losses_BxT = losses_BxT * jax.lax.stop_gradient(weights_BxT)
    dtype = losses_BxT.dtype
    metrics = {
        "pg_clipfrac": token_mean(
            (ratio_BxT > 1.0 + clip_ratio_high).astype(dtype), mask_BxT, n_tokens
        ),
        "pg_clipfrac_lower": token_mean(
            (ratio_BxT < 1.0 - clip_ratio_low).astype(dtype), mask_BxT, n_tokens
        ),
        "ppo_kl": token_mean(-neg_kl_BxT, mask_BxT, n_tokens),
    }
    loss = agg_loss(losses_BxT, mask_BxT, loss_agg_mode, loss_scale_factor, denominator)
    return loss, metrics


def kl_penalty(logp_BxT: Array, ref_logp_BxT: Array, kl_type: str) -> Array:
    """Per-token KL estimate of pi vs pi_ref (Schulman's k1/k2/k3), verl's kl_penalty.

    d = logp - ref_logp
    kl / k1:          d
    abs:              |d|
    mse / k2:         d^2 / 2
    low_var_kl / k3:  clip(exp(u) - u - 1, -10, 10) with u = clip(-d, -20, 20)
    """
    if kl_type in ("kl", "k1"):
        return logp_BxT - ref_logp_BxT
    if kl_type == "abs":
        return jnp.abs(logp_BxT - ref_logp_BxT)
    if kl_type in ("mse", "k2"):
        return 0.5 * jnp.square(logp_BxT - ref_logp_BxT)
    if kl_type in ("low_var_kl", "k3"):
        u_BxT = jnp.clip(ref_logp_BxT - logp_BxT, -20.0, 20.0)
        return jnp.clip(jnp.exp(u_BxT) - u_BxT - 1.0, -10.0, 10.0)
    raise ValueError(f"unknown kl_type {kl_type!r}; valid: {list(KL_TYPES)}")


def kl_loss(
    logp_BxT: Array,
    ref_logp_BxT: Array,
    mask_BxT: Array,
    kl_type: str = "low_var_kl",
    loss_agg_mode: str = "token-mean",
    loss_scale_factor: float | None = None,
    denominator: Array | None = None,
) -> Array:
    """KL-in-loss term (use_kl_loss): agg_loss(kl_penalty(logp, ref_logp, kl_type), mask)."""
    kl_BxT = kl_penalty(logp_BxT, ref_logp_BxT, kl_type)
    return agg_loss(kl_BxT, mask_BxT, loss_agg_mode, loss_scale_factor, denominator)


def entropy_bonus(
    entropy_BxT: Array,
    mask_BxT: Array,
    loss_agg_mode: str = "token-mean",
    loss_scale_factor: float | None = None,
    denominator: Array | None = None,
) -> Array:
    """agg_loss(entropy, mask, loss_agg_mode); the step subtracts entropy_coeff times this."""
    return agg_loss(entropy_BxT, mask_BxT, loss_agg_mode, loss_scale_factor, denominator)


def value_loss(
    values_BxT: Array,
    old_values_BxT: Array,
    returns_BxT: Array,
    mask_BxT: Array,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    loss_scale_factor: float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss (verl's compute_value_loss).

    v_c = clip(v, v_old - eps, v_old + eps)
    loss = 0.5 * agg_loss(max((v - R)^2, (v_c - R)^2), mask)
    metrics: vf_clipfrac = mean_m[(v_c - R)^2 > (v - R)^2].
    """
    clipped_BxT = jnp.clip(
        values_BxT, old_values_BxT - cliprange_value, old_values_BxT + cliprange_value
    )
    loss1_BxT = jnp.square(values_BxT - returns_BxT)
    loss2_BxT = jnp.square(clipped_BxT - returns_BxT)
    loss_BxT = jnp.maximum(loss1_BxT, loss2_BxT)
    loss = 0.5 * agg_loss(loss_BxT, mask_BxT, loss_agg_mode, loss_scale_factor)
    clipfrac = masked_mean((loss2_BxT > loss1_BxT).astype(loss1_BxT.dtype), mask_BxT)
    return loss, {"vf_clipfrac": clipfrac}


def apply_kl_penalty(
    token_scores_BxT: Array,
    logp_BxT: Array,
    ref_logp_BxT: Array,
    mask_BxT: Array,
    kl_coef: float | Array,
    kl_type: str = "kl",
) -> tuple[Array, Array]:
    """KL-in-reward (verl's ray_trainer.apply_kl_penalty); logp is the rollout (old) policy.

    kl = kl_penalty(logp, ref_logp) * m;  rewards = scores - beta * kl
    current_kl = mean_b [ sum_t kl*m / sum_t m ]
    The trainer then calls kl_ctrl.update(current_kl, n_steps=batch_size).
    """
    mask_BxT = mask_BxT.astype(token_scores_BxT.dtype)
    kl_BxT = kl_penalty(logp_BxT, ref_logp_BxT, kl_type) * mask_BxT
    rewards_BxT = token_scores_BxT - kl_coef * kl_BxT
    current_kl = jnp.mean(masked_mean(kl_BxT, mask_BxT, axis=-1))
    return rewards_BxT, current_kl
