"""`rollout.weight_dtype=bfloat16`: bf16 rollout weights with fp32 activations (mixed dots)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, left_padded_batch
from test_sampler import _full_forward_greedy, _gen

from lorarl_jax.model.hf import load_hf_model
from lorarl_jax.model.lora import mixed_dot
from lorarl_jax.model.transformer import Transformer, positions_from_mask
from lorarl_jax.sampling import sampler as S
from lorarl_jax.sampling.rollout_weights import round_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mixed_dot_rounds_operands_and_accumulates_in_fp32():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(64, 48)), jnp.float32)
    got = mixed_dot(x, w.astype(jnp.bfloat16), jnp.float32, jnp.bfloat16)
    assert got.dtype == jnp.float32
    # bf16 × bf16 products are exact in fp32: only the summation order may differ
    ref = np.float32(x.astype(jnp.bfloat16)) @ np.float32(w.astype(jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    assert np.abs(ref - np.asarray(x) @ np.asarray(w)).max() > 1e-3  # the rounding is real
    np.testing.assert_array_equal(mixed_dot(x, w, jnp.float32), jnp.dot(x, w))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # tied head / separate head with biases
def test_bf16_weights_decode_equals_their_full_forward(kind, hf_dir):
    """The KV-cache sampler on bf16-rounded matrices (dot_dtype=bfloat16) gives the greedy tokens
    and log-probs of the no-cache forward of the same weights; logits stay fp32 and close to
    (but not equal to) the fp32 model's."""
    cfg, params = load_hf_model(hf_dir(kind))
    cfg16, p16 = cfg.replace(dot_dtype="bfloat16"), round_weights(params, jnp.bfloat16)
    kernel = p16["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.dtype == jnp.bfloat16 and p16["norm"]["scale"].dtype == jnp.float32
    tokens, mask = left_padded_batch(TINY[kind]["vocab_size"], [7, 3, 5], 7, seed=2)
    ref_tok, ref_lp = _full_forward_greedy(cfg16, p16, tokens, mask, 6)
    r = _gen(cfg16, p16, tokens, mask, jax.random.key(0), S.SamplingParams(greedy=True))
    np.testing.assert_array_equal(np.asarray(r.tokens), ref_tok)
    np.testing.assert_allclose(np.asarray(r.logp), ref_lp, atol=1e-4)

    pos = positions_from_mask(jnp.asarray(mask))
    z16, _ = Transformer(cfg16).apply({"params": p16}, jnp.asarray(tokens), pos, mask)
    z32, _ = Transformer(cfg).apply({"params": params}, jnp.asarray(tokens), pos, mask)
    assert z16.dtype == jnp.float32
    gap = float(jnp.abs(z16 - z32).max())
    assert 1e-4 < gap < 0.1 * float(jnp.abs(z32).max()), gap


def test_config_needs_merged_fp32_weights():
    from lorarl_jax.config import default_config, from_config_dict

    c = default_config()
    c.rollout.weight_dtype = "bfloat16"
    assert from_config_dict(c).rollout.max_logp_gap == 0.05  # its own gate, not fp32's 0.01
    for key, value in (("rollout.merge", "never"), ("model.quantization", "nf4")):
        bad = default_config()
        bad.rollout.weight_dtype = "bfloat16"
        group, name = key.split(".")
        setattr(getattr(bad, group), name, value)
        with pytest.raises(ValueError, match="rollout.weight_dtype=bfloat16 rounds the merged"):
            from_config_dict(bad)
    bad = default_config()
    bad.rollout.weight_dtype = "float16"
    with pytest.raises(ValueError, match="rollout.weight_dtype"):
        from_config_dict(bad)


@pytest.mark.parametrize("rank", [8, 0])  # LoRA (merged, then rounded) and full-parameter RL
def test_trainer_runs_bf16_rollouts_and_measures_the_gap(tiny_model_dir, tmp_path, rank):
    """3 steps at lr 1e-3: the run completes, says what it decodes on, and the sampler-vs-trainer
    gap is that of bf16 weights: above fp32's (~1e-6) and below its gate (0.05)."""
    out = tmp_path / "run"
    flags = {
        "model.path": str(tiny_model_dir),
        "trainer.output_dir": str(out),
        "trainer.steps": 3,
        "data.batch_size": 2,
        "rollout.num_generations": 4,
        "rollout.max_new_tokens": 12,
        "rollout.weight_dtype": "bfloat16",
        "data.max_val_samples": 0,
        "trainer.eval_before": False,
        "trainer.ckpt_interval": 0,
        "optim.lr": 1e-3,
        "lora.r": rank,
    }
    argv = [f"--config.{k}={v}" for k, v in flags.items()]
    cmd = [sys.executable, "-m", "lorarl_jax.main", "--config", "configs/smoke.py", *argv]
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rollout.weight_dtype=bfloat16: decode on the merged weights rounded" in r.stdout
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    gaps = [x["rollout/logp_gap_mean"] for x in lines if "rollout/logp_gap_mean" in x]
    assert len(gaps) == 3 and all(1e-5 < g < 0.05 for g in gaps), gaps
    cfg = json.load(open(out / "run_config.json"))
    assert cfg["rollout"]["max_logp_gap"] == 0.05
