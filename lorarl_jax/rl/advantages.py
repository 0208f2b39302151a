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

Range: any finite fp32 reward gives finite, correct statistics. A plain fp32 mean of eight
rewards of 1e38 is already inf, and (x - mean)^2 overflows long before that, which used to turn
every advantage into 0 or NaN. So every statistic is computed on x' = x / s with the power of two

    s = 2^ceil(log2(max|x|))   if max|x| > 1,   s = 1 otherwise

(max over the finite entries that enter the statistic; per group for GRPO/RLOO, over the mask for
whitening, over all rewards (and values) for the REINFORCE++/GAE recursions; s is capped at 2^126
in fp32 so that 1 / s stays a normal number). Dividing by a power of two is exact in binary
floating point (up to underflow of entries below 2^-126 * s, which are then negligible next to
max|x| anyway), |x'| <= 4 and no sum or square can overflow. The scale is put back so that the
formulas, epsilons included, are unchanged:

    GRPO       (x - m) / (std + eps)             = (x' - m') / (std' + eps / s)
    whitening  (x - m) * rsqrt(var + 1e-8)       = (x' - m') * rsqrt(var' + 1e-8 / s^2)
    Dr.GRPO / RLOO / returns                     = s * (the same formula on x')

where eps / s and 1e-8 / s^2 are floored at the dtype's smallest normal number: they underflow
for s > ~1e31 (and XLA flushes subnormals to zero on CPU), and at that scale a non-zero spread is
many orders of magnitude above the floor, while a zero spread must give 0 / floor = 0, not 0 / 0.
Rewards in [-1, 1] get s = 1 and therefore results bit-identical to the unscaled formulas.
Normalised outputs (GRPO, whitened advantages) are then always finite; un-normalised ones
(Dr.GRPO and RLOO advantages, GAE and REINFORCE++ returns) are s times a finite value and can
only overflow when the true value itself exceeds the fp32 range. `masked_sum`/`masked_mean` stay
unscaled: the losses use them on O(1) quantities, under grad.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Groups = int | Array

# ------------------------------------------------------------------------------------------
# Power-of-two range scaling
# ------------------------------------------------------------------------------------------


def _as_float(x: Array) -> Array:
    """x as an array of a floating dtype (integers go to the default float; floats are kept)."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


def _abs_max(values: Array, mask: Array | None = None, axis: int | None = None) -> Array:
    """max |x| over the finite (and, with `mask`, masked-in) entries; 0 if there are none."""
    keep = jnp.isfinite(values)
    if mask is not None:
        keep = keep & (mask != 0)
    return jnp.max(jnp.where(keep, jnp.abs(values), 0), axis=axis, initial=0)


def _pow2_scale(abs_max: Array) -> Array:
    """s = 2^ceil(log2(abs_max)) where abs_max > 1 (finite), else 1; elementwise, exact.

    frexp gives abs_max = f * 2^e with f in [0.5, 1), so ceil(log2(abs_max)) is e, or e - 1 when
    f == 0.5 (abs_max a power of two). The exponent is capped so that 1 / s is still a normal
    number (s <= 2^126 in fp32): XLA rewrites x / s as x * (1 / s), and on CPU it flushes the
    subnormal 2^-127 to zero. fp32 values up to 3.4e38 then scale to at most 4. No gradient
    flows through s.
    """
    abs_max = jax.lax.stop_gradient(abs_max)
    frac, exp = jnp.frexp(abs_max)
    max_exp = -jnp.finfo(abs_max.dtype).minexp  # 1 / 2^max_exp = 2^minexp, the smallest normal
    exp = jnp.minimum(jnp.where(frac == 0.5, exp - 1, exp), max_exp)
    one = jnp.ones_like(abs_max)
    return jnp.where(jnp.isfinite(abs_max) & (abs_max > 1), jnp.ldexp(one, exp), one)


def _scaled_eps(eps: float | Array, scale: Array, power: int = 1) -> Array:
    """eps / s^power, floored at the smallest normal number if eps > 0 (eps <= 0 passes through).

    At s = 1 this is eps itself (for eps >= tiny). For large s, eps / s underflows (XLA flushes
    subnormals to zero on CPU) while any non-zero spread of data that large is far above the
    floor; a zero spread then gives 0 / floor = 0 as the unscaled formula does, not 0 / 0.
    """
    value = eps / scale
    for _ in range(power - 1):
        value = value / scale
    return jnp.where(eps > 0, jnp.maximum(value, jnp.finfo(value.dtype).tiny), value)


# ------------------------------------------------------------------------------------------
# Masked statistics (verl semantics)
# ------------------------------------------------------------------------------------------


def masked_sum(values: Array, mask: Array, axis: int | None = None) -> Array:
    """sum(where(mask, values, 0) * mask); NaN/inf at masked-out positions cannot leak."""
    mask = mask.astype(values.dtype)
    return jnp.sum(jnp.where(mask != 0, values, 0) * mask, axis=axis)


def masked_mean(values: Array, mask: Array, axis: int | None = None) -> Array:
    """masked_sum(values) / (sum(mask) + 1e-8). Unscaled (see the module docstring)."""
    return masked_sum(values, mask, axis) / (jnp.sum(mask.astype(values.dtype), axis=axis) + 1e-8)


def _var_unscaled(values: Array, mask: Array, unbiased: bool) -> Array:
    """masked_mean((x - masked_mean(x))^2) * N / (N - 1) with N = sum(mask) (if unbiased)."""
    centered = values - masked_mean(values, mask)
    variance = masked_mean(centered**2, mask)
    if unbiased:
        n = jnp.sum(mask.astype(values.dtype))
        variance = variance * jnp.where(n > 1, n / jnp.maximum(n - 1, 1), 1.0)
    return variance


def masked_var(values: Array, mask: Array, unbiased: bool = True) -> Array:
    """var = masked_mean((x - masked_mean(x))^2) * N / (N - 1) with N = sum(mask) (if unbiased).

    N <= 1 skips the Bessel factor (verl raises there instead). Computed as s^2 * var(x / s)
    (s: power-of-two scale of the masked max |x|), so it only overflows if var itself does.
    """
    values = _as_float(values)
    scale = _pow2_scale(_abs_max(values, mask))
    return _var_unscaled(values / scale, mask, unbiased) * scale * scale


def _whiten_scaled(
    values_scaled: Array, mask: Array, scale: Array, shift_mean: bool = True
) -> Array:
    """masked_whiten of x = scale * x' given x' = values_scaled:

    (x - m) * rsqrt(var + 1e-8) = (x' - m') * rsqrt(var' + 1e-8 / s^2)   (+ m = s * m')
    """
    mean = masked_mean(values_scaled, mask)
    variance = _var_unscaled(values_scaled, mask, unbiased=True)
    whitened = (values_scaled - mean) * jax.lax.rsqrt(variance + _scaled_eps(1e-8, scale, 2))
    return whitened if shift_mean else whitened + mean * scale


def masked_whiten(values: Array, mask: Array, shift_mean: bool = True) -> Array:
    """(x - mean) * rsqrt(var + 1e-8) over masked entries; adds the mean back if not shift_mean.

    Positions outside the mask are transformed too (verl does the same); callers multiply by the
    mask where it matters. Statistics are taken on x / s (s: power-of-two scale of the masked
    max |x|), so any finite input gives finite whitened values.
    """
    values = _as_float(values)
    scale = _pow2_scale(_abs_max(values, mask))
    return _whiten_scaled(values / scale, mask, scale, shift_mean)


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
