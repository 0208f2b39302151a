"""Sampler: KV-cache decode equals the no-cache forward; sampling semantics; determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, left_padded_batch

from lorarl_jax.model.hf import load_hf_model
from lorarl_jax.model.transformer import Transformer, positions_from_mask
from lorarl_jax.sampling import sampler as S

N = 6


def _full_forward_greedy(cfg, params, tokens, mask, steps):
    """Reference: re-run the whole sequence without a cache and take argmax, step by step."""
    toks, msk = np.asarray(tokens), np.asarray(mask)
    out, lps = [], []
    for _ in range(steps):
        logits, _ = Transformer(cfg).apply(
            {"params": params}, jnp.asarray(toks), positions_from_mask(jnp.asarray(msk)), msk
        )
        last = np.asarray(logits[:, -1])
        nxt = last.argmax(-1)
        lps.append(np.asarray(jax.nn.log_softmax(last))[np.arange(len(nxt)), nxt])
        out.append(nxt)
        toks = np.concatenate([toks, nxt[:, None]], 1).astype(np.int32)
        msk = np.concatenate([msk, np.ones_like(nxt[:, None])], 1).astype(np.int32)
    return np.stack(out, 1), np.stack(lps, 1)


def _gen(cfg, params, tokens, mask, key, sp, n=1, stop_ids=(), max_new=N):
    return S.generate(
        cfg,
        params,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        key,
        n=n,
        max_new_tokens=max_new,
        stop_ids=tuple(stop_ids),
        pad_id=0,
        sp=sp,
    )


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_greedy_equals_full_forward_argmax(kind, hf_dir):
    cfg, params = load_hf_model(hf_dir(kind))
    tokens, mask = left_padded_batch(TINY[kind]["vocab_size"], [7, 3, 5], 7, seed=2)
    ref_tok, ref_lp = _full_forward_greedy(cfg, params, tokens, mask, N)
    r = _gen(cfg, params, tokens, mask, jax.random.key(0), S.SamplingParams(greedy=True))
    np.testing.assert_array_equal(np.asarray(r.tokens), ref_tok)
    np.testing.assert_allclose(np.asarray(r.logp), ref_lp, atol=1e-5)
    assert np.asarray(r.mask).all()


def test_top_k_1_equals_greedy_and_same_key_same_samples(hf_dir):
    cfg, params = load_hf_model(hf_dir("llama"))
    tokens, mask = left_padded_batch(128, [5, 2], 5, seed=3)
    g = _gen(cfg, params, tokens, mask, jax.random.key(0), S.SamplingParams(greedy=True))
    k1 = _gen(cfg, params, tokens, mask, jax.random.key(7), S.SamplingParams(top_k=1))
    np.testing.assert_array_equal(np.asarray(k1.tokens), np.asarray(g.tokens))
    sp = S.SamplingParams(temperature=1.0)
    a = _gen(cfg, params, tokens, mask, jax.random.key(1), sp, n=3)
    b = _gen(cfg, params, tokens, mask, jax.random.key(1), sp, n=3)
    c = _gen(cfg, params, tokens, mask, jax.random.key(2), sp, n=3)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    assert a.tokens.shape == (6, N)


def test_sampled_logprobs_equal_full_forward_log_softmax(hf_dir):
    """n samples per prompt: each row's logp = log_softmax(logits/T) of the full forward."""
    cfg, params = load_hf_model(hf_dir("qwen2"))
    tokens, mask = left_padded_batch(128, [6, 3], 6, seed=4)
    T = 0.7
    r = _gen(cfg, params, tokens, mask, jax.random.key(3), S.SamplingParams(temperature=T), n=2)
    seq = np.concatenate([np.repeat(tokens, 2, 0), np.asarray(r.tokens)], 1)
    msk = np.concatenate([np.repeat(mask, 2, 0), np.ones((4, N), np.int32)], 1)
    logits, _ = Transformer(cfg).apply(
        {"params": params}, jnp.asarray(seq), positions_from_mask(jnp.asarray(msk)), msk
    )
    lp = jax.nn.log_softmax(np.asarray(logits)[:, 5:-1] / T, axis=-1)
    ref = np.take_along_axis(np.asarray(lp), seq[:, 6:, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(r.logp), ref, atol=2e-5)


def test_stop_ids_mask_and_early_exit(hf_dir):
    cfg, params = load_hf_model(hf_dir("llama"))
    tokens, mask = left_padded_batch(128, [4, 4], 4, seed=5)
    g = _gen(cfg, params, tokens, mask, jax.random.key(0), S.SamplingParams(greedy=True))
    first = np.asarray(g.tokens)
    stop = int(first[0, 2])  # row 0 stops at step 2 (or earlier if the id repeats)
    r = _gen(
        cfg,
        params,
        tokens,
        mask,
        jax.random.key(0),
        S.SamplingParams(greedy=True),
        stop_ids=(stop, 127),
    )
    t, m = np.asarray(r.tokens), np.asarray(r.mask)
    k = int(np.argmax(first[0] == stop))
    assert m[0, : k + 1].all() and not m[0, k + 1 :].any()
    assert (t[0, k + 1 :] == 0).all()  # pad after stop
    assert int(r.lengths[0]) == k + 1


def test_sample_token_top_p_filters_tail():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    sp = S.SamplingParams(top_p=0.7)
    toks = [int(S.sample_token(logits, jax.random.key(i), sp)[0][0]) for i in range(200)]
    assert set(toks) == {0, 1}  # 0.5 + 0.3 ≥ 0.7: tokens 2 and 3 are never drawn
    counts = np.bincount(toks, minlength=2)
    assert 0.5 < counts[0] / 200 < 0.75  # renormalised 0.625


def test_insert_places_prefilled_rows_into_slots(hf_dir):
    """JetStream-style: prefill one prompt, insert into slot 1 of a 3-slot state, decode."""
    cfg, params = load_hf_model(hf_dir("gemma3"))
    tokens, mask = left_padded_batch(128, [5], 5, seed=6)
    ref_tok, _ = _full_forward_greedy(cfg, params, tokens, mask, 3)
    logits, pre = S.prefill(cfg, params, jnp.asarray(tokens), jnp.asarray(mask), 16)
    big = S.repeat_rows(
        S.prefill(cfg, params, jnp.zeros((1, 5), jnp.int32), jnp.ones((1, 5), jnp.int32), 16)[1], 3
    )
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    state = S.insert(pre.replace(token=tok), big, 1)
    out = [int(tok[0])]
    for _ in range(2):
        lg, state = S.decode_step(cfg, params, state)
        nxt = jnp.argmax(lg, -1).astype(jnp.int32)
        state = state.replace(token=nxt)
        out.append(int(nxt[1]))
    assert out == list(ref_tok[0])


def test_inverse_cdf_draws_follow_the_tempered_softmax():
    """Sampling frequencies match softmax(logits / T); zero-mass (top-k) tokens never appear."""
    logits = jnp.log(jnp.asarray([[0.1, 0.2, 0.3, 0.4] + [1e-9] * 300]))
    toks = []
    for i in range(20):
        tok, lp = S.sample_token(jnp.repeat(logits, 500, 0), jax.random.key(i), S.SamplingParams())
        toks.append(np.asarray(tok))
        ref = jax.nn.log_softmax(logits[0])[np.asarray(tok)]
        np.testing.assert_allclose(np.asarray(lp), np.asarray(ref), atol=1e-6)
    freq = np.bincount(np.concatenate(toks), minlength=4)[:4] / 10_000
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.015)
    k2 = S.sample_token(jnp.repeat(logits, 500, 0), jax.random.key(0), S.SamplingParams(top_k=2))
    assert set(np.asarray(k2[0]).tolist()) == {2, 3}


def test_growing_cache_greedy_matches_teacher_forced_forward(hf_dir):
    """70 new tokens: the cache grows at steps 32 and 64 (`cache_segments`); every token is the
    argmax of one full forward over prompt + completion at the previous position."""
    assert S.cache_segments(70) == (32, 64, 70)
    assert S.cache_segments(64) == (32, 64) and S.cache_segments(6) == (6,)
    cfg, params = load_hf_model(hf_dir("gemma3"))  # sliding-window layers: slot arithmetic
    tokens, mask = left_padded_batch(TINY["gemma3"]["vocab_size"], [7, 3, 5], 7, seed=6)
    r = _gen(
        cfg, params, tokens, mask, jax.random.key(0), S.SamplingParams(greedy=True), max_new=70
    )
    seq = np.concatenate([tokens, np.asarray(r.tokens)], 1)
    msk = np.concatenate([mask, np.ones((3, 70), np.int32)], 1)
    logits, _ = Transformer(cfg).apply(
        {"params": params}, jnp.asarray(seq), positions_from_mask(jnp.asarray(msk)), msk
    )
    logits = np.asarray(logits)[:, 6:-1]  # predicts response tokens 0..69
    np.testing.assert_array_equal(logits.argmax(-1), np.asarray(r.tokens))
    ref_lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), seq[:, 7:, None], -1)
    np.testing.assert_allclose(np.asarray(r.logp), ref_lp[..., 0], atol=2e-5)


def _shared_and_repeated(cfg, params, tokens, mask, sp, n, max_new, stop_ids=(), lora=None):
    kw = dict(n=n, max_new_tokens=max_new, stop_ids=stop_ids, pad_id=0, sp=sp, lora=lora)
    args = (cfg, params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(3))
    if lora is not None:
        kw["lcfg"] = lora[1]
        kw["lora"] = lora[0]
    return S.generate(*args, **kw, share=True), S.generate(*args, **kw, share=False)


def assert_same_samples(a, b, max_split_rows: int = 1):
    """The two rollouts draw the same tokens (mask, logp within 5e-5), except that at most
    `max_split_rows` rows may part once: the two programs are compiled apart, so XLA may round
    their logits differently, and an inverse-CDF draw that falls within that rounding of a
    boundary picks the neighbouring token (seen once in 840 tokens on an AMD EPYC: 89 vs 88).
    Up to a row's first differing token everything must agree."""
    ta, tb = np.asarray(a.tokens), np.asarray(b.tokens)
    la, lb = np.asarray(a.logp), np.asarray(b.logp)
    ma, mb = np.asarray(a.mask), np.asarray(b.mask)
    split = [i for i in range(len(ta)) if not np.array_equal(ta[i], tb[i])]
    assert len(split) <= max_split_rows, f"rows {split} sample differently"
    for i in range(len(ta)):
        t = int(np.argmax(ta[i] != tb[i])) if i in split else ta.shape[1]
        np.testing.assert_array_equal(ma[i, :t], mb[i, :t])
        np.testing.assert_allclose(la[i, :t], lb[i, :t], atol=5e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_shared_prompt_cache_samples_what_repeated_rows_sample(kind, hf_dir):
    """n samples per prompt reading one prompt KV prefix per group (`share_prompt`) draw the same
    tokens as n copies of the prompt's cache, for the same key: left-padded prompts of unequal
    length, rows that stop early, a cache that grows twice, sliding-window layers (gemma3)."""
    cfg, params = load_hf_model(hf_dir(kind))
    tokens, mask = left_padded_batch(TINY[kind]["vocab_size"], [7, 2, 5], 7, seed=8)
    sp = S.SamplingParams(temperature=1.0)
    a, b = _shared_and_repeated(cfg, params, tokens, mask, sp, n=4, max_new=70, stop_ids=(5, 9))
    assert_same_samples(a, b)
    lengths = np.asarray(a.lengths)
    assert lengths.min() < 32 and lengths.max() > 64  # early stops and two cache growths


def test_shared_prompt_cache_greedy_matches_teacher_forced_forward(hf_dir):
    """Greedy, n = 3 per prompt through the shared prefix: every token is the argmax of one full
    forward over prompt + completion (gemma3: sliding windows across the prefix boundary)."""
    cfg, params = load_hf_model(hf_dir("gemma3"))
    tokens, mask = left_padded_batch(TINY["gemma3"]["vocab_size"], [6, 3], 6, seed=9)
    sp = S.SamplingParams(greedy=True)
    r, _ = _shared_and_repeated(cfg, params, tokens, mask, sp, n=3, max_new=40)
    toks, msk = np.repeat(tokens, 3, 0), np.repeat(mask, 3, 0)
    seq = np.concatenate([toks, np.asarray(r.tokens)], 1)
    full = np.concatenate([msk, np.ones((6, 40), np.int32)], 1)
    logits, _ = Transformer(cfg).apply(
        {"params": params}, jnp.asarray(seq), positions_from_mask(jnp.asarray(full)), full
    )
    np.testing.assert_array_equal(np.asarray(logits)[:, 5:-1].argmax(-1), np.asarray(r.tokens))


def test_shared_prompt_cache_with_an_unmerged_adapter(hf_dir):
    """rollout.merge=never decodes base + adapter: the shared prefix gives the same samples."""
    from lorarl_jax.model.lora import LoraConfig, init_lora

    cfg, params = load_hf_model(hf_dir("llama"))
    lcfg = LoraConfig(r=4, lora_alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
    lora = init_lora(params, lcfg, jax.random.key(1))
    lora = jax.tree.map(lambda x: x + 0.05, lora)  # B ≠ 0: the adapter changes the logits
    tokens, mask = left_padded_batch(TINY["llama"]["vocab_size"], [5, 3], 5, seed=10)
    sp = S.SamplingParams(temperature=1.0)
    a, b = _shared_and_repeated(cfg, params, tokens, mask, sp, n=2, max_new=20, lora=(lora, lcfg))
    assert_same_samples(a, b)
