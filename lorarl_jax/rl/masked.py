"""Masked statistics in verl's semantics, with power-of-two range scaling.

Design: `masked_sum`, `masked_mean`, `masked_var` and `masked_whiten` follow verl's
`verl/utils/torch_functional.py`: NaN-safe masked sum, `+1e-8` in the mean's denominator,
Bessel-corrected variance and `rsqrt(var + 1e-8)` whitening. verl raises when the mask holds a
single token; under jit we cannot raise, so the correction is skipped there (variance 0,
whitened value 0). The losses (`lorarl_jax.rl.losses`), the advantage estimators
(`lorarl_jax.rl.advantages`) and rollout correction all take their masked reductions from here.

Range: any finite fp32 input gives finite, correct statistics. A plain fp32 mean of eight
rewards of 1e38 is already inf, and (x - mean)^2 overflows long before that, which used to turn
every advantage into 0 or NaN. So every statistic is computed on x' = x / s with the power of two

    s = 2^ceil(log2(max|x|))   if max|x| > 1,   s = 1 otherwise

(max over the finite entries that enter the statistic; over the mask for `masked_var` and
`masked_whiten`; the advantage estimators use the same helpers per group or over a whole batch;
s is capped at 2^126 in fp32 so that 1 / s stays a normal number). Dividing by a power of two is
exact in binary floating point (up to underflow of entries below 2^-126 * s, which are then
negligible next to max|x| anyway), |x'| <= 4 and no sum or square can overflow. The scale is put
back so that the formulas, epsilons included, are unchanged:

    variance   var(x)                            = s^2 * var(x')
    whitening  (x - m) * rsqrt(var + 1e-8)       = (x' - m') * rsqrt(var' + 1e-8 / s^2)

where eps / s^k (`_scaled_eps`) is floored at the dtype's smallest normal number: it underflows
for large s (and XLA flushes subnormals to zero on CPU), and at that scale a non-zero spread is
many orders of magnitude above the floor, while a zero spread must give 0 / floor = 0, not 0 / 0.
Inputs in [-1, 1] get s = 1 and therefore results bit-identical to the unscaled formulas.
Whitened values are then always finite; the variance is s^2 times a finite value and only
overflows when the true variance does. `masked_sum`/`masked_mean` stay unscaled: the losses use
them on O(1) quantities, under grad.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

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
