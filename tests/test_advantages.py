"""Golden tests for lorarl_jax.rl.advantages: every number below is worked out by hand."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorarl_jax.rl import advantages as adv

EPS = 1e-6


def _close(x, y, tol=1e-5):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_var_whiten():
    x = jnp.array([[1.0, 2.0, 100.0], [3.0, jnp.nan, 4.0]])
    m = jnp.array([[1, 1, 0], [1, 0, 1]])
    # masked values {1, 2, 3, 4}: mean 2.5; NaN and 100 sit under zeros of the mask.
    _close(adv.masked_mean(x, m), 2.5)
    # deviations -1.5, -0.5, 0.5, 1.5 -> squares sum 5 -> biased 5/4, unbiased 5/3
    _close(adv.masked_var(x, m, unbiased=False), 1.25)
    _close(adv.masked_var(x, m), 5.0 / 3.0)
    # row means: (1+2)/2 = 1.5, (3+4)/2 = 3.5
    _close(adv.masked_mean(x, m, axis=-1), [1.5, 3.5])
    w = adv.masked_whiten(x, m)
    s = math.sqrt(5.0 / 3.0)
    _close(w[0, :2], [-1.5 / s, -0.5 / s])
    _close(w[1, 2], 1.5 / s)
    # shift_mean=False adds the mean back
    _close(adv.masked_whiten(x, m, shift_mean=False)[0, 0], -1.5 / s + 2.5)


def test_masked_var_single_token_is_finite():
    # verl raises for a single masked token; here the Bessel factor is skipped: var 0.
    x = jnp.array([[3.0, 7.0]])
    m = jnp.array([[1, 0]])
    _close(adv.masked_var(x, m), 0.0)
    _close(adv.masked_whiten(x, m)[0, 0], 0.0)


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
