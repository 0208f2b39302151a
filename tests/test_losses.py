"""Golden tests for lorarl_jax.rl.losses: every number below is worked out by hand."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorarl_jax.rl import losses

LN = math.log


def _close(x, y, tol=1e-5):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


# ---------------------------------------------------------------- aggregation

L_2x3 = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M_2x3 = jnp.array([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        # masked entries {1,2,3 | 4}: sum 10 over 4 tokens
        ("token-mean", 10 / 4),
        # per-row sums [6, 4] -> mean 5
        ("seq-mean-token-sum", 5.0),
        # per-row means [6/3, 4/1] = [2, 4] -> mean 3
        ("seq-mean-token-mean", 3.0),
        # sum 10 / (B · T) = 10 / (2 · 3)   (no loss_scale_factor: this batch's T)
        ("seq-mean-token-sum-norm", 10 / 6),
    ],
)
def test_agg_modes(mode, expected):
    _close(losses.agg_loss(L_2x3, M_2x3, mode), expected)


def test_agg_norm_constant_and_empty_row():
    # sum 10 / (B · C) = 10 / (2 · 5)
    _close(losses.agg_loss(L_2x3, M_2x3, "seq-mean-token-sum-norm", loss_scale_factor=5.0), 1.0)
    # a fully masked row is left out of seq-mean-token-mean: only row 0 -> (1+2)/2
    m = jnp.array([[1, 1, 0], [0, 0, 0]])
    _close(losses.agg_loss(L_2x3, m, "seq-mean-token-mean"), 1.5)
    # ... but counts as a zero-loss sequence in seq-mean-token-sum: (3 + 0)/2
    _close(losses.agg_loss(L_2x3, m, "seq-mean-token-sum"), 1.5)


def test_agg_denominator_rows_left_out():
    """`rows`: rows out of the batch (mask 0) are not counted by the row-count modes."""
    M = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [0, 0, 0]])  # 2 rows in, 2 left out
    _close(losses.agg_denominator(M, "seq-mean-token-sum", rows=2.0), 2.0)
    _close(losses.agg_denominator(M, "seq-mean-token-sum"), 4.0)  # every row counts
    _close(losses.agg_denominator(M, "seq-mean-token-sum-norm", 5.0, rows=2.0), 10.0)
    _close(losses.agg_denominator(M, "token-mean", rows=2.0), 4.0)
    _close(losses.agg_denominator(M, "seq-mean-token-mean", rows=2.0), 2.0)


@pytest.mark.parametrize(
    "mode, denominator",
    [
        ("token-mean", 7.0),  # response tokens
        ("seq-mean-token-sum", 4.0),  # rows
        ("seq-mean-token-mean", 3.0),  # non-empty rows
        ("seq-mean-token-sum-norm", 4.0 * 5.0),  # rows · C
    ],
)
def test_agg_of_split_batch_adds_up_to_whole(mode, denominator):
    """Two halves with the whole batch's denominator sum to the whole batch's loss."""
    L = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [1.0, 1.0, 1.0]])
    M = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 1]])  # 7 tokens, 3 non-empty rows
    d = losses.agg_denominator(M, mode, loss_scale_factor=5.0)
    _close(d, denominator)
    whole = losses.agg_loss(L, M, mode, 5.0)
    halves = sum(losses.agg_loss(L[i : i + 2], M[i : i + 2], mode, 5.0, d) for i in (0, 2))
    _close(halves, whole)
    # hand-computed whole-batch values: token sums [6, 4, 0, 3]; token means [2, 4, -, 1]
    expected = {"token-mean": 13 / 7, "seq-mean-token-sum": 13 / 4, "seq-mean-token-mean": 7 / 3}
    expected["seq-mean-token-sum-norm"] = 13 / 20
    _close(whole, expected[mode])
    # per-half denominators (the old micro-batch mean) differ from the whole batch's loss
    local = sum(losses.agg_loss(L[i : i + 2], M[i : i + 2], mode, 5.0) for i in (0, 2)) / 2
    if mode in ("token-mean", "seq-mean-token-mean"):
        assert abs(float(local) - float(whole)) > 1e-2


def test_agg_unknown_mode():
    with pytest.raises(ValueError, match="token-mean"):
        losses.agg_loss(L_2x3, M_2x3, "token-sum")


def test_entropy_bonus_is_agg():
    _close(losses.entropy_bonus(L_2x3, M_2x3, "seq-mean-token-mean"), 3.0)


# ---------------------------------------------------------------- policy loss

# log-ratios ln5, ln1.5, ln0.5, 0 -> ratios 5, 1.5, 0.5, 1; eps = 0.2, c = 3
OLD_2x2 = jnp.array([[-1.0, -2.0], [-0.5, -3.0]])
LOGP_2x2 = OLD_2x2 + jnp.array([[LN(5.0), LN(1.5)], [LN(0.5), 0.0]])
ADV_2x2 = jnp.array([[-1.0, 1.0], [-1.0, 1.0]])
# token (0,0) A=-1, r=5:   L1 = 5,    L2 = 1.2,  Lc = 5,    L3 = 3  -> min(3, 5) = 3 (dual clip)
# token (0,1) A=+1, r=1.5: L1 = -1.5, L2 = -1.2, Lc = -1.2 (clipped)           -> -1.2
# token (1,0) A=-1, r=.5:  L1 = .5,   L2 = .8,   Lc = .8 (clipped), L3 = 3      -> .8
# token (1,1) A=+1, r=1:   L1 = L2 = -1                                          -> -1
TOKEN_LOSSES = [[3.0, -1.2], [0.8, -1.0]]


def test_policy_loss_dual_clip_golden():
    loss, met = losses.policy_loss(LOGP_2x2, OLD_2x2, ADV_2x2, jnp.ones((2, 2)))
    _close(loss, (3.0 - 1.2 + 0.8 - 1.0) / 4)  # 0.4
    _close(met["pg_clipfrac"], 2 / 4)  # L2 > L1 at (0,1) and (1,0)
    _close(met["pg_clipfrac_lower"], 1 / 4)  # Lc > L3 with A < 0 at (0,0)
    _close(met["ppo_kl"], -(LN(5.0) + LN(1.5) + LN(0.5)) / 4)  # mean of -(logp - old)


def test_policy_loss_mask_and_modes():
    m = jnp.array([[1, 1], [1, 0]])
    loss, met = losses.policy_loss(LOGP_2x2, OLD_2x2, ADV_2x2, m)
    _close(loss, (3.0 - 1.2 + 0.8) / 3)
    _close(met["pg_clipfrac"], 2 / 3)
    _close(met["pg_clipfrac_lower"], 1 / 3)
    # seq-mean-token-sum: rows [3 - 1.2, .8] -> mean 1.3
    loss, _ = losses.policy_loss(LOGP_2x2, OLD_2x2, ADV_2x2, m, loss_agg_mode="seq-mean-token-sum")
    _close(loss, 1.3)


def test_policy_loss_asymmetric_clip_and_c():
    # clip_ratio_high = .28: token (0,1) r = 1.5 -> L2 = -1.28; c = 4: token (0,0) -> min(4, 5) = 4
    loss, met = losses.policy_loss(
        LOGP_2x2, OLD_2x2, ADV_2x2, jnp.ones((2, 2)), clip_ratio_high=0.28, clip_ratio_c=4.0
    )
    _close(loss, (4.0 - 1.28 + 0.8 - 1.0) / 4)
    _close(met["pg_clipfrac_lower"], 1 / 4)
    # c = 10 > ratio 5: dual clip inactive -> L = 5, clipfrac_lower 0
    loss, met = losses.policy_loss(LOGP_2x2, OLD_2x2, ADV_2x2, jnp.ones((2, 2)), clip_ratio_c=10.0)
    _close(loss, (5.0 - 1.2 + 0.8 - 1.0) / 4)
    _close(met["pg_clipfrac_lower"], 0.0)


def test_policy_loss_clamps_log_ratio():
    # log-ratio 30 is clamped to 20 before exp; A = 0 keeps the loss 0; ppo_kl = -20
    loss, met = losses.policy_loss(
        jnp.array([[30.0]]), jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones((1, 1))
    )
    _close(loss, 0.0)
    _close(met["ppo_kl"], -20.0)


def test_policy_loss_requires_c_above_one():
    with pytest.raises(ValueError, match="clip_ratio_c"):
        losses.policy_loss(LOGP_2x2, OLD_2x2, ADV_2x2, jnp.ones((2, 2)), clip_ratio_c=1.0)


def test_policy_loss_gradient_on_policy():
    # at logp == old_logp, r = 1, nothing clips: dL/dlogp = -A / N (token-mean)
    a = jnp.array([[1.0, -2.0, 0.5]])
    old = jnp.full((1, 3), 0.3)
    g = jax.grad(lambda lp: losses.policy_loss(lp, old, a, jnp.ones((1, 3)))[0])(old)
    _close(g, -a / 3)


# ---------------------------------------------------------------- KL estimators

# logp = [-1, -2], ref = [-1.5, -1] -> d = logp - ref = [.5, -1]
LP2 = jnp.array([-1.0, -2.0])
REF2 = jnp.array([-1.5, -1.0])


@pytest.mark.parametrize(
    "kl_type, expected",
    [
        ("kl", [0.5, -1.0]),
        ("k1", [0.5, -1.0]),
        ("abs", [0.5, 1.0]),
        ("mse", [0.125, 0.5]),  # .5 * d^2
        ("k2", [0.125, 0.5]),
        # u = ref - logp = [-.5, 1]: e^u - u - 1 = [e^-.5 - .5, e - 2]
        ("low_var_kl", [math.exp(-0.5) - 0.5, math.e - 2.0]),
        ("k3", [0.10653066, 0.71828183]),
    ],
)
def test_kl_types(kl_type, expected):
    _close(losses.kl_penalty(LP2, REF2, kl_type), expected)


def test_k3_clamps():
    # u = 30 -> clamp 20 -> e^20 - 21, clamped to 10; u = -30 -> clamp -20 -> e^-20 + 19 -> 10
    # u = -5 (no clamp): e^-5 + 4 = 4.006738
    lp = jnp.array([0.0, 0.0, 0.0])
    ref = jnp.array([30.0, -30.0, -5.0])
    _close(losses.kl_penalty(lp, ref, "k3"), [10.0, 10.0, math.exp(-5.0) + 4.0])


def test_kl_unknown():
    with pytest.raises(ValueError, match="low_var_kl"):
        losses.kl_penalty(LP2, REF2, "full")


def test_kl_loss_agg():
    # k1 values [.5, -1] with token-mean -> -.25
    _close(losses.kl_loss(LP2[None], REF2[None], jnp.ones((1, 2)), "k1"), -0.25)


# ---------------------------------------------------------------- value loss


def test_value_loss_clipping():
    # v = [1, 1], v_old = [0, 0], R = [0, 2], eps = .2 -> v_c = [.2, .2]
    # token 0: (1-0)^2 = 1,  (.2-0)^2 = .04  -> max 1     (not clipped)
    # token 1: (1-2)^2 = 1,  (.2-2)^2 = 3.24 -> max 3.24  (clipped)
    # loss = .5 * (1 + 3.24)/2 = 1.06, vf_clipfrac = 1/2
    loss, met = losses.value_loss(
        jnp.array([[1.0, 1.0]]),
        jnp.zeros((1, 2)),
        jnp.array([[0.0, 2.0]]),
        jnp.ones((1, 2)),
        cliprange_value=0.2,
    )
    _close(loss, 1.06)
    _close(met["vf_clipfrac"], 0.5)
    # masking the clipped token: .5 * 1 = .5, clipfrac 0
    loss, met = losses.value_loss(
        jnp.array([[1.0, 1.0]]),
        jnp.zeros((1, 2)),
        jnp.array([[0.0, 2.0]]),
        jnp.array([[1, 0]]),
        cliprange_value=0.2,
    )
    _close(loss, 0.5)
    _close(met["vf_clipfrac"], 0.0)


# ---------------------------------------------------------------- KL in reward


def test_apply_kl_penalty():
    # k1 = logp - ref = [[.1,.2,.3],[.4,.5,9]], masked -> [[.1,.2,.3],[.4,.5,0]]
    # rewards = scores - .5 * kl = [[-.05,-.1,.85],[-.2,.75,0]]
    # current_kl = mean(.6/3, .9/2) = mean(.2, .45) = .325
    scores = jnp.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    logp = jnp.array([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    m = jnp.array([[1, 1, 1], [1, 1, 0]])
    rewards, kl = losses.apply_kl_penalty(scores, logp, jnp.zeros((2, 3)), m, 0.5, "kl")
    _close(rewards, [[-0.05, -0.1, 0.85], [-0.2, 0.75, 0.0]])
    _close(kl, 0.325)


# ---------------------------------------------------------------- jit


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_jit_policy_and_agg(mode):
    m = jnp.array([[1, 1], [1, 0]])
    f = functools.partial(losses.policy_loss, loss_agg_mode=mode, clip_ratio_high=0.28)
    (l0, m0), (l1, m1) = f(LOGP_2x2, OLD_2x2, ADV_2x2, m), jax.jit(f)(LOGP_2x2, OLD_2x2, ADV_2x2, m)
    _close(l0, l1)
    for k in m0:
        _close(m0[k], m1[k])
    g = functools.partial(losses.agg_loss, loss_agg_mode=mode)
    _close(g(L_2x3, M_2x3), jax.jit(g)(L_2x3, M_2x3))


@pytest.mark.parametrize("kl_type", losses.KL_TYPES)
def test_jit_kl(kl_type):
    f = functools.partial(losses.kl_penalty, kl_type=kl_type)
    _close(f(LP2, REF2), jax.jit(f)(LP2, REF2))
    g = functools.partial(losses.apply_kl_penalty, kl_type=kl_type)
    args = (jnp.ones((1, 2)), LP2[None], REF2[None], jnp.ones((1, 2)), jnp.asarray(0.1))
    for eager, jitted in zip(g(*args), jax.jit(g)(*args), strict=True):
        _close(eager, jitted)


def test_jit_value_entropy_kl_loss():
    v = functools.partial(losses.value_loss, cliprange_value=0.2)
    args = (jnp.array([[1.0, 1.0]]), jnp.zeros((1, 2)), jnp.array([[0.0, 2.0]]), jnp.ones((1, 2)))
    _close(v(*args)[0], jax.jit(v)(*args)[0])
    _close(losses.entropy_bonus(L_2x3, M_2x3), jax.jit(losses.entropy_bonus)(L_2x3, M_2x3))
    k = functools.partial(losses.kl_loss, kl_type="low_var_kl")
    _close(
        k(LP2[None], REF2[None], jnp.ones((1, 2))),
        jax.jit(k)(LP2[None], REF2[None], jnp.ones((1, 2))),
    )


# ------------------------------------------------------------------------------------------
# GSPO / CISPO
# ------------------------------------------------------------------------------------------


def test_gspo_golden():
    """Two sequences, eps 0.05 each side, seq-mean-token-mean.
    seq 0: d = [0.3, -0.1, 0.1] → mean 0.1 → s = e^0.1 = 1.10517 → clipped to 1.05; A = +1:
           max(-1.10517, -1.05) = -1.05 per token → -1.05
    seq 1: d = [-0.2, 0.0, (masked)] → mean -0.1 → s = 0.904837 → clipped to 0.95; A = -1:
           max(0.904837, 0.95) = 0.95 → 0.95
    loss = (-1.05 + 0.95) / 2 = -0.05; every token's sequence ratio was clipped: clipfrac 1,
    the lower part (seq 1: 2 of 5 tokens) 0.4."""
    old = jnp.zeros((2, 3))
    logp = jnp.array([[0.3, -0.1, 0.1], [-0.2, 0.0, 9.0]])
    adv = jnp.array([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    for token_level in (False, True):
        loss, m = losses.gspo_policy_loss(
            logp, old, adv, mask, clip_ratio_low=0.05, clip_ratio_high=0.05,
            token_level=token_level, loss_agg_mode="seq-mean-token-mean",
        )  # fmt: skip
        _close(loss, -0.05)
        _close(m["pg_clipfrac"], 1.0)
        _close(m["pg_clipfrac_lower"], 0.4)
        _close(m["seq_ratio_mean"], (3 * math.exp(0.1) + 2 * math.exp(-0.1)) / 5)
    # unclipped (wide eps): the loss is -A·s averaged per sequence
    loss, m = losses.gspo_policy_loss(
        logp, old, adv, mask, clip_ratio_low=0.5, clip_ratio_high=0.5,
        loss_agg_mode="seq-mean-token-mean",
    )  # fmt: skip
    _close(loss, (-math.exp(0.1) + math.exp(-0.1)) / 2)
    _close(m["pg_clipfrac"], 0.0)


def test_cispo_golden():
    """d = [0.3, -0.1], logp = [-1, -2], A = 1, bounds [0, 1.2]: ŵ = [min(e^0.3, 1.2), e^-0.1]
    = [1.2, 0.904837]; L = -ŵ·A·logp = [1.2, 1.809674]; token-mean 1.504837; one of two
    tokens above the upper bound."""
    logp = jnp.array([[-1.0, -2.0]])
    old = logp - jnp.array([[0.3, -0.1]])
    adv = jnp.ones((1, 2))
    mask = jnp.ones((1, 2))
    loss, m = losses.cispo_policy_loss(
        logp, old, adv, mask, clip_ratio_low=1.0, clip_ratio_high=0.2
    )
    _close(loss, (1.2 + 2 * math.exp(-0.1)) / 2)
    _close(m["pg_clipfrac"], 0.5)
    _close(m["pg_clipfrac_lower"], 0.0)
    # the clipped token keeps its gradient (PPO's would be 0 there): d loss / d logp = -ŵ·A / 2
    g = jax.grad(lambda lp: losses.cispo_policy_loss(lp, old, adv, mask, clip_ratio_high=0.2)[0])(
        logp
    )
    np.testing.assert_allclose(g, [[-0.6, -math.exp(-0.1) / 2]], rtol=1e-5)
    g_ppo = jax.grad(
        lambda lp: losses.policy_loss(lp, old, adv, mask, clip_ratio_low=1.0, clip_ratio_high=0.2)[
            0
        ]
    )(logp)
    assert float(g_ppo[0, 0]) == 0.0  # PPO drops the clipped token


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_new_losses_equal_vanilla_gradient_at_ratio_one(mode):
    """On-policy (old = sg[logp], ratio 1) with one advantage per sequence, GSPO, GSPO-token
    and CISPO have the vanilla gradient: -A ∇logp per token, aggregated alike."""
    rng = np.random.default_rng(0)
    logp = jnp.asarray(-rng.uniform(0.1, 3.0, (4, 5)), jnp.float32)
    adv = jnp.asarray(np.repeat(rng.normal(size=(4, 1)), 5, 1), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    kw = dict(loss_agg_mode=mode, loss_scale_factor=5.0)

    def grad(fn, **extra):
        return jax.grad(lambda lp: fn(lp, jax.lax.stop_gradient(lp), adv, mask, **kw, **extra)[0])(
            logp
        )

    want = grad(losses.policy_loss)
    for fn, extra in (
        (losses.gspo_policy_loss, {"token_level": False}),
        (losses.gspo_policy_loss, {"token_level": True}),
        (losses.cispo_policy_loss, {}),
    ):
        np.testing.assert_allclose(grad(fn, **extra) * mask, want * mask, rtol=1e-5, atol=1e-7)


def test_gspo_sequence_and_token_gradients_agree_off_policy():
    """Off-policy, one advantage per sequence, seq-mean-token-mean, nothing clipped: GSPO's
    gradient s_b·mean_t ∇logp equals GSPO-token's s_b·∇logp_t / |y_b| (the paper's identity)."""
    rng = np.random.default_rng(1)
    logp = jnp.asarray(-rng.uniform(0.1, 3.0, (3, 4)), jnp.float32)
    old = logp + jnp.asarray(rng.normal(0, 0.05, (3, 4)), jnp.float32)
    adv = jnp.asarray(np.repeat(rng.normal(size=(3, 1)), 4, 1), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])

    def grad(token_level):
        def f(lp):
            return losses.gspo_policy_loss(
                lp, old, adv, mask, clip_ratio_low=0.9, clip_ratio_high=9.0,
                token_level=token_level, loss_agg_mode="seq-mean-token-mean",
            )[0]  # fmt: skip

        return jax.grad(f)(logp)

    np.testing.assert_allclose(grad(False) * mask, grad(True) * mask, rtol=1e-5, atol=1e-7)
