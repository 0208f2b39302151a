"""Golden tests for lorarl_jax.rl.advantages: every number below is worked out by hand."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorarl_jax.rl import advantages as adv
from lorarl_jax.rl import masked

EPS = 1e-6


def _close(x, y, tol=1e-5):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


# ---------------------------------------------------------------- GRPO / Dr.GRPO


def test_grpo_single_group():
    # [1,2,3]: mean 2, std(ddof=1) = sqrt((1+0+1)/2) = 1 -> (s-2)/(1+eps)
    a, r = adv.grpo(jnp.array([1.0, 2.0, 3.0]), 3, jnp.ones((3, 2)))
    _close(a[:, 0], [-1 / (1 + EPS), 0.0, 1 / (1 + EPS)])
    _close(a, r)
    _close(a[:, 1], a[:, 0])


def test_grpo_two_groups_and_mask():
    # groups [1,2,3] and [10,10,16]: second has mean 12, deviations -2,-2,4,
    # std = sqrt((4+4+16)/2) = sqrt(12) -> A = [-2,-2,4]/sqrt(12)
    scores = jnp.array([1.0, 2.0, 3.0, 10.0, 10.0, 16.0])
    mask = jnp.array([[1, 1, 0]] * 6)
    a, _ = adv.grpo(scores, 3, mask)
    s12 = math.sqrt(12.0)
    _close(a[:, 0], [-1, 0, 1, -2 / s12, -2 / s12, 4 / s12])
    _close(a[:, 2], np.zeros(6))  # padding gets no advantage


def test_grpo_singleton_group():
    # n = 1: mean 0, std 1 -> A = s/(1+eps)
    a, _ = adv.grpo(jnp.array([5.0, -2.0]), 1, jnp.ones((2, 1)))
    _close(a[:, 0], [5 / (1 + EPS), -2 / (1 + EPS)])


def test_grpo_group_ids_match_contiguous_and_singleton():
    # ids [7,7,3,3,3,9]: group 7 = {1,3}: mean 2, std sqrt(2) -> -1/sqrt2, 1/sqrt2
    # group 3 = {0,6,3}: mean 3, std sqrt((9+9+0)/2) = 3 -> -1, 1, 0
    # group 9 = {4}: singleton -> 4/(1+eps)
    scores = jnp.array([1.0, 3.0, 0.0, 6.0, 3.0, 4.0])
    ids = jnp.array([7, 7, 3, 3, 3, 9])
    a, _ = adv.grpo(scores, ids, jnp.ones((6, 1)))
    r2 = math.sqrt(2.0)
    _close(a[:, 0], [-1 / r2, 1 / r2, -1, 1, 0, 4 / (1 + EPS)])
    # contiguous-block path == explicit-id path
    s = jnp.arange(12.0) ** 2
    a_n, _ = adv.grpo(s, 4, jnp.ones((12, 2)))
    a_ids, _ = adv.grpo(s, jnp.arange(12) // 4, jnp.ones((12, 2)))
    _close(a_n, a_ids)


def test_grpo_constant_group_is_zero():
    # std 0 -> (s - mean)/(0 + eps) = 0/eps = 0
    a, _ = adv.grpo(jnp.array([1.0, 1.0, 1.0]), 3, jnp.ones((3, 1)))
    _close(a, np.zeros((3, 1)))


def test_drgrpo_no_std():
    # [1,2,3,10,10,16] -> minus group means 2 and 12: [-1,0,1,-2,-2,4]; singleton keeps s
    scores = jnp.array([1.0, 2.0, 3.0, 10.0, 10.0, 16.0])
    a, _ = adv.grpo(scores, 3, jnp.ones((6, 1)), norm_adv_by_std_in_grpo=False)
    _close(a[:, 0], [-1, 0, 1, -2, -2, 4])
    a1, _ = adv.grpo(jnp.array([5.0]), 1, jnp.ones((1, 1)), norm_adv_by_std_in_grpo=False)
    _close(a1, [[5.0]])


def test_bad_group_size():
    with pytest.raises(ValueError):
        adv.grpo(jnp.ones(5), 2, jnp.ones((5, 1)))


# ---------------------------------------------------------------- RLOO


def test_rloo_golden():
    # [1,2,3 | 4,5,6], n=3: 3/2 * (s - mean) = 1.5 * [-1,0,1] per group
    # (= s minus mean of the other two: 1-(2+3)/2 = -1.5, ...)
    a, r = adv.rloo(jnp.arange(1.0, 7.0), 3, jnp.ones((6, 2)))
    _close(a[:, 0], [-1.5, 0, 1.5, -1.5, 0, 1.5])
    _close(a, r)


def test_rloo_singleton_keeps_raw_score_like_verl():
    # verl only rewrites scores of groups with >1 response: singleton stays s (baseline 0).
    # ids [0,0,1]: group 0 = {2,4}: 2/1 * (s - 3) = [-2, 2]; group 1 = {7} -> 7
    a, _ = adv.rloo(jnp.array([2.0, 4.0, 7.0]), jnp.array([0, 0, 1]), jnp.ones((3, 1)))
    _close(a[:, 0], [-2.0, 2.0, 7.0])
    a1, _ = adv.rloo(jnp.array([3.0, -1.0]), 1, jnp.ones((2, 1)))
    _close(a1[:, 0], [3.0, -1.0])


# ---------------------------------------------------------------- REINFORCE++


def test_reinforce_plus_plus_resets_at_mask_boundary():
    # r = [0,1,0,2], m = [1,1,0,1], gamma = 0.5, backwards:
    # t3: G = 2            R3 = 2,  G*m3 -> 2
    # t2: G = 0 + .5*2 = 1 R2 = 1,  G*m2 -> 0   (reset)
    # t1: G = 1 + 0 = 1    R1 = 1               (would be 1.5 without the reset)
    # t0: G = 0 + .5*1     R0 = .5
    r = jnp.array([[0.0, 1.0, 0.0, 2.0]])
    m = jnp.array([[1, 1, 0, 1]])
    a, ret = adv.reinforce_plus_plus(r, m, gamma=0.5)
    _close(ret, [[0.5, 1.0, 1.0, 2.0]])
    # whiten over {0.5, 1, 2}: mean 7/6, dev [-2/3, -1/6, 5/6], sq sum 42/36 = 7/6,
    # unbiased var = (7/6)/2 = 7/12 -> divide by sqrt(7/12); masked position -> 0
    s = math.sqrt(7.0 / 12.0)
    _close(a, [[-2 / 3 / s, -1 / 6 / s, 0.0, 5 / 6 / s]])


def test_reinforce_plus_plus_gamma_one_batch():
    # row 0: r=[1,0,1] -> R=[2,1,1]; row 1: r=[0,3,9], m=[1,1,0] -> t2: G=9 (R2=9), reset;
    # R1=3, R0=3. Whitened over {2,1,1,3,3}: mean 2, dev [0,-1,-1,1,1], var 4/4 = 1.
    r = jnp.array([[1.0, 0.0, 1.0], [0.0, 3.0, 9.0]])
    m = jnp.array([[1, 1, 1], [1, 1, 0]])
    a, ret = adv.reinforce_plus_plus(r, m, gamma=1.0)
    _close(ret, [[2, 1, 1], [3, 3, 9]])
    _close(a, [[0, -1, -1], [1, 1, 0]])


# ---------------------------------------------------------------- GAE

R_1x3 = jnp.array([[0.0, 0.0, 1.0]])
V_1x3 = jnp.array([[0.5, 0.25, 0.5]])


def test_gae_gamma1_lam1():
    # t2: delta = 1 - .5 = .5                 A2 = .5
    # t1: delta = 0 + .5 - .25 = .25          A1 = .25 + .5 = .75
    # t0: delta = 0 + .25 - .5 = -.25         A0 = -.25 + .75 = .5
    # (= sum of future rewards 1 minus V_t). returns = A + V = [1, 1, 1]
    a, ret = adv.gae(R_1x3, V_1x3, jnp.ones((1, 3)), gamma=1.0, lam=1.0)
    _close(ret, [[1.0, 1.0, 1.0]])
    _close(ret - V_1x3, [[0.5, 0.75, 0.5]])
    # whiten [.5,.75,.5]: mean 7/12, dev [-1/12, 1/6, -1/12], sq sum 1/24, unbiased 1/48,
    # -> dev * sqrt(48): [-sqrt(3)/3, 2 sqrt(3)/3, -sqrt(3)/3]
    k = math.sqrt(3.0) / 3.0
    _close(a, [[-k, 2 * k, -k]])


def test_gae_gamma_half_lam_half():
    # gamma*lam = .25
    # t2: delta = 1 + 0 - .5 = .5                     A2 = .5
    # t1: delta = 0 + .5*.5 - .25 = 0                 A1 = 0 + .25*.5 = .125
    # t0: delta = 0 + .5*.25 - .5 = -.375             A0 = -.375 + .25*.125 = -.34375
    # returns = A + V = [.15625, .375, 1.0]
    _, ret = adv.gae(R_1x3, V_1x3, jnp.ones((1, 3)), gamma=0.5, lam=0.5)
    _close(ret - V_1x3, [[-0.34375, 0.125, 0.5]])
    _close(ret, [[0.15625, 0.375, 1.0]])


def test_gae_skips_masked_tokens():
    # m = [1,0,1], V = [.5, 9, .5], gamma = lam = 1:
    # t2: delta = .5, A = .5, next V = .5
    # t1 (masked): V' and A' carried through unchanged -> A1 = .5
    # t0: delta = 0 + .5 - .5 = 0, A0 = 0 + .5 = .5; returns = [1, 9.5, 1]
    v = jnp.array([[0.5, 9.0, 0.5]])
    _, ret = adv.gae(R_1x3, v, jnp.array([[1, 0, 1]]), gamma=1.0, lam=1.0)
    _close(ret, [[1.0, 9.5, 1.0]])


# ---------------------------------------------------------------- dispatcher and jit


def test_dispatcher():
    r = jnp.array([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])  # scores = row sums = [1,2,3]
    m = jnp.ones((3, 2))
    a, _ = adv.compute_advantages("grpo", r, m, groups=3)
    _close(a[:, 0], [-1 / (1 + EPS), 0, 1 / (1 + EPS)])
    a, _ = adv.compute_advantages("drgrpo", r, m, groups=3)
    _close(a[:, 0], [-1, 0, 1])
    a, _ = adv.compute_advantages("rloo", r, m, groups=3)
    _close(a[:, 0], [-1.5, 0, 1.5])
    a, ret = adv.compute_advantages("reinforce_plus_plus", r, m, gamma=1.0)
    _close(ret, [[1, 1], [2, 2], [3, 3]])
    _, ret = adv.compute_advantages("gae", R_1x3, jnp.ones((1, 3)), values_BxT=V_1x3)
    _close(ret, [[1.0, 1.0, 1.0]])


def test_dispatcher_errors():
    with pytest.raises(ValueError, match="valid"):
        adv.compute_advantages("ppo", jnp.ones((2, 2)), jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="groups"):
        adv.compute_advantages("grpo", jnp.ones((2, 2)), jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="values"):
        adv.compute_advantages("gae", jnp.ones((2, 2)), jnp.ones((2, 2)))


@pytest.mark.parametrize(
    "fn",
    [
        functools.partial(adv.compute_advantages, "grpo", groups=2),
        functools.partial(adv.compute_advantages, "drgrpo", groups=2),
        functools.partial(adv.compute_advantages, "rloo", groups=2),
        functools.partial(adv.compute_advantages, "reinforce_plus_plus", gamma=0.9),
    ],
)
def test_jit_matches_eager(fn):
    r = jax.random.normal(jax.random.key(0), (4, 5))
    m = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    for eager, jitted in zip(fn(r, m), jax.jit(fn)(r, m), strict=True):
        _close(eager, jitted)


def test_jit_group_ids_and_gae():
    r = jax.random.normal(jax.random.key(1), (4, 3))
    v = jax.random.normal(jax.random.key(2), (4, 3))
    m = jnp.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    ids = jnp.array([0, 1, 0, 1])
    f = lambda r, ids, m: adv.grpo(r.sum(-1), ids, m)
    _close(f(r, ids, m)[0], jax.jit(f)(r, ids, m)[0])
    g = lambda r, v, m: adv.gae(r, v, m, 0.9, 0.95)
    for eager, jitted in zip(g(r, v, m), jax.jit(g)(r, v, m), strict=True):
        _close(eager, jitted)


def test_trim_length_buckets_and_fixed_shape():
    import numpy as np

    from lorarl_jax.rl.experience import outcome_token_scores, trim_length

    mask = np.zeros((2, 48), np.int32)
    mask[0, :20] = 1
    mask[1, :35] = 1
    assert trim_length(mask, 32) == 48  # 35 rounds up to 64, capped at N = 48
    assert trim_length(mask[:, :40] * (np.arange(40) < 20), 32) == 32
    assert trim_length(mask, 0) == 48  # fixed shape
    s = outcome_token_scores([1.0, -2.0], mask)
    assert s[0, 19] == 1.0 and s[1, 34] == -2.0 and s.sum() == -1.0


# ---------------------------------------------------------------- range: power-of-two scaling
# The pre-scaling implementation, verbatim: the unscaled formulas must be reproduced bit for bit
# whenever the power-of-two scale is 1 (rewards and values in [-1, 1]).


def _old_masked_mean(values, mask, axis=None):
    mask_f = mask.astype(values.dtype)
    total = jnp.sum(jnp.where(mask_f != 0, values, 0) * mask_f, axis=axis)
    return total / (jnp.sum(mask_f, axis=axis) + 1e-8)


def _old_masked_var(values, mask, unbiased=True):
    centered = values - _old_masked_mean(values, mask)
    variance = _old_masked_mean(centered**2, mask)
    if unbiased:
        n = jnp.sum(mask.astype(values.dtype))
        variance = variance * jnp.where(n > 1, n / jnp.maximum(n - 1, 1), 1.0)
    return variance


def _old_masked_whiten(values, mask, shift_mean=True):
    mean = _old_masked_mean(values, mask)
    whitened = (values - mean) * jax.lax.rsqrt(_old_masked_var(values, mask) + 1e-8)
    return whitened if shift_mean else whitened + mean


def _old_group_stats(scores_B, groups):
    b = scores_B.shape[0]
    if isinstance(groups, int):
        scores_GxN = scores_B.reshape(b // groups, groups)
        mean_G = jnp.mean(scores_GxN, axis=1)
        std_G = (
            jnp.std(scores_GxN, axis=1, ddof=1) if groups > 1 else jnp.full_like(mean_G, jnp.nan)
        )
        count_B = jnp.full((b,), groups, scores_B.dtype)
        return count_B, jnp.repeat(mean_G, groups), jnp.repeat(std_G, groups)
    same_BxB = (groups[:, None] == groups[None, :]).astype(scores_B.dtype)
    count_B = jnp.sum(same_BxB, axis=1)
    mean_B = same_BxB @ scores_B / count_B
    sq_dev_B = (scores_B - mean_B) ** 2
    std_B = jnp.sqrt(same_BxB @ sq_dev_B / (count_B - 1))
    return count_B, mean_B, std_B


def _old_grpo(scores_B, groups, mask_BxT, *, norm_adv_by_std_in_grpo=True, epsilon=1e-6):
    count_B, mean_B, std_B = _old_group_stats(scores_B, groups)
    single_B = count_B <= 1
    mean_B = jnp.where(single_B, 0.0, mean_B)
    std_B = jnp.where(single_B, 1.0, std_B)
    adv_B = scores_B - mean_B
    if norm_adv_by_std_in_grpo:
        adv_B = adv_B / (std_B + epsilon)
    adv_BxT = adv_B[:, None] * mask_BxT.astype(adv_B.dtype)
    return adv_BxT, adv_BxT


def _old_rloo(scores_B, groups, mask_BxT):
    count_B, mean_B, _ = _old_group_stats(scores_B, groups)
    scale_B = count_B / jnp.maximum(count_B - 1, 1)
    adv_B = jnp.where(count_B > 1, scale_B * (scores_B - mean_B), scores_B)
    adv_BxT = adv_B[:, None] * mask_BxT.astype(adv_B.dtype)
    return adv_BxT, adv_BxT


def _old_reinforce_plus_plus(token_rewards_BxT, mask_BxT, gamma):
    mask_BxT = mask_BxT.astype(token_rewards_BxT.dtype)

    def step(running_B, rm_t):
        r_B, m_B = rm_t
        running_B = r_B + gamma * running_B
        return running_B * m_B, running_B

    init_B = jnp.zeros(token_rewards_BxT.shape[:1], token_rewards_BxT.dtype)
    _, returns_TxB = jax.lax.scan(step, init_B, (token_rewards_BxT.T, mask_BxT.T), reverse=True)
    returns_BxT = returns_TxB.T
    return _old_masked_whiten(returns_BxT, mask_BxT) * mask_BxT, returns_BxT


def _old_gae(token_rewards_BxT, values_BxT, mask_BxT, gamma, lam):
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
    return _old_masked_whiten(advantages_BxT, mask_BxT), advantages_BxT + values_BxT


def _unit_range_batch(seed, b=8, t=6):
    """Rewards and values in [-1, 1] (uniform, with a binary and a constant group), random mask."""
    rng = np.random.default_rng(seed)
    r = rng.uniform(-1, 1, (b, t)).astype(np.float32)
    r[4:8] = rng.integers(0, 2, (4, t))  # 0/1 rewards, the common verifier case
    r[0:4, -1] = 1.0  # exact +-1 entries hit s = 1 from the boundary
    r[1, 0] = -1.0
    v = rng.uniform(-1, 1, (b, t)).astype(np.float32)
    m = (rng.uniform(size=(b, t)) < 0.7).astype(np.float32)
    m[:, 0] = 1
    scores = r.sum(-1) / t  # in [-1, 1]
    scores[8 - 4 :] = 0.3  # a constant group (mean rounding noise must match too)
    return jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), jnp.asarray(scores)


def _bitwise_cases():
    ids = jnp.array([0, 1, 0, 1, 2, 2, 3, 2])  # two pairs, a triple and a singleton
    return {
        "grpo_n4": (lambda r, v, m, s: adv.grpo(s, 4, m), lambda r, v, m, s: _old_grpo(s, 4, m)),
        "grpo_n1": (lambda r, v, m, s: adv.grpo(s, 1, m), lambda r, v, m, s: _old_grpo(s, 1, m)),
        "grpo_ids": (
            lambda r, v, m, s: adv.grpo(s, ids, m),
            lambda r, v, m, s: _old_grpo(s, ids, m),
        ),
        "drgrpo_n4": (
            lambda r, v, m, s: adv.grpo(s, 4, m, norm_adv_by_std_in_grpo=False),
            lambda r, v, m, s: _old_grpo(s, 4, m, norm_adv_by_std_in_grpo=False),
        ),
        "drgrpo_ids": (
            lambda r, v, m, s: adv.grpo(s, ids, m, norm_adv_by_std_in_grpo=False),
            lambda r, v, m, s: _old_grpo(s, ids, m, norm_adv_by_std_in_grpo=False),
        ),
        "rloo_n4": (lambda r, v, m, s: adv.rloo(s, 4, m), lambda r, v, m, s: _old_rloo(s, 4, m)),
        "rloo_ids": (
            lambda r, v, m, s: adv.rloo(s, ids, m),
            lambda r, v, m, s: _old_rloo(s, ids, m),
        ),
        "rpp_g1": (
            lambda r, v, m, s: adv.reinforce_plus_plus(r, m, 1.0),
            lambda r, v, m, s: _old_reinforce_plus_plus(r, m, 1.0),
        ),
        "rpp_g09": (
            lambda r, v, m, s: adv.reinforce_plus_plus(r, m, 0.9),
            lambda r, v, m, s: _old_reinforce_plus_plus(r, m, 0.9),
        ),
        "gae": (
            lambda r, v, m, s: adv.gae(r, v, m, 0.9, 0.95),
            lambda r, v, m, s: _old_gae(r, v, m, 0.9, 0.95),
        ),
        "stats": (
            lambda r, v, m, s: (
                masked.masked_var(r, m),
                masked.masked_var(r, m, unbiased=False),
                masked.masked_whiten(r, m),
                masked.masked_whiten(r, m, shift_mean=False),
            ),
            lambda r, v, m, s: (
                _old_masked_var(r, m),
                _old_masked_var(r, m, unbiased=False),
                _old_masked_whiten(r, m),
                _old_masked_whiten(r, m, shift_mean=False),
            ),
        ),
    }


@pytest.mark.parametrize("name", sorted(_bitwise_cases()))
@pytest.mark.parametrize("jit", [False, True])
def test_unit_range_is_bit_identical_to_unscaled_formula(name, jit):
    """max|x| <= 1 gives s = 1: exactly the numbers of the pre-scaling code.

    Eagerly (how the trainer calls compute_advantages) every op sees bit-identical inputs, so the
    outputs are bit-identical by construction. Under jit XLA's fusion decides reduction orders
    and is not bitwise stable across graph changes even for the old code alone (its jitted
    whitening differs from its eager one in the last bit), so there: agreement to rounding.
    """
    new, old = _bitwise_cases()[name]
    if jit:
        new, old = jax.jit(new), jax.jit(old)
    for seed in range(3):
        batch = _unit_range_batch(seed)
        got, want = new(*batch), old(*batch)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape
            if jit:
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
            else:
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# float64 numpy references of the same formulas (verl's), for the large-magnitude tests.


def _ref_group_ids(groups, b):
    return np.arange(b) // groups if isinstance(groups, int) else np.asarray(groups)


def _ref_grpo(scores, groups, norm=True, eps=EPS):
    x = np.asarray(scores, np.float64)
    ids = _ref_group_ids(groups, len(x))
    out = np.empty_like(x)
    for g in np.unique(ids):
        sel = ids == g
        if sel.sum() == 1:
            out[sel] = x[sel] / (1 + eps) if norm else x[sel]
            continue
        dev = x[sel] - x[sel].mean()
        out[sel] = dev / (x[sel].std(ddof=1) + eps) if norm else dev
    return out


def _ref_rloo(scores, groups):
    x = np.asarray(scores, np.float64)
    ids = _ref_group_ids(groups, len(x))
    out = x.copy()
    for g in np.unique(ids):
        sel = ids == g
        n = sel.sum()
        if n > 1:
            out[sel] = n / (n - 1) * (x[sel] - x[sel].mean())
    return out


def _ref_whiten(x, m):
    x, m = np.asarray(x, np.float64), np.asarray(m, np.float64)
    n = m.sum()
    mean = (x * m).sum() / (n + 1e-8)
    var = (((x - mean) ** 2) * m).sum() / (n + 1e-8) * (n / (n - 1) if n > 1 else 1.0)
    return (x - mean) / np.sqrt(var + 1e-8)


def _ref_rpp(r, m, gamma):
    r, m = np.asarray(r, np.float64), np.asarray(m, np.float64)
    ret, running = np.zeros_like(r), np.zeros(r.shape[0])
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        ret[:, t] = running
        running = running * m[:, t]
    return _ref_whiten(ret, m) * m, ret


def _ref_gae(r, v, m, gamma, lam):
    r, v, m = (np.asarray(a, np.float64) for a in (r, v, m))
    a, next_v, last = np.zeros_like(r), np.zeros(r.shape[0]), np.zeros(r.shape[0])
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_v - v[:, t]
        gae_t = delta + gamma * lam * last
        next_v = v[:, t] * m[:, t] + (1 - m[:, t]) * next_v
        last = gae_t * m[:, t] + (1 - m[:, t]) * last
        a[:, t] = last
    return _ref_whiten(a, m), a + v


def _assert_matches_ref(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), got
    assert np.all(np.abs(want) < np.finfo(np.float32).max)  # the true values are in range
    # atol: entries that cancel to ~0 carry the fp32 rounding of the mean (1e-6 of the scale)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def _large_batch(kind, b=8, t=4):
    """Outcome rewards (last valid token) of magnitude up to 1e38; all valid masks equal length.

    - pm1e38: +-1e38 and random magnitudes in [1e37, 1e38] of both signs;
    - tiny_spread: 3e37 plus small multiples of 2^106 (~8e31, a relative spread of ~1e-6):
      the mean is exact in fp32, but (x - mean)^2 ~ 1e63 overflows unscaled fp32;
    - mix: groups mixing 1e38 with 1, a group of +-1 only, and -1e38 next to 1.
    """
    rng = np.random.default_rng(0)
    if kind == "pm1e38":
        scores = rng.choice([-1.0, 1.0], b) * rng.uniform(1e37, 1e38, b)
        scores[[0, 3, 5]] = [1e38, -1e38, 1e38]
    elif kind == "tiny_spread":
        unit = 2.0**106
        scores = (np.round(3e37 / unit) + rng.integers(-3, 4, b)) * unit
        scores[:2] = np.round(3e37 / unit) * unit + np.array([0, 1]) * unit
    else:
        scores = np.array([1e38, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 0.0])
        scores = np.concatenate([scores, [-1e38, 1.0, 1e38, 1.0]])
        b = len(scores)
    scores = scores.astype(np.float32)
    r = np.zeros((b, t), np.float32)
    r[:, -1] = scores
    m = np.ones((b, t), np.float32)
    v = (rng.uniform(-1, 1, (b, t)) * np.abs(scores)[:, None] * 0.5).astype(np.float32)
    return r, v, m, scores


LARGE = ["pm1e38", "tiny_spread", "mix"]


@pytest.mark.parametrize("kind", LARGE)
@pytest.mark.parametrize("groups", ["n4", "ids"])
def test_large_rewards_outcome_estimators(kind, groups):
    r, _, m, scores = _large_batch(kind)
    # interleaved ids, groups of 4: power-of-two group sizes keep the tiny-spread means exact
    # (a rounded mean is fp32 cancellation error, scaled or not, not what is tested here)
    g = 4 if groups == "n4" else jnp.asarray(np.arange(len(scores)) % (len(scores) // 4))
    for name, norm in (("grpo", True), ("drgrpo", False)):
        a, ret = adv.compute_advantages(name, r, m, groups=g)
        want = _ref_grpo(scores, g if isinstance(g, int) else np.asarray(g), norm)
        _assert_matches_ref(a[:, 0], want)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(ret))
    a, _ = adv.compute_advantages("rloo", r, m, groups=g)
    _assert_matches_ref(a[:, 0], _ref_rloo(scores, g if isinstance(g, int) else np.asarray(g)))


@pytest.mark.parametrize("kind", LARGE)
def test_large_rewards_token_estimators(kind):
    r, v, m, _ = _large_batch(kind)
    m[1, 2:] = 0  # one shorter response (its reward stays on the last position)
    for gamma in (1.0, 0.5):
        a, ret = adv.compute_advantages("reinforce_plus_plus", r, m, gamma=gamma)
        want_a, want_ret = _ref_rpp(r, m, gamma)
        _assert_matches_ref(a, want_a)
        _assert_matches_ref(ret, want_ret)
    for gamma, lam in ((1.0, 1.0), (0.9, 0.95)):
        a, ret = adv.compute_advantages("gae", r, m, values_BxT=v, gamma=gamma, lam=lam)
        want_a, want_ret = _ref_gae(r, v, m, gamma, lam)
        _assert_matches_ref(a, want_a)
        _assert_matches_ref(ret, want_ret)


@pytest.mark.parametrize("kind", LARGE)
def test_large_values_masked_stats_and_jit(kind):
    r, _, m, _ = _large_batch(kind)
    x = r + r[:, ::-1] * 0.25  # two non-zero tokens per row
    _assert_matches_ref(masked.masked_whiten(x, m), _ref_whiten(x, m))
    f = jax.jit(lambda r, m: adv.compute_advantages("grpo", r, m, groups=4)[0])
    _assert_matches_ref(f(r, m)[:, 0], _ref_grpo(r.sum(-1), 4))
    # the variance itself is ~1e75 here: it overflows exactly because the true value does
    assert np.isinf(float(masked.masked_var(x, m)))


def test_constant_huge_group_gives_zero_not_nan():
    # std' = 0 and eps / s underflows (flushed to 0 on CPU): the floor keeps 0 / eps', not 0 / 0
    for c in (1e38, 3.3e38):
        for g in (4, jnp.zeros(4, int)):
            a, _ = adv.grpo(jnp.full((4,), c), g, jnp.ones((4, 1)))
            np.testing.assert_array_equal(np.asarray(a), 0.0)
        w = masked.masked_whiten(jnp.full((1, 4), c), jnp.ones((1, 4)))
        np.testing.assert_array_equal(np.asarray(w), 0.0)
