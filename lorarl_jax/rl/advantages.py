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

Masked statistics follow verl's `torch_functional`: NaN-safe masked sum, `+1e-8` in the mean's
denominator, Bessel-corrected variance and `rsqrt(var + 1e-8)` whitening. verl raises when the
mask holds a single token; under jit we cannot raise, so the correction is skipped there
(variance 0, whitened value 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Groups = int | Array

# ------------------------------------------------------------------------------------------
# Masked statistics (verl semantics)
# ------------------------------------------------------------------------------------------


def masked_sum(values: Array, mask: Array, axis: int | None = None) -> Array:
    """sum(where(mask, values, 0) * mask); NaN/inf at masked-out positions cannot leak."""
    mask = mask.astype(values.dtype)
    return jnp.sum(jnp.where(mask != 0, values, 0) * mask, axis=axis)


def masked_mean(values: Array, mask: Array, axis: int | None = None) -> Array:
    """masked_sum(values) / (sum(mask) + 1e-8)."""
    return masked_sum(values, mask, axis) / (jnp.sum(mask.astype(values.dtype), axis=axis) + 1e-8)


def masked_var(values: Array, mask: Array, unbiased: bool = True) -> Array:
    """var = masked_mean((x - masked_mean(x))^2) * N / (N - 1) with N = sum(mask) (if unbiased).

    N <= 1 skips the Bessel factor (verl raises there instead).
    """
    centered = values - masked_mean(values, mask)
    variance = masked_mean(centered**2, mask)
    if unbiased:
        n = jnp.sum(mask.astype(values.dtype))
        variance = variance * jnp.where(n > 1, n / jnp.maximum(n - 1, 1), 1.0)
    return variance


def masked_whiten(values: Array, mask: Array, shift_mean: bool = True) -> Array:
    """(x - mean) * rsqrt(var + 1e-8) over masked entries; adds the mean back if not shift_mean.

    Positions outside the mask are transformed too (verl does the same); callers multiply by the
    mask where it matters.
    """
    mean = masked_mean(values, mask)
    whitened = (values - mean) * jax.lax.rsqrt(masked_var(values, mask) + 1e-8)
    return whitened if shift_mean else whitened + mean


# ------------------------------------------------------------------------------------------
# Group statistics
# ------------------------------------------------------------------------------------------


def _group_stats(scores_B: Array, groups: Groups) -> tuple[Array, Array, Array]:
    """Per-sample (group size, group mean, group std with ddof=1), each shaped [B].

    std of a singleton group is NaN here; callers replace singleton statistics.
    """
    b = scores_B.shape[0]
    if isinstance(groups, (int, np.integer)):
        groups = int(groups)
        if groups < 1 or b % groups:
            raise ValueError(f"batch size {b} is not a multiple of num_generations {groups}")
        scores_GxN = scores_B.reshape(b // groups, groups)
        mean_G = jnp.mean(scores_GxN, axis=1)
        std_G = (
            jnp.std(scores_GxN, axis=1, ddof=1) if groups > 1 else jnp.full_like(mean_G, jnp.nan)
        )
        count_B = jnp.full((b,), groups, scores_B.dtype)
        return count_B, jnp.repeat(mean_G, groups), jnp.repeat(std_G, groups)
    group_ids_B = jnp.asarray(groups)
    if group_ids_B.shape != (b,):
        raise ValueError(f"group_ids_B has shape {group_ids_B.shape}, expected ({b},)")
    same_BxB = (group_ids_B[:, None] == group_ids_B[None, :]).astype(scores_B.dtype)
    count_B = jnp.sum(same_BxB, axis=1)
    mean_B = same_BxB @ scores_B / count_B
    sq_dev_B = (scores_B - mean_B) ** 2  # group mean is shared inside a group
    std_B = jnp.sqrt(same_BxB @ sq_dev_B / (count_B - 1))
    return count_B, mean_B, std_B


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

    `groups`: num_generations (int, contiguous blocks) or group_ids_B (int array).
    """
    count_B, mean_B, std_B = _group_stats(scores_B, groups)
    single_B = count_B <= 1
    mean_B = jnp.where(single_B, 0.0, mean_B)
    std_B = jnp.where(single_B, 1.0, std_B)
    adv_B = scores_B - mean_B
    if norm_adv_by_std_in_grpo:
        adv_B = adv_B / (std_B + epsilon)
    adv_BxT = adv_B[:, None] * mask_BxT.astype(adv_B.dtype)
    return adv_BxT, adv_BxT


def rloo(scores_B: Array, groups: Groups, mask_BxT: Array) -> tuple[Array, Array]:
    """RLOO advantage in verl's form: A_i = n/(n-1) * (s_i - mean_g), i.e. s_i minus the mean of
    the other n-1 samples. As in verl, a singleton group keeps its raw score (no baseline).

    `groups`: n (int, contiguous blocks) or group_ids_B. advantages = returns = A_i * mask.
    """
    count_B, mean_B, _ = _group_stats(scores_B, groups)
    scale_B = count_B / jnp.maximum(count_B - 1, 1)
    adv_B = jnp.where(count_B > 1, scale_B * (scores_B - mean_B), scores_B)
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
    """
    mask_BxT = mask_BxT.astype(token_rewards_BxT.dtype)

    def step(running_B, rm_t):
        r_B, m_B = rm_t
        running_B = r_B + gamma * running_B
        return running_B * m_B, running_B

    init_B = jnp.zeros(token_rewards_BxT.shape[:1], token_rewards_BxT.dtype)
    _, returns_TxB = jax.lax.scan(step, init_B, (token_rewards_BxT.T, mask_BxT.T), reverse=True)
    returns_BxT = returns_TxB.T
    advantages_BxT = masked_whiten(returns_BxT, mask_BxT) * mask_BxT
    return advantages_BxT, returns_BxT


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
    """
    mask_BxT = mask_BxT.astype(values_BxT.dtype)

    def step(carry, rvm_t):
        next_value_B, last_gae_B = carry
        r_B, v_B, m_B = rvm_t
        delta_B = r_B + gamma * next_value_B - v_B
        gae_B = delta_B + gamma * lam * last_gae_B
        next_value_B = v_B * m_B + (1 - m_B) * next_value_B
        last_gae_B = gae_B * m_B + (1 - m_B) * last_gae_B
        return (next_value_B, last_gae_B), last_gae_B

    zeros_B = jnp.zeros(values_BxT.shape[:1], values_BxT.dtype)
    xs = (token_rewards_BxT.T, values_BxT.T, mask_BxT.T)
    _, adv_TxB = jax.lax.scan(step, (zeros_B, zeros_B), xs, reverse=True)
    advantages_BxT = adv_TxB.T
    returns_BxT = advantages_BxT + values_BxT
    return masked_whiten(advantages_BxT, mask_BxT), returns_BxT


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
