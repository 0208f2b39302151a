"""Train step: adapter-only gradients, masked optimizer, micro-batching, skip on non-finite."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import left_padded_batch

from lorarl_jax.config import AlgoCfg, OptimCfg
from lorarl_jax.model.hf import load_hf_model
from lorarl_jax.model.lora import LoraConfig, count_params, init_lora
from lorarl_jax.model.transformer import Transformer, positions_from_mask
from lorarl_jax.rl import logprobs as logprobs_lib
from lorarl_jax.rl import losses
from lorarl_jax.rl import step as S
from lorarl_jax.rl.logprobs import (
    chunk_layout,
    chunked_logprobs,
    shared_prompt_logprobs,
    token_logprobs,
)

P, N = 6, 5


G = 2  # samples per prompt


def _batch(vocab=128, B=2, seed=0):
    """B prompts × G responses, in the trainer's layout."""
    rng = np.random.default_rng(seed)
    ptok, pmask = left_padded_batch(vocab, [6, 3, 4, 6][:B], P, seed=seed)
    resp = rng.integers(1, vocab, (B * G, N)).astype(np.int32)
    rmask = np.ones((B * G, N), np.int32)
    rmask[1, 3:] = 0
    return {
        "prompt_tokens": jnp.asarray(ptok),
        "prompt_mask": jnp.asarray(pmask),
        "responses": jnp.asarray(resp),
        "response_mask": jnp.asarray(rmask),
        "advantages": jnp.asarray(np.repeat(rng.normal(size=(B * G, 1)), N, 1), jnp.float32),
    }


def _concat(b):
    toks = np.concatenate([np.repeat(b["prompt_tokens"], G, 0), b["responses"]], 1)
    mask = np.concatenate([np.repeat(b["prompt_mask"], G, 0), b["response_mask"]], 1)
    return jnp.asarray(toks), jnp.asarray(mask)


@pytest.fixture(scope="module")
def setup(hf_dir):
    cfg, base = load_hf_model(hf_dir("llama"))
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    lora = init_lora(base, lcfg, jax.random.key(0))
    return cfg, base, lcfg, lora


def test_token_logprobs_match_full_forward_and_chunking(setup):
    cfg, base, lcfg, lora = setup
    lora = jax.tree.map(lambda x: x + 0.05, lora)  # non-zero B
    tokens, mask = _concat(_batch())
    logits, _ = Transformer(cfg, lcfg).apply(
        {"params": base, "lora": lora}, tokens, positions_from_mask(mask), mask
    )
    lp_full = jax.nn.log_softmax(logits[:, P - 1 : -1] / 0.8, -1)
    ref = jnp.take_along_axis(lp_full, tokens[:, P:, None], -1)[..., 0]
    ent_ref = -(jnp.exp(lp_full) * lp_full).sum(-1)
    for chunk in (1, 2, 5, 64):
        lp, ent = token_logprobs(cfg, lcfg, base, lora, tokens, mask, N, 0.8, chunk)
        np.testing.assert_allclose(lp, ref, atol=1e-5)
        np.testing.assert_allclose(ent, ent_ref, atol=1e-4)
    ref_lp, _ = token_logprobs(cfg, None, base, None, tokens, mask, N)
    assert np.abs(np.asarray(ref_lp) - np.asarray(ref)).max() > 1e-3  # adapter matters


def test_chunk_layout_pads_less_than_one_position_per_chunk():
    assert chunk_layout(48, 32) == (2, 24)
    assert chunk_layout(48, 16) == (3, 16)
    assert chunk_layout(5, 64) == (1, 5)
    assert chunk_layout(7, 3) == (3, 3)  # 9 positions for 7: pad 2 < 3 chunks
    for n in range(1, 40):
        for c in range(1, 20):
            k, size = chunk_layout(n, c)
            assert size <= c and k * size >= n and k * size - n < k


@pytest.mark.parametrize("kind,softcap", [("llama", None), ("llama3_rope", None), ("llama", 3.0)])
def test_frozen_head_vjp_equals_autodiff(hf_dir, kind, softcap):
    """The custom VJP of the frozen LM head (gradient w.r.t. h built in the forward pass) gives
    autodiff's log-probs, entropies and gradients: tied and separate heads, soft-capped logits,
    with and without the entropy's gradient, on chunks that need padding."""
    cfg, base = load_hf_model(hf_dir(kind))
    cfg = dataclasses.replace(cfg, final_logit_softcapping=softcap)
    rng = np.random.default_rng(3)
    B, T, D = 3, 7, cfg.hidden_size
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    y = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    a, b = (jnp.asarray(rng.normal(size=(B, T)), jnp.float32) for _ in range(2))
    z_model = Transformer(cfg).apply({"params": base}, h, method=Transformer.logits_from_hidden)
    z_head = logprobs_lib._head_logits(cfg, logprobs_lib._head(cfg, base), h)  # E·hᵀ when tied
    np.testing.assert_allclose(z_head, z_model, atol=1e-5)

    def loss(h, frozen, ent_grad, with_ent):
        lp, ent = chunked_logprobs(
            cfg, base, h, y, 0.7, 3, frozen_head=frozen, entropy_grad=ent_grad
        )
        return (a * lp).sum() + (b * ent).sum() * with_ent, (lp, ent)

    for ent_grad in (True, False):
        with_ent = 1.0 if ent_grad else 0.0
        (l0, aux0), g0 = jax.value_and_grad(loss, has_aux=True)(h, False, True, with_ent)
        (l1, aux1), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2))(
            h, True, ent_grad, with_ent
        )
        np.testing.assert_allclose(aux1[0], aux0[0], atol=1e-5)
        np.testing.assert_allclose(aux1[1], aux0[1], atol=1e-5)
        np.testing.assert_allclose(g1, g0, atol=1e-5, rtol=1e-5)
        assert float(jnp.abs(g0).max()) > 1e-2  # a gradient that can disagree


def test_frozen_head_vjp_in_bfloat16(hf_dir):
    """A bf16 model (h and the head in bf16, logits in f32): the custom VJP returns a bf16
    gradient w.r.t. h (an f32 one breaks the bf16 multiply before it) equal to autodiff's."""
    cfg, base = load_hf_model(hf_dir("llama"))
    cfg = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    rng = np.random.default_rng(4)
    B, T, D = 2, 5, cfg.hidden_size
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(D,)), jnp.bfloat16)  # a norm's scale: lax.mul in bf16
    y = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)

    def loss(w, frozen):
        lp, ent = chunked_logprobs(cfg, base, h * w, y, 0.7, 2, frozen_head=frozen)
        return lp.sum() + 0.1 * ent.sum()

    g0 = jax.jit(jax.grad(loss), static_argnums=1)(w, False)
    g1 = jax.jit(jax.grad(loss), static_argnums=1)(w, True)
    assert g1.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(g1), np.float32(g0), atol=0.05, rtol=0.05)
    assert float(jnp.abs(g0.astype(jnp.float32)).max()) > 0.1


def test_shared_prompt_logprobs_and_grads_equal_concatenated(setup):
    """Each prompt run once for its G samples gives the same log-probs and adapter gradients."""
    cfg, base, lcfg, lora = setup
    lora = jax.tree.map(lambda x: x + 0.05, lora)
    b = _batch()
    tokens, mask = _concat(b)
    rm = b["response_mask"]
    args = (b["prompt_tokens"], b["prompt_mask"], b["responses"], rm, G)
    a, _ = token_logprobs(cfg, lcfg, base, lora, tokens, mask, N, 0.9, 2)
    c, _ = shared_prompt_logprobs(cfg, lcfg, base, lora, *args, 0.9, 2)
    np.testing.assert_allclose(np.asarray(a) * rm, np.asarray(c) * rm, atol=2e-6)
    ga = jax.grad(lambda l: (token_logprobs(cfg, lcfg, base, l, tokens, mask, N)[0] * rm).sum())(
        lora
    )
    gc = jax.grad(lambda l: (shared_prompt_logprobs(cfg, lcfg, base, l, *args)[0] * rm).sum())(lora)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5), ga, gc)


def _train(setup, steps, algo=None, optim=None, n_micro=1):
    cfg, base, lcfg, lora = setup
    algo = algo or AlgoCfg(use_kl_loss=True, kl_loss_coef=0.01)
    tx = S.make_optimizer(optim or OptimCfg(lr=5e-3, grad_clip=1.0), 100)
    b = _batch()
    old, _ = S.compute_logprobs(cfg, lcfg, base, lora, b, n=G, temperature=1.0, chunk=4)
    b = dict(b, old_logp=old, ref_logp=old)
    step = S.make_policy_step(cfg, lcfg, algo, tx, 1.0, G, n_micro)
    lora = jax.tree.map(jnp.copy, lora)
    opt = tx.init(lora)
    hist = []
    for i in range(steps):
        lora, opt, m = step(lora, opt, base, b, jax.random.key(i))
        hist.append({k: float(v) for k, v in m.items()})
    return lora, opt, hist, b


def test_steps_reduce_loss_and_leave_base_untouched(setup):
    cfg, base, lcfg, lora0 = setup
    before = jax.tree.map(lambda x: np.asarray(x).copy(), base)
    lora, opt, hist, _ = _train(setup, 6)
    assert hist[-1]["actor/loss"] < hist[0]["actor/loss"] - 1e-3
    assert all(h["actor/skipped"] == 0 for h in hist)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), base, before)
    assert float(jnp.abs(lora["layers_0"]["self_attn"]["q_proj"]["lora_b"]).max()) > 0


def test_optimizer_state_is_two_adapters_plus_counters(setup):
    _, _, _, lora = setup
    tx = S.make_optimizer(OptimCfg(), 10)
    state = tx.init(lora)
    n_adapter = count_params(lora)
    n_state = count_params(state)
    counters = n_state - 2 * n_adapter
    assert 0 < counters <= 4, (n_state, n_adapter)


def test_micro_batches_match_full_batch(setup):
    algo = AlgoCfg(loss_agg_mode="seq-mean-token-mean", use_kl_loss=False)
    optim = OptimCfg(lr=1e-3, grad_clip=0.0)
    a, _, ha, _ = _train(setup, 1, algo, optim, n_micro=1)
    b, _, hb, _ = _train(setup, 1, algo, optim, n_micro=2)
    assert abs(ha[0]["actor/grad_norm"] - hb[0]["actor/grad_norm"]) < 1e-5
    # Adam divides by √v: tiny gradients amplify float noise, so compare at 1% of lr
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), a, b)


def test_non_finite_gradient_skips_update(setup):
    cfg, base, lcfg, lora = setup
    tx = S.make_optimizer(OptimCfg(lr=1e-2), 10)
    b = _batch()
    b = dict(b, old_logp=jnp.zeros_like(b["advantages"]), ref_logp=jnp.zeros_like(b["advantages"]))
    b["advantages"] = b["advantages"].at[0, 0].set(jnp.nan)
    step = S.make_policy_step(cfg, lcfg, AlgoCfg(), tx, 1.0, G)
    l0 = jax.tree.map(jnp.copy, lora)
    opt = tx.init(l0)
    l1, opt1, m = step(jax.tree.map(jnp.copy, lora), opt, base, b, jax.random.key(0))
    assert float(m["actor/skipped"]) == 1.0
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), l1, lora)


def test_lr_schedule_warmup_and_cosine():
    f = S.lr_schedule(OptimCfg(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), 14)
    assert float(f(0)) == 0.0 and abs(float(f(2)) - 0.5) < 1e-6 and abs(float(f(4)) - 1.0) < 1e-6
    assert abs(float(f(9)) - (0.1 + 0.9 * 0.5)) < 1e-6  # halfway through the cosine
    assert abs(float(f(14)) - 0.1) < 1e-6
    g = S.lr_schedule(dataclasses.replace(OptimCfg(lr=0.3)), 10)
    assert float(g(0)) == pytest.approx(0.3)


def _ragged_batch(B=4, N=12, lengths=(12, 3, 7, 1, 9, 12, 2, 5), vocab=128, seed=3):
    """B prompts × G responses with very unequal response lengths (and old/ref/sampler logps)."""
    rng = np.random.default_rng(seed)
    ptok, pmask = left_padded_batch(vocab, [6, 3, 4, 6][:B], P, seed=seed)
    R = B * G
    rmask = (np.arange(N)[None, :] < np.asarray(lengths[:R])[:, None]).astype(np.int32)
    resp = rng.integers(1, vocab, (R, N)).astype(np.int32) * rmask
    adv = np.repeat(rng.normal(size=(R, 1)), N, 1).astype(np.float32) * rmask
    noise = lambda: rng.normal(scale=0.05, size=(R, N)).astype(np.float32)  # noqa: E731
    return {
        "prompt_tokens": jnp.asarray(ptok),
        "prompt_mask": jnp.asarray(pmask),
        "responses": jnp.asarray(resp),
        "response_mask": jnp.asarray(rmask),
        "advantages": jnp.asarray(adv),
        "_noise": (noise(), noise(), noise()),
    }


def _with_logps(setup, b):
    cfg, base, lcfg, lora = setup
    b = dict(b)
    n_old, n_ref, n_smp = b.pop("_noise")
    lp, _ = S.compute_logprobs(cfg, lcfg, base, lora, b, n=G, temperature=1.0, chunk=4)
    m = np.asarray(b["response_mask"])
    b["old_logp"] = jnp.asarray((np.asarray(lp) + n_old) * m)
    b["ref_logp"] = jnp.asarray((np.asarray(lp) + n_ref) * m)
    b["sampler_logp"] = jnp.asarray((np.asarray(lp) + n_smp) * m)
    return b


def _grads(setup, b, algo, n_micro, group_split=1):
    cfg, base, lcfg, lora = setup
    loss_fn = functools.partial(
        S.policy_loss_fn, cfg=cfg, lcfg=lcfg, algo=algo, temperature=1.0, n=G // group_split
    )
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    key = jax.random.key(0)
    f = jax.jit(
        lambda lo, bb: S.accumulate_grads(
            grad_fn, lo, base, bb, key, n_micro, algo, group_split=group_split
        )
    )
    return f(lora, b)


def _rel(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    num = max(float(jnp.abs(x - y).max()) for x, y in pairs)
    return num / max(float(jnp.abs(y).max()) for y in jax.tree.leaves(b))


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_gradient_does_not_depend_on_micro_batch_size(setup, mode):
    """Whole mini-batch vs halves vs one group per micro-batch vs half a group (one row, its
    prompt run once per sub-group), unequal response lengths, with the KL-loss, entropy and
    rollout-IS terms on: the same loss, gradient and metrics."""
    lora = jax.tree.map(lambda x: x + 0.03, setup[3])  # non-zero B: every term has a gradient
    st = (*setup[:3], lora)
    algo = AlgoCfg(
        loss_agg_mode=mode,
        loss_scale_factor=12.0,
        use_kl_loss=True,
        kl_loss_coef=0.1,
        entropy_coeff=0.01,
        rollout_is="token",
    )
    b = _with_logps(st, _ragged_batch())
    ref_loss, ref_g, ref_m = _grads(st, b, algo, 1)
    # 4 prompts: halves, one group (G rows) per micro-batch, one row (half a group) per micro-batch
    for n_micro, split in ((2, 1), (4, 1), (8, 2)):
        loss, g, m = _grads(st, b, algo, n_micro, split)
        assert _rel(g, ref_g) <= 1e-5, (mode, n_micro, split, _rel(g, ref_g))
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
        for k in ref_m:
            np.testing.assert_allclose(float(m[k]), float(ref_m[k]), rtol=1e-5, atol=1e-7)


def test_drgrpo_constant_does_not_depend_on_response_trimming(setup):
    """seq-mean-token-sum-norm divides by a constant: responses trimmed to their longest (bucket
    1), to a multiple of 32, or never trimmed give the same loss and gradient."""
    from lorarl_jax.rl.experience import trim_length

    lora = jax.tree.map(lambda x: x + 0.03, setup[3])
    st = (*setup[:3], lora)
    algo = AlgoCfg(
        loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=48.0, kl_loss_coef=0.1
    )
    full = _with_logps(st, _ragged_batch(N=48, lengths=(28, 3, 7, 1, 9, 12, 2, 5)))
    outs = {}
    for bucket in (0, 1, 32):
        n_keep = trim_length(full["response_mask"], bucket)
        b = {k: v if k.startswith("prompt_") else v[:, :n_keep] for k, v in full.items()}
        outs[bucket] = (n_keep, *_grads(st, b, algo, 1))
    assert [outs[k][0] for k in (0, 1, 32)] == [48, 28, 32]
    for bucket in (1, 32):
        np.testing.assert_allclose(float(outs[bucket][1]), float(outs[0][1]), rtol=1e-6)
        assert _rel(outs[bucket][2], outs[0][2]) <= 1e-5


@pytest.mark.parametrize("policy_loss", ["gspo", "gspo_token", "cispo"])
def test_policy_loss_modes_train_and_split_over_micro_batches(setup, policy_loss):
    """algo.policy_loss: each mode moves the policy towards the advantages on a fixed batch
    (Σ m·A·(log π_new − log π_old) > 0), skips nothing, and gives the same gradient with 1 or 2
    micro-batches (its denominators are the mini-batch's)."""
    algo = AlgoCfg(
        policy_loss=policy_loss,
        use_kl_loss=False,
        loss_agg_mode="seq-mean-token-mean",
        gspo_clip_ratio_low=0.2,
        gspo_clip_ratio_high=0.2,
    )
    optim = OptimCfg(lr=5e-3, grad_clip=1.0)
    lora, _, hist, b = _train(setup, 6, algo, optim)
    assert all(h["actor/skipped"] == 0 and np.isfinite(h["actor/loss"]) for h in hist)
    cfg, base, lcfg, _ = setup
    new, _ = S.compute_logprobs(cfg, lcfg, base, lora, b, n=G, temperature=1.0, chunk=4)
    gain = (b["response_mask"] * b["advantages"] * (new - b["old_logp"])).sum()
    assert float(gain) > 1e-3, float(gain)
    _, _, h1, _ = _train(setup, 1, algo, OptimCfg(lr=1e-3, grad_clip=0.0), n_micro=1)
    _, _, h2, _ = _train(setup, 1, algo, OptimCfg(lr=1e-3, grad_clip=0.0), n_micro=2)
    assert abs(h1[0]["actor/grad_norm"] - h2[0]["actor/grad_norm"]) < 1e-5
    assert abs(h1[0]["actor/pg_loss"] - h2[0]["actor/pg_loss"]) < 1e-5


@pytest.mark.parametrize(
    "mode, policy_loss",
    [(m, "vanilla") for m in losses.AGG_MODES]
    + [("seq-mean-token-mean", "gspo"), ("seq-mean-token-sum", "cispo")],
)
def test_rows_out_of_the_loss_are_as_if_absent(setup, mode, policy_loss):
    """DAPO's fillers / overlong-filtered rows: groups 1 and 3 of a 4-group batch with
    `loss_rows` 0 (and their own non-zero advantages) give the loss, gradient and metrics of the
    2-group batch without them, whole or in 2 micro-batches, with KL, entropy and rollout IS."""
    lora = jax.tree.map(lambda x: x + 0.03, setup[3])
    st = (*setup[:3], lora)
    algo = AlgoCfg(
        policy_loss=policy_loss,
        loss_agg_mode=mode,
        loss_scale_factor=12.0,
        use_kl_loss=True,
        kl_loss_coef=0.1,
        entropy_coeff=0.01,
        rollout_is="token",
    )
    full = _with_logps(st, _ragged_batch())
    groups, rows = np.array([0, 2]), np.array([0, 1, 4, 5])
    alone = {k: v[groups] if k.startswith("prompt_") else v[rows] for k, v in full.items()}
    want_loss, want_g, want_m = _grads(st, alone, algo, 1)
    masked = dict(full, loss_rows=jnp.asarray([1, 1, 0, 0, 1, 1, 0, 0], jnp.float32))
    for n_micro in (1, 2):
        loss, g, m = _grads(st, masked, algo, n_micro)
        assert _rel(g, want_g) <= 1e-5, (mode, n_micro, _rel(g, want_g))
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
        for k in want_m:
            np.testing.assert_allclose(float(m[k]), float(want_m[k]), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(full["advantages"][2:4]).max()) > 0.1  # the left-out rows had signal


def test_compile_then_trim_compiles_once_per_signature_and_changes_no_result():
    """rl/programs.compile_then_trim: its ahead-of-time compile is the one the call uses (no
    second backend compile), a new shape compiles once more, and the outputs (donated inputs
    included) are the plain jit's."""
    from lorarl_jax.rl.programs import compile_then_trim

    compiles = []

    def listener(name, *a, **k):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    step = functools.partial(jax.jit, donate_argnums=(0,))(lambda p, x: (p + x.sum(), x * p))
    plain = jax.jit(lambda p, x: (p + x.sum(), x * p))
    wrapped = compile_then_trim(step)
    p, x3, x5 = jnp.float32(2.0), jnp.arange(3.0), jnp.arange(5.0)
    want3, want5 = plain(p, x3), plain(p, x5)
    counts = []
    for x in (x3, x3, x5, x5):
        p_in = jnp.array(p)  # donated: a fresh copy each call
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            got = wrapped(p_in, x)
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
        counts.append(len(compiles))
        compiles.clear()
        want = want3 if x.shape == (3,) else want5
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
        assert float(got[0]) == float(want[0])
    assert counts == [1, 0, 1, 0]
