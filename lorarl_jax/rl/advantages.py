"""Advantage estimators: GRPO / Dr.GRPO, RLOO, REINFORCE++ and GAE as pure array functions.

Design: every estimator maps rewards (and values for GAE) plus the response mask to a pair
`(advantages_BxT, returns_BxT)`, mirroring verl's `verl/trainer/ppo/core_algos.py` number for
number so results and hyper-parameters carry over. Nothing here takes a model or a config;
`compute_advantages` is the one string switch the trainer needs.

Groups (the samples drawn for one prompt) are given either as an int `n` (contiguous blocks:
samples i*n .. i*n+n-1 belong to prompt i, what our sampler emits; a reshape, O(B)) or as an
explicit `group_ids_B` array (any integer ids; an O(B^2) equality matrix, cheap for RL batch
sizes and jit-friendly because no segment count has to be static). Time recursions (GAE,
REINFORCE++ returns) run as one backwards `lax.scan` over T.

Masked statistics (`masked_sum`, `masked_mean`, `masked_var`, `masked_whiten`, verl semantics)
and the power-of-two scaling helpers live in `lorarl_jax.rl.masked`; its docstring explains the
scaling scheme (NaN-safe masked sum, +1e-8, Bessel, x' = x / s with a power of two s).

Range: any finite fp32 reward gives finite, correct advantages. Every statistic here is computed
on x' = x / s with s the power-of-two scale of the finite max |x| (`masked._pow2_scale`): per
group for GRPO/RLOO, over all rewards (and values) for the REINFORCE++/GAE recursions, over the
mask for the final whitening. The scale is put back so that the formulas, epsilons included,
are unchanged:

    GRPO       (x - m) / (std + eps)             = (x' - m') / (std' + eps / s)
    whitening  (x - m) * rsqrt(var + 1e-8)       = (x' - m') * rsqrt(var' + 1e-8 / s^2)
    Dr.GRPO / RLOO / returns                     = s * (the same formula on x')

where eps / s and 1e-8 / s^2 are floored at the dtype's smallest normal number (`masked`
docstring). Rewards in [-1, 1] get s = 1 and therefore results bit-identical to the unscaled
formulas. Normalised outputs (GRPO, whitened advantages) are then always finite; un-normalised
ones (Dr.GRPO and RLOO advantages, GAE and REINFORCE++ returns) are s times a finite value and
can only overflow when the true value itself exceeds the fp32 range.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lorarl_jax.rl.masked import _abs_max, _as_float, _pow2_scale, _scaled_eps, _whiten_scaled

Array = jax.Array
Groups = int | Array

# ------------------------------------------------------------------------------------------
# Group statistics
# ------------------------------------------------------------------------------------------


def _group_stats(scores_B: Array, groups: Groups) -> tuple[Array, Array, Array, Array, Array]:
    """Per-sample (count, scale s, scaled score x' = x / s, mean', std' (ddof=1)), each [B].

    s is the power-of-two scale of the group's max |x| (1 for singleton groups), shared by the
    group's members, so mean' and std' are the statistics of x' and mean = s * mean',
    std = s * std'. std' of a singleton group is NaN here; callers replace singleton statistics.
    """
    scores_B = _as_float(scores_B)
    b = scores_B.shape[0]
    if isinstance(groups, (int, np.integer)):
        groups = int(groups)
        if groups < 1 or b % groups:
            raise ValueError(f"batch size {b} is not a multiple of num_generations {groups}")
        scores_GxN = scores_B.reshape(b // groups, groups)
        scale_G = _pow2_scale(_abs_max(scores_GxN, axis=1))
        if groups == 1:
            scale_G = jnp.ones_like(scale_G)
        scores_GxN = scores_GxN / scale_G[:, None]
        mean_G = jnp.mean(scores_GxN, axis=1)
        std_G = (
            jnp.std(scores_GxN, axis=1, ddof=1) if groups > 1 else jnp.full_like(mean_G, jnp.nan)
        )
        count_B = jnp.full((b,), groups, scores_B.dtype)
        rep = lambda a_G: jnp.repeat(a_G, groups)  # noqa: E731
        return count_B, rep(scale_G), scores_GxN.reshape(b), rep(mean_G), rep(std_G)
    group_ids_B = jnp.asarray(groups)
    if group_ids_B.shape != (b,):
        raise ValueError(f"group_ids_B has shape {group_ids_B.shape}, expected ({b},)")
    same_BxB = (group_ids_B[:, None] == group_ids_B[None, :]).astype(scores_B.dtype)
    count_B = jnp.sum(same_BxB, axis=1)
    scale_B = _pow2_scale(_abs_max(jnp.broadcast_to(scores_B, (b, b)), same_BxB, axis=1))
    scale_B = jnp.where(count_B > 1, scale_B, 1.0)
    scores_B = scores_B / scale_B  # one scale per group: the sums below stay within a group
    mean_B = same_BxB @ scores_B / count_B
    sq_dev_B = (scores_B - mean_B) ** 2  # group mean is shared inside a group
    std_B = jnp.sqrt(same_BxB @ sq_dev_B / (count_B - 1))
    return count_B, scale_B, scores_B, mean_B, std_B


# ------------------------------------------------------------------------------------------
# Outcome-reward estimators
# ------------------------------------------------------------------------------------------


def grpo(
    scores_B: Array,
    groups: Groups,
    mask_BxT: Array,
    *,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
) -> tuple[Array, Array]:
    """GRPO outcome advantage, broadcast over the response tokens.

    A_i = (s_i - mean_g) / (std_g + epsilon)   (std with ddof=1, as torch.std)
    A_i = s_i - mean_g                          if not norm_adv_by_std_in_grpo (Dr.GRPO)
    A singleton group uses mean 0 and std 1. advantages = returns = A_i * mask.

    Evaluated on the group-scaled scores (module docstring): (x' - m') / (std' + eps / s) and
    s * (x' - m'); the normalised form is finite for any finite scores, Dr.GRPO's overflows only
    if the true s_i - mean_g does.

    `groups`: num_generations (int, contiguous blocks) or group_ids_B (int array).
    """
    count_B, scale_B, x_B, mean_B, std_B = _group_stats(scores_B, groups)
    single_B = count_B <= 1  # scale 1 there, so these are the unscaled mean 0 and std 1
    mean_B = jnp.where(single_B, 0.0, mean_B)
    std_B = jnp.where(single_B, 1.0, std_B)
    adv_B = x_B - mean_B
    if norm_adv_by_std_in_grpo:
        adv_B = adv_B / (std_B + _scaled_eps(epsilon, scale_B))
    else:
        adv_B = adv_B * scale_B
    adv_BxT = adv_B[:, None] * mask_BxT.astype(adv_B.dtype)
    return adv_BxT, adv_BxT


def rloo(scores_B: Array, groups: Groups, mask_BxT: Array) -> tuple[Array, Array]:
    """RLOO advantage in verl's form: A_i = n/(n-1) * (s_i - mean_g), i.e. s_i minus the mean of
    the other n-1 samples. As in verl, a singleton group keeps its raw score (no baseline).

    Evaluated as n/(n-1) * (x' - m') * s on the group-scaled scores (module docstring).
    `groups`: n (int, contiguous blocks) or group_ids_B. advantages = returns = A_i * mask.
    """
    scores_B = _as_float(scores_B)
    count_B, scale_B, x_B, mean_B, _ = _group_stats(scores_B, groups)
    factor_B = count_B / jnp.maximum(count_B - 1, 1)
    adv_B = jnp.where(count_B > 1, factor_B * (x_B - mean_B) * scale_B, scores_B)
    adv_BxT = adv_B[:, None] * mask_BxT.astype(adv_B.dtype)
    return adv_BxT, adv_BxT


# ------------------------------------------------------------------------------------------
# Token-level estimators (backwards scans over T)
# ------------------------------------------------------------------------------------------


def reinforce_plus_plus(
    token_rewards_BxT: Array, mask_BxT: Array, gamma: float
) -> tuple[Array, Array]:
    """REINFORCE++: discounted token returns, reset where the mask is 0, then whitened.

    Backwards over t with G = 0:  G = r_t + gamma * G;  R_t = G;  G = G * m_t
    advantages = masked_whiten(R, m) * m;  returns = R.

    The recursion runs on r / s (s: power-of-two scale of max |r|, module docstring); the
    whitening puts s back into its epsilon and returns = s * R'. For gamma <= 1, |R'| <= T.
    """
    token_rewards_BxT = _as_float(token_rewards_BxT)
    mask_BxT = mask_BxT.astype(token_rewards_BxT.dtype)
    scale = _pow2_scale(_abs_max(token_rewards_BxT))

    def step(running_B, rm_t):
        r_B, m_B = rm_t
        running_B = r_B + gamma * running_B
        return running_B * m_B, running_B

    init_B = jnp.zeros(token_rewards_BxT.shape[:1], token_rewards_BxT.dtype)
    xs = ((token_rewards_BxT / scale).T, mask_BxT.T)
    _, returns_TxB = jax.lax.scan(step, init_B, xs, reverse=True)
    returns_BxT = returns_TxB.T  # R' = R / s
    advantages_BxT = _whiten_scaled(returns_BxT, mask_BxT, scale) * mask_BxT
    return advantages_BxT, returns_BxT * scale


def gae(
    token_rewards_BxT: Array, values_BxT: Array, mask_BxT: Array, gamma: float, lam: float
) -> tuple[Array, Array]:
    """GAE as verl's compute_gae_advantage_return (masked tokens are skipped, not zeroed).

    Backwards over t with V' = 0, A' = 0:
        delta_t = r_t + gamma * V' - V_t
        a_t     = delta_t + gamma * lam * A'
        V'      = m_t * V_t + (1 - m_t) * V'
        A'      = m_t * a_t + (1 - m_t) * A';   A_t = A'
    returns = A + V (before whitening);  advantages = masked_whiten(A, m).

    The recursion runs on r / s and V / s (s: power-of-two scale of max(|r|, |V|), module
    docstring); the whitening puts s back into its epsilon and returns = s * (A' + V').
    """
    values_BxT = _as_float(values_BxT)
    mask_BxT = mask_BxT.astype(values_BxT.dtype)
    dtype = jnp.result_type(token_rewards_BxT, values_BxT)
    abs_max = jnp.maximum(
        _abs_max(token_rewards_BxT).astype(dtype), _abs_max(values_BxT).astype(dtype)
    )
    scale = _pow2_scale(abs_max)

    def step(carry, rvm_t):
        next_value_B, last_gae_B = carry
        r_B, v_B, m_B = rvm_t
        delta_B = r_B + gamma * next_value_B - v_B
        gae_B = delta_B + gamma * lam * last_gae_B
        next_value_B = v_B * m_B + (1 - m_B) * next_value_B
        last_gae_B = gae_B * m_B + (1 - m_B) * last_gae_B
        return (next_value_B, last_gae_B), last_gae_B

    zeros_B = jnp.zeros(values_BxT.shape[:1], values_BxT.dtype)
    values_BxT = values_BxT / scale
    xs = ((token_rewards_BxT / scale).T, values_BxT.T, mask_BxT.T)
    _, adv_TxB = jax.lax.scan(step, (zeros_B, zeros_B), xs, reverse=True)
    advantages_BxT = adv_TxB.T  # A' = A / s
    returns_BxT = (advantages_BxT + values_BxT) * scale
    return _whiten_scaled(advantages_BxT, mask_BxT, scale), returns_BxT


# ------------------------------------------------------------------------------------------
# Dispatcher
# ------------------------------------------------------------------------------------------

ESTIMATORS = ("grpo", "drgrpo", "rloo", "reinforce_plus_plus", "gae")


def compute_advantages(
    estimator: str,
    token_rewards_BxT: Array,
    mask_BxT: Array,
    *,
    groups: Groups | None = None,
    values_BxT: Array | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
) -> tuple[Array, Array]:
    """(advantages_BxT, returns_BxT) for one of ESTIMATORS.

    Outcome estimators (grpo, drgrpo, rloo) score a response by s_i = sum_t r_{i,t}, as verl
    does; they need `groups`. "drgrpo" is grpo with norm_adv_by_std_in_grpo=False. gae needs
    `values_BxT`. `groups` as an int must be static under jit.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; valid: {list(ESTIMATORS)}")
    if estimator in ("grpo", "drgrpo", "rloo"):
        if groups is None:
            raise ValueError(f"{estimator} needs groups (num_generations or group_ids_B)")
        scores_B = jnp.sum(token_rewards_BxT, axis=-1)
        if estimator == "rloo":
            return rloo(scores_B, groups, mask_BxT)
        norm = norm_adv_by_std_in_grpo and estimator == "grpo"
        return grpo(scores_B, groups, mask_BxT, norm_adv_by_std_in_grpo=norm, epsilon=epsilon)
    if estimator == "reinforce_plus_plus":
        return reinforce_plus_plus(token_rewards_BxT, mask_BxT, gamma)
    if values_BxT is None:
        raise ValueError("gae needs values_BxT")
    return gae(token_rewards_BxT, values_BxT, mask_BxT, gamma, lam)
