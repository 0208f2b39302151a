"""Golden tests for rl/rollout_corr.py (rollout-vs-train importance weights), by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorarl_jax.rl import losses
from lorarl_jax.rl.rollout_corr import rollout_is_weights

LN = math.log
# old − sampler log-probs: row 0 ρ = [3, 0.25, 1], row 1 ρ = [1.5, (masked), (masked)]
SAMPLER = jnp.zeros((2, 3))
OLD = jnp.array([[LN(3.0), LN(0.25), 0.0], [LN(1.5), 9.0, -9.0]])
MASK = jnp.array([[1, 1, 1], [1, 0, 0]])


def _close(x, y, tol=1e-5):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _w(level, mode, c):
    return rollout_is_weights(OLD, SAMPLER, MASK, level=level, mode=mode, threshold=c)


def test_token_truncate():
    w, m = _w("token", "truncate", 2.0)
    _close(w, [[2.0, 0.25, 1.0], [1.5, 0.0, 0.0]])  # min(ρ, 2), 0 off the mask
    _close(m["rollout_is/ratio_mean"], (3 + 0.25 + 1 + 1.5) / 4)
    _close(m["rollout_is/ratio_max"], 3.0)
    _close(m["rollout_is/truncated_frac"], 1 / 4)


def test_token_mask():
    w, m = _w("token", "mask", 2.0)
    _close(w, [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # ρ outside [1/2, 2] dropped
    _close(m["rollout_is/masked_frac"], 2 / 4)


def test_sequence_truncate_and_mask():
    rho0 = 0.75 ** (1 / 3)  # geometric mean of [3, 0.25, 1]
    w, m = _w("sequence", "truncate", 2.0)
    _close(w, [[rho0] * 3, [1.5, 0.0, 0.0]])
    _close(m["rollout_is/ratio_mean"], (rho0 + 1.5) / 2)
    _close(m["rollout_is/ratio_max"], 1.5)
    _close(m["rollout_is/truncated_frac"], 0.0)
    w, m = _w("sequence", "mask", 1.2)  # keep [0.833, 1.2]: row 0 kept, row 1 (1.5) dropped
    _close(w, [[1.0] * 3, [0.0, 0.0, 0.0]])
    _close(m["rollout_is/masked_frac"], 0.5)
    w, _ = _w("sequence", "truncate", 1.2)
    _close(w, [[rho0] * 3, [1.2, 0.0, 0.0]])


def test_weights_multiply_the_token_loss_and_are_detached():
    logp = jnp.array([[-1.0, -2.0, -0.5], [-0.3, -1.0, -1.0]])
    adv = jnp.array([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    w, _ = _w("token", "truncate", 2.0)
    # on-policy ratio 1: L = -A per token; weighted token-mean = -(2 + .25 + 1 - 2·1.5) / 4
    loss, _ = losses.policy_loss(logp, logp, adv, MASK, weights_BxT=w)
    _close(loss, -(2.0 + 0.25 + 1.0 - 2.0 * 1.5) / 4)
    g = jax.grad(lambda o: losses.policy_loss(logp, logp, adv, MASK, weights_BxT=_w_of(o))[0])(OLD)
    _close(g, jnp.zeros_like(OLD))  # no gradient through the weights


def _w_of(old):
    return rollout_is_weights(old, SAMPLER, MASK, level="token", mode="truncate", threshold=2.0)[0]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_ratio_one_leaves_the_loss_unchanged(level, mode):
    rng = np.random.default_rng(0)
    logp = jnp.asarray(rng.normal(size=(2, 3)) - 2.0, jnp.float32)
    old = logp + 0.1
    adv = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
    w, m = rollout_is_weights(old, old, MASK, level=level, mode=mode, threshold=2.0)
    _close(w, MASK.astype(jnp.float32))
    _close(m["rollout_is/ratio_mean"], 1.0)
    for agg in losses.AGG_MODES:
        a, _ = losses.policy_loss(logp, old, adv, MASK, loss_agg_mode=agg)
        b, _ = losses.policy_loss(logp, old, adv, MASK, loss_agg_mode=agg, weights_BxT=w)
        _close(a, b, 1e-6)


def test_bad_level_or_mode():
    with pytest.raises(ValueError, match="token"):
        _w("none", "truncate", 2.0)
    with pytest.raises(ValueError, match="truncate"):
        _w("token", "clip", 2.0)
