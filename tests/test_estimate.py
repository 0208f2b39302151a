"""Memory estimator (lorarl_jax/estimate/: model, params, cli): exact counts on tiny models, mesh
division, the seed's 7B claims, the CLI, and (slow) the step estimate vs XLA's memory analysis."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorarl_jax import estimate as M
from lorarl_jax.estimate import cli as E
from lorarl_jax.model.config import from_hf_dict
from lorarl_jax.model.lora import LoraConfig, count_params, init_lora
from lorarl_jax.model.transformer import init_params

GB = 1e9

TINY = {
    "llama": dict(
        model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8, head_dim=8,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    "qwen2": dict(
        model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    "gemma3_text": dict(
        model_type="gemma3_text", vocab_size=128, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        query_pre_attn_scalar=32, sliding_window=16, rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "full_attention"],
    ),
}  # fmt: skip


def tiny(name: str, **runtime):
    return from_hf_dict(dict(TINY[name]), **runtime)


def hand_params(d: dict) -> int:
    """Decoder parameter count from the config fields alone."""
    V, D, F, L = d["vocab_size"], d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"]
    H, K = d["num_attention_heads"], d["num_key_value_heads"]
    Dh = d.get("head_dim", D // H)
    gemma, qwen = d["model_type"] == "gemma3_text", d["model_type"] == "qwen2"
    attn = D * H * Dh + 2 * D * K * Dh + H * Dh * D + (H * Dh + 2 * K * Dh if qwen else 0)
    norms = (4 * D + 2 * Dh) if gemma else 2 * D
    head = 0 if d.get("tie_word_embeddings", gemma) else V * D
    return V * D + head + L * (attn + 3 * D * F + norms) + D


@pytest.mark.parametrize("name", sorted(TINY))
def test_param_count_is_exact(name):
    cfg = tiny(name)
    counted = sum(x.size for x in M.param_leaves(cfg))
    assert counted == count_params(init_params(cfg, jax.random.key(0)))
    assert counted == hand_params(TINY[name])


@pytest.mark.parametrize(
    "targets", [("q_proj", "v_proj"), ("o_proj", "down_proj"), ("all-linear",)]
)
def test_lora_count_equals_init_lora(targets):
    cfg, lcfg = tiny("qwen2"), LoraConfig(r=4, target_modules=targets)
    leaves = M.lora_leaves(cfg, lcfg)
    real = init_lora(init_params(cfg, jax.random.key(0)), lcfg, jax.random.key(1))
    assert sum(x.size for x in leaves) == count_params(real)
    assert {x.path: x.shape for x in leaves} == {p: v.shape for p, v in _flat(real).items()}


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out


def test_nf4_bytes_formula_and_layout():
    assert M.nf4_bytes(64) == 32 + 4  # 4 bits each + one fp32 absmax
    assert M.nf4_bytes(64 * 256, double_quant=True) == 64 * 128 + 256 + 4
    from lorarl_jax.model import quant

    w = np.random.default_rng(0).normal(size=(128, 64)).astype(np.float32)
    for dq in (False, True):
        real = sum(np.asarray(v).nbytes for v in quant.quantize_kernel(w, dq).values())
        extra = 4 if dq else 0  # bitsandbytes' fp32 mean offset of the double-quantized scales
        assert real == M.nf4_bytes(w.size, dq) + extra


def test_per_device_bytes_divide_by_the_mesh():
    cfg, lcfg = tiny("llama"), LoraConfig(r=4)
    wl = M.Workload(batch=4, num_generations=2, seq=8, max_new_tokens=8)
    prec = M.Precision("float32", "float32")
    one = M.estimate(cfg, lcfg, wl, prec, M.Options(mesh=(1, 1, 1)))["lora"]
    d = TINY["llama"]
    D, L, r = d["hidden_size"], d["num_hidden_layers"], lcfg.r
    norms = 4 * (2 * L + 1) * D  # replicated
    # fsdp × tensor = 8 splits every weight but the norms; data splits none
    sharded = M.estimate(cfg, lcfg, wl, prec, M.Options(mesh=(1, 2, 4)))["lora"]
    assert sharded.weights == (one.weights - norms) // 8 + norms
    assert M.estimate(cfg, lcfg, wl, prec, M.Options(mesh=(2, 1, 1)))["lora"].weights == one.weights
    # the rollout's merged copy is laid out for decode (DECODE_RULES): split over tensor only
    assert sharded.merged == (one.weights - norms) // 4 + norms
    # the adapter's embed-side matrix ([D, r] or [r, D]) of each of the 7 projections splits over
    # fsdp, the other over tensor
    fsdp2 = M.estimate(cfg, lcfg, wl, prec, M.Options(mesh=(1, 2, 1)))["lora"]
    assert fsdp2.adapter == one.adapter - 4 * L * 7 * D * r // 2
    assert fsdp2.optimizer == one.optimizer - 2 * 4 * L * 7 * D * r // 2
    # sequences split over data × fsdp, KV heads over tensor
    for mesh in ((2, 2, 1), (4, 1, 1), (1, 1, 4)):
        b = M.estimate(cfg, lcfg, wl, prec, M.Options(mesh=mesh))["lora"]
        assert b.kv_cache * 4 == one.kv_cache
        assert b.activations_no_remat < one.activations_no_remat / 2


def test_full_optimizer_state_of_7b_models_is_the_seeds_56_gb():
    prec = M.Precision()  # bf16 weights, fp32 AdamW moments
    for name in ("llama-2-7b", "qwen2.5-7b"):
        est = M.estimate(E.model_config(name, prec), LoraConfig(), M.Workload(), prec, M.Options())
        n = hand_params(E.PRESETS[name])
        assert est["full"].params == n
        assert est["full"].optimizer == 2 * 4 * n  # m and v in fp32
        assert 50 * GB < est["full"].optimizer < 62 * GB
        d = E.PRESETS[name]
        norms = (2 * d["num_hidden_layers"] + 1) * d["hidden_size"]  # RMSNorm scales stay fp32
        assert est["full"].weights == 2 * (n - norms) + 4 * norms  # the seed's 14 GB of bf16


def test_lora_optimizer_state_of_7b_is_megabytes():
    prec = M.Precision()
    cfg = E.model_config("llama-2-7b", prec)
    attn = LoraConfig(r=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    est = M.estimate(cfg, attn, M.Workload(), prec, M.Options())["lora"]
    n_lora = 32 * 4 * 16 * (4096 + 4096)  # ≈ the seed's "~20M trainable"
    assert est.trainable == n_lora
    assert est.optimizer == 2 * 4 * n_lora
    assert 100e6 < est.optimizer < 200e6  # the seed's 56 GB → ~160 MB
    # all seven projections of Qwen2.5-7B: 40 M adapter parameters, 323 MB of AdamW state
    qwen = M.estimate(E.model_config("qwen2.5-7b", prec), LoraConfig(r=16), M.Workload(), prec,
                      M.Options())["lora"]  # fmt: skip
    D, F, kv, L = 3584, 18944, 4 * 128, 28
    per_layer = 16 * (2 * (D + D) + 2 * (D + kv) + 2 * (D + F) + (F + D))
    assert qwen.trainable == L * per_layer
    assert qwen.optimizer == 8 * L * per_layer


def test_qlora_rl_on_7b_fits_a_24gb_card():
    """With gradient checkpointing at its design value (block inputs + one block): XLA:CPU does not
    honour remat past ~4 layers (estimate/model.py docstring), so this is not demonstrated here."""
    prec = M.Precision()
    cfg = E.model_config("qwen2.5-7b", prec)
    wl = M.Workload(batch=4, num_generations=8, seq=256, max_new_tokens=512, micro_batch=8,
                    remat=True)  # fmt: skip
    est = M.estimate(cfg, LoraConfig(r=16), wl, prec, M.Options())
    q = est["qlora"]
    D, F, kv, L = 3584, 18944, 4 * 128, 28
    linear = L * (2 * D * D + 2 * D * kv + 3 * D * F)
    other = hand_params(E.PRESETS["qwen2.5-7b"]) - linear
    norms = (2 * L + 1) * D  # fp32 in the model, whatever param_dtype says
    # NF4 kernels + embeddings/head/biases in bf16
    assert q.weights == linear // 2 + linear // 64 * 4 + 2 * (other - norms) + 4 * norms
    assert 3 * GB < linear * 0.5625 < 4 * GB  # the seed's 3.5 GB of 4-bit weights
    cache = L * 2 * 32 * kv * 768 * 2  # bf16 K and V of 32 sequences × 768 positions
    assert q.kv_cache >= cache
    lower = q.weights + q.adapter + q.gradients + q.optimizer + cache
    assert lower < q.peak < 24 * 2**30
    assert est["lora"].peak > q.peak + 7 * GB  # bf16 base + its merged copy
    assert est["full"].peak > 100 * GB
    assert est["full"].reference == est["full"].weights == 2 * (linear + other) + 2 * norms
    ppo = M.estimate(cfg, LoraConfig(r=16), wl, prec, M.Options(critic=True))["full"]
    assert ppo.peak > 150 * GB  # "full RL on 7B: easily 150 GB+" (actor, critic, reference)


def test_workload_checks_micro_batch():
    with pytest.raises(ValueError, match="micro_batch"):
        _ = M.Workload(batch=2, num_generations=4, micro_batch=6).micro
    with pytest.raises(ValueError, match="micro_batch"):
        _ = M.Workload(batch=2, num_generations=4, micro_batch=3).micro


def test_sub_group_micro_batch_counts_its_prompt_once():
    """micro_batch=2 of groups of 4 (sub-groups, each with its prompt) keeps what one whole group
    of 2 keeps: 1 prompt + 2 responses."""
    cfg = E.model_config("smollm2-135m", M.Precision())
    prec, lcfg = M.Precision(), LoraConfig(r=8)
    half = M.Workload(batch=2, num_generations=4, seq=64, max_new_tokens=32, micro_batch=2)
    whole = M.Workload(batch=4, num_generations=2, seq=64, max_new_tokens=32, micro_batch=2)
    assert half.micro == 2
    for remat in (False, True):
        a, b = (
            M.activation_bytes(cfg, lcfg, w, prec, (1, 1, 1), "lora", remat) for w in (half, whole)
        )
        assert a == b
        full = dataclasses.replace(half, micro_batch=4)
        assert M.activation_bytes(cfg, lcfg, full, prec, (1, 1, 1), "lora", remat) > a


def test_cli_on_config_json_and_preset(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY["gemma3_text"]))
    args = ["--batch", "2", "--num_generations", "2", "--seq", "8", "--max_new_tokens", "8"]
    est = E.main(["--model", str(path), "--lora.r", "4", "--mesh", "1,2,1", *args])
    out = capsys.readouterr().out
    assert "PEAK per device" in out and "QLoRA" in out and "fsdp=2" in out
    assert est["lora"].peak > est["qlora"].peak
    E.main(["--model", "smollm2-135m", "--lora.target_modules", "q_proj,v_proj", "--json", *args])
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"full", "lora", "qlora"}
    assert data["lora"]["trainable"] == 30 * 16 * ((576 + 576) + (576 + 192))
    fp32 = ["--model", "smollm2-135m", "--dtype", "float32", *args]
    full = E.main(fp32)["lora"].merged
    half = E.main([*fp32, "--rollout_weight_dtype", "bfloat16"])
    assert "rollout weights bfloat16" in capsys.readouterr().out
    assert 0.49 < half["lora"].merged / full < 0.51  # SmolLM2: all but 0.03 % in matrices
    with pytest.raises(ValueError, match="preset"):
        E.main(["--model", "no-such-model"])


@pytest.mark.slow
def test_train_step_estimate_matches_xla_memory_analysis():
    """The LoRA step of a 4-layer SmolLM2-shaped model, compiled from abstract shapes."""
    import flax.linen as nn

    from lorarl_jax.config import AlgoCfg, OptimCfg
    from lorarl_jax.model.transformer import abstract_params
    from lorarl_jax.rl import step as step_lib

    prec = M.Precision("float32", "float32")
    cfg = E.model_config("smollm2-135m", prec).replace(num_layers=4)
    lcfg = LoraConfig(r=16)
    B, n, P, N, C = 2, 4, 64, 64, 16
    wl = M.Workload(batch=B, num_generations=n, seq=P, max_new_tokens=N, logprob_chunk=C)
    est = M.estimate(cfg, lcfg, wl, prec, M.Options())["lora"]
    base = nn.unbox(abstract_params(cfg))
    lora = jax.eval_shape(lambda: init_lora(base, lcfg, jax.random.key(0)))
    tx = step_lib.make_optimizer(OptimCfg(), 10)
    step = step_lib.make_policy_step(cfg, lcfg, AlgoCfg(logprob_chunk=C), tx, 1.0, n)
    S, i32, f32 = jax.ShapeDtypeStruct, jnp.int32, jnp.float32
    batch = dict(
        prompt_tokens=S((B, P), i32), prompt_mask=S((B, P), i32), responses=S((B * n, N), i32),
        response_mask=S((B * n, N), i32), advantages=S((B * n, N), f32),
        ref_logp=S((B * n, N), f32),
    )  # fmt: skip
    key = jax.eval_shape(lambda: jax.random.key(0))
    m = step.lower(lora, jax.eval_shape(tx.init, lora), base, batch, key).compile()
    m = m.memory_analysis()
    xla = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    xla += m.temp_size_in_bytes
    assert 0.75 < est.train_program / xla < 1.25


def test_scan_layers_adds_the_stacked_copy_of_the_layer_weights():
    """model.scan_layers stacks the decoder layers' weights in every training pass: the train
    step and log-prob pass grow by exactly those bytes (NF4 leaves for QLoRA), nothing else."""
    cfg = from_hf_dict(TINY["llama"])
    params = init_params(cfg, jax.random.key(0))
    layers = sum(
        x.nbytes for k, v in params.items() if k.startswith("layers_") for x in jax.tree.leaves(v)
    )
    lcfg, prec = LoraConfig(r=4), M.Precision(param_dtype="float32", dtype="float32")
    off = M.estimate(cfg, lcfg, M.Workload(), prec, M.Options())
    on = M.estimate(cfg, lcfg, M.Workload(scan_layers=True), prec, M.Options())
    for mode in ("full", "lora"):
        assert on[mode].stacked == layers and off[mode].stacked == 0
        assert on[mode].logprob_program - off[mode].logprob_program == layers
    assert on["lora"].train_program - off["lora"].train_program == layers
    assert 0 < on["qlora"].stacked < 0.35 * layers  # 4-bit codes + scales + fp32 norms


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_merged_copy_bytes_match_the_jitted_merge(name):
    """The estimator's rollout copy (`merged`) is the bytes the jitted merge returns, with fp32
    weights and with `rollout.weight_dtype=bfloat16` (matrices in bf16, vectors kept fp32)."""
    from lorarl_jax.sampling.rollout_weights import jit_merge

    cfg = tiny(name)
    params = init_params(cfg, jax.random.key(0))
    lcfg = LoraConfig(r=4)
    lora = init_lora(params, lcfg, jax.random.key(1))
    prec = M.Precision(param_dtype="float32", dtype="float32")
    merged_est = {}
    for wd in ("", "bfloat16"):
        merged = jit_merge(cfg, lcfg, weight_dtype=wd)(params, lora)
        real = sum(x.nbytes for x in jax.tree.leaves(merged))
        p = dataclasses.replace(prec, rollout_weight_dtype=wd)
        est = M.estimate(cfg, lcfg, M.Workload(), p, M.Options())["lora"]
        assert est.merged == real and est.sampler_weights == real
        merged_est[wd] = est.merged
    mats = sum(x.nbytes for x in jax.tree.leaves(params) if x.ndim >= 2)
    assert merged_est[""] - merged_est["bfloat16"] == mats // 2
