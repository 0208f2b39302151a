"""LoRA: policy == reference at init, no adapter compute on the reference path, merged ==
unmerged, init statistics, target selection and dropout, for Llama, Qwen2 and Gemma 3."""

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, left_padded_batch
from flax import traverse_util

from lorarl_jax.model import lora as lora_lib
from lorarl_jax.model.hf import load_hf_model
from lorarl_jax.model.lora import LINEAR_NAMES, LoraConfig, init_lora, merge
from lorarl_jax.model.transformer import Transformer, positions_from_mask

KINDS = ("llama", "qwen2", "gemma3")


def _setup(kind, hf_dir):
    cfg, base = load_hf_model(hf_dir(kind))
    tokens, mask = left_padded_batch(TINY[kind]["vocab_size"], [10, 6, 1], 10, seed=3)
    batch = (jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask))
    return cfg, base, batch


def _random_b(lora, key, std=0.1):
    """The adapter with every lora_b drawn N(0, std²) so the delta is non-zero."""
    flat = traverse_util.flatten_dict(lora)
    keys = jax.random.split(key, len(flat))
    for k, path in zip(keys, sorted(flat), strict=True):
        if path[-1] == "lora_b":
            flat[path] = std * jax.random.normal(k, flat[path].shape, flat[path].dtype)
    return traverse_util.unflatten_dict(flat)


def _count_dot_generals(closed_jaxpr) -> int:
    def walk(jaxpr):
        n = sum(e.primitive.name == "dot_general" for e in jaxpr.eqns)
        return n + sum(walk(sub) for sub in jex.subjaxprs(jaxpr))

    return walk(closed_jaxpr.jaxpr)


@pytest.mark.parametrize("kind", KINDS)
def test_policy_equals_reference_at_init(kind, hf_dir):
    cfg, base, batch = _setup(kind, hf_dir)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    lora = init_lora(base, lcfg, jax.random.key(0))
    flat = traverse_util.flatten_dict(lora)
    assert all(not v.any() for p, v in flat.items() if p[-1] == "lora_b")
    ref, _ = Transformer(cfg).apply({"params": base}, *batch)
    pol, _ = Transformer(cfg, lcfg).apply({"params": base, "lora": lora}, *batch)
    assert np.array_equal(np.asarray(ref), np.asarray(pol))


@pytest.mark.parametrize("kind", KINDS)
def test_reference_path_does_no_adapter_compute(kind, hf_dir):
    """Per layer: 7 projections + 2 attention einsums; the tied head is one more. Each adapted
    projection adds exactly two matmuls (x·A, ·B); the reference apply adds none."""
    cfg, base, batch = _setup(kind, hf_dir)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))
    lora = init_lora(base, lcfg, jax.random.key(0))
    L = cfg.num_layers
    ref = jax.make_jaxpr(lambda p, *b: Transformer(cfg).apply({"params": p}, *b))(base, *batch)
    pol = jax.make_jaxpr(
        lambda p, lo, *b: Transformer(cfg, lcfg).apply({"params": p, "lora": lo}, *b)
    )(base, lora, *batch)
    # The reference model given no adapter collection, even if built with a LoraConfig.
    ref_lcfg = jax.make_jaxpr(lambda p, *b: Transformer(cfg, lcfg).apply({"params": p}, *b))(
        base, *batch
    )
    assert cfg.tie_word_embeddings
    assert _count_dot_generals(ref) == 9 * L + 1
    assert _count_dot_generals(ref_lcfg) == 9 * L + 1
    assert _count_dot_generals(pol) == 9 * L + 1 + 2 * 2 * L


@pytest.mark.parametrize("kind", KINDS)
def test_merged_equals_unmerged(kind, hf_dir):
    cfg, base, batch = _setup(kind, hf_dir)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    lora = _random_b(init_lora(base, lcfg, jax.random.key(0)), jax.random.key(1))
    base_copy = jax.tree.map(np.array, base)
    merged = merge(base, lora, lcfg.scale)
    unmerged_logits, _ = Transformer(cfg, lcfg).apply({"params": base, "lora": lora}, *batch)
    merged_logits, _ = Transformer(cfg).apply({"params": merged}, *batch)
    base_logits, _ = Transformer(cfg).apply({"params": base}, *batch)
    assert np.abs(np.asarray(merged_logits - unmerged_logits)).max() <= 1e-5
    assert np.abs(np.asarray(merged_logits - base_logits)).max() > 1e-2
    # The base tree is untouched; only targeted kernels change in the merged tree.
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), base, base_copy)
    flat_base, flat_merged = (traverse_util.flatten_dict(t) for t in (base, merged))
    assert flat_base.keys() == flat_merged.keys()
    for path, w in flat_base.items():
        changed = not np.array_equal(np.asarray(w), np.asarray(flat_merged[path]))
        assert changed == (path[-1] == "kernel" and path[-2] in lcfg.target_modules), path


def test_init_statistics_and_scale():
    """A ~ U(−1/√in, 1/√in) (PEFT's kaiming_uniform(a=√5)), B = 0, fresh key per layer."""
    d_in, d_out, r = 2048, 64, 64
    base = {
        f"layers_{i}": {"mlp": {"down_proj": {"kernel": jnp.zeros((d_in, d_out))}}} for i in (0, 1)
    }
    lcfg = LoraConfig(r=r, lora_alpha=16, target_modules=("down_proj",))
    lora = init_lora(base, lcfg, jax.random.key(0))
    a0 = np.asarray(lora["layers_0"]["mlp"]["down_proj"]["lora_a"])
    a1 = np.asarray(lora["layers_1"]["mlp"]["down_proj"]["lora_a"])
    b0 = np.asarray(lora["layers_0"]["mlp"]["down_proj"]["lora_b"])
    bound = 1 / np.sqrt(d_in)
    assert a0.shape == (d_in, r) and b0.shape == (r, d_out)
    assert np.abs(a0).max() <= bound and np.abs(a0).max() > 0.99 * bound
    assert abs(a0.mean()) < 0.01 * bound  # n = 131k samples: σ(mean) ≈ 0.0016·bound
    np.testing.assert_allclose(a0.var(), bound**2 / 3, rtol=0.02)
    assert not b0.any() and not np.array_equal(a0, a1)
    assert LoraConfig(r=16, lora_alpha=32).scale == 2.0
    assert LoraConfig(r=16, lora_alpha=32, use_rslora=True).scale == 8.0


@pytest.mark.parametrize("kind", KINDS)
def test_target_modules_select_layers(kind, hf_dir):
    cfg, base, _ = _setup(kind, hf_dir)
    lora = init_lora(base, LoraConfig(r=2, target_modules=["v_proj", "q_proj"]), jax.random.key(0))
    paths = set(traverse_util.flatten_dict(lora))
    want = {
        (f"layers_{i}", "self_attn", m, leaf)
        for i in range(cfg.num_layers)
        for m in ("q_proj", "v_proj")
        for leaf in ("lora_a", "lora_b")
    }
    assert paths == want
    q = lora["layers_0"]["self_attn"]["q_proj"]
    assert q["lora_a"].shape == (cfg.hidden_size, 2)
    assert q["lora_b"].shape == (2, cfg.num_heads * cfg.head_dim)
    for spelling in ("all-linear", ["all-linear"], ("all_linear",)):
        assert LoraConfig(target_modules=spelling).target_modules == LINEAR_NAMES
    full = init_lora(base, LoraConfig(r=2, target_modules="all-linear"), jax.random.key(0))
    names = {p[-2] for p in traverse_util.flatten_dict(full)}
    assert names == set(LINEAR_NAMES) and len(jax.tree.leaves(full)) == 2 * 7 * cfg.num_layers
    # Order and duplicates do not matter: the config is canonical.
    assert LoraConfig(target_modules=("v_proj", "q_proj", "v_proj")) == LoraConfig(
        target_modules=("q_proj", "v_proj")
    )


def test_invalid_configs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\['lm_head'\].*valid names.*all-linear"):
        LoraConfig(target_modules=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="target_modules"):
        LoraConfig(target_modules=())
    with pytest.raises(ValueError, match=r"lora.r must be >= 0 \(0: full-parameter RL\), got -1"):
        LoraConfig(r=-1)
    assert LoraConfig(r=0).full and LoraConfig(r=0).scale == 0.0
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraConfig(lora_dropout=1.0)


def test_target_missing_from_model_raises(hf_dir):
    _, base, _ = _setup("llama", hf_dir)
    flat = traverse_util.flatten_dict(base)
    no_gate = traverse_util.unflatten_dict({p: v for p, v in flat.items() if "gate_proj" not in p})
    lcfg = LoraConfig(target_modules=("q_proj", "gate_proj"))
    with pytest.raises(ValueError, match=r"\['gate_proj'\] match no layer of this model"):
        init_lora(no_gate, lcfg, jax.random.key(0))
    with pytest.raises(ValueError, match="gate_proj"):
        lora_lib._targets(no_gate, lcfg)
    assert len(lora_lib._targets(base, lcfg)) == 2 * 2  # 2 layers × (q_proj, gate_proj)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_dropout(kind, hf_dir):
    cfg, base, batch = _setup(kind, hf_dir)
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules="all-linear")
    lora = _random_b(init_lora(base, lcfg, jax.random.key(0)), jax.random.key(1))
    variables = {"params": base, "lora": lora}
    no_drop = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    plain, _ = Transformer(cfg, no_drop).apply(variables, *batch)

    def run(deterministic, seed):
        model = Transformer(cfg, lcfg, deterministic=deterministic)
        out, _ = model.apply(variables, *batch, rngs={"dropout": jax.random.key(seed)})
        return np.asarray(out)

    assert np.array_equal(run(True, 0), np.asarray(plain))
    a, a_again, b = run(False, 0), run(False, 0), run(False, 1)
    assert np.array_equal(a, a_again)
    assert np.abs(a - np.asarray(plain)).max() > 1e-3
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_reaches_b_at_init(kind, hf_dir):
    """With B = 0 only ∂/∂B is non-zero at the first step (∂/∂A = scale·x·Bᵀ… = 0)."""
    cfg, base, batch = _setup(kind, hf_dir)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "down_proj"))
    lora = init_lora(base, lcfg, jax.random.key(0))

    def loss(lo):
        logits, _ = Transformer(cfg, lcfg).apply({"params": base, "lora": lo}, *batch)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(lora))
    for path, g in grads.items():
        nonzero = bool(np.abs(np.asarray(g)).max() > 0)
        assert nonzero == (path[-1] == "lora_b"), path


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_lora_delta_backward_equals_autodiff(dtype, tol):
    """The hand-written VJP of `s·(h A) B` (2-D rank-r contractions) gives autodiff's value and
    gradients w.r.t. h, A and B on 3-D activations, in fp32 and bf16."""
    k = jax.random.split(jax.random.key(3), 4)
    h = jax.random.normal(k[0], (3, 5, 12), dtype)
    a = (jax.random.normal(k[1], (12, 4)) * 0.3).astype(dtype)
    b = (jax.random.normal(k[2], (4, 7)) * 0.3).astype(dtype)
    g = jax.random.normal(k[3], (3, 5, 7), dtype)
    plain = lambda h, a, b: jnp.dot(jnp.dot(h, a), b) * 1.5  # noqa: E731
    ours = lambda h, a, b: lora_lib._lora_delta(h, a, b, 1.5)  # noqa: E731
    y0, vjp0 = jax.vjp(plain, h, a, b)
    y1, vjp1 = jax.vjp(ours, h, a, b)
    np.testing.assert_allclose(np.float32(y1), np.float32(y0), rtol=tol, atol=tol)
    for got, want in zip(vjp1(g), vjp0(g), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=tol, atol=tol * 10)
