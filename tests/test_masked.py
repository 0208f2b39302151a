"""Golden tests for lorarl_jax.rl.masked: every number below is worked out by hand."""

import math

import jax.numpy as jnp
import numpy as np

from lorarl_jax.rl import masked


def _close(x, y, tol=1e-5):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_var_whiten():
    x = jnp.array([[1.0, 2.0, 100.0], [3.0, jnp.nan, 4.0]])
    m = jnp.array([[1, 1, 0], [1, 0, 1]])
    # masked values {1, 2, 3, 4}: mean 2.5; NaN and 100 sit under zeros of the mask.
    _close(masked.masked_mean(x, m), 2.5)
    # deviations -1.5, -0.5, 0.5, 1.5 -> squares sum 5 -> biased 5/4, unbiased 5/3
    _close(masked.masked_var(x, m, unbiased=False), 1.25)
    _close(masked.masked_var(x, m), 5.0 / 3.0)
    # row means: (1+2)/2 = 1.5, (3+4)/2 = 3.5
    _close(masked.masked_mean(x, m, axis=-1), [1.5, 3.5])
    w = masked.masked_whiten(x, m)
    s = math.sqrt(5.0 / 3.0)
    _close(w[0, :2], [-1.5 / s, -0.5 / s])
    _close(w[1, 2], 1.5 / s)
    # shift_mean=False adds the mean back
    _close(masked.masked_whiten(x, m, shift_mean=False)[0, 0], -1.5 / s + 2.5)


def test_masked_var_single_token_is_finite():
    # verl raises for a single masked token; here the Bessel factor is skipped: var 0.
    x = jnp.array([[3.0, 7.0]])
    m = jnp.array([[1, 0]])
    _close(masked.masked_var(x, m), 0.0)
    _close(masked.masked_whiten(x, m)[0, 0], 0.0)


# ---------------------------------------------------------------- power-of-two scaling


def test_pow2_scale():
    x = jnp.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 1e38, 3.4e38, jnp.inf, jnp.nan])
    s = np.asarray(masked._pow2_scale(x))
    # capped at 2^126 so that 1 / s is normal (XLA computes x / s as x * (1 / s))
    np.testing.assert_array_equal(s, [1, 1, 1, 2, 2, 4, 2.0**126, 2.0**126, 1, 1])
    assert float(masked._pow2_scale(jnp.float32(2.0**100))) == 2.0**100  # exact powers stay
