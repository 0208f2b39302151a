"""Full-parameter RL (`lora.r=0`): config errors, the freeze mask, learning, the frozen reference,
HF export with equal logits, exact resume, and the mesh / scan switches not changing the run."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from ml_collections import ConfigDict

from lorarl_jax.config import FullCfg, default_config, from_config_dict
from lorarl_jax.rl import policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YES_REWARD = """
def yes_fraction(prompts, completions, **columns):
    return [sum(w == "yes" for w in c.split()) / 8.0 for c in completions]
"""
LENGTH_REWARD = """
def length_reward(prompts, completions, **columns):
    return [len(c) / 20.0 for c in completions]
"""


def _smoke(model_dir, out, **groups) -> ConfigDict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("smoke", os.path.join(REPO, "configs/smoke.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.model.path = str(model_dir)
    c.lora.r = 0
    c.trainer.output_dir = str(out)
    c.trainer.tensorboard = False
    for g, kv in groups.items():
        c[g].update(kv)
    return c


@pytest.mark.parametrize(
    "overrides, expect",
    [
        ({"model": {"quantization": "nf4"}}, "model.quantization='nf4' with lora.r=0"),
        ({"lora": {"init_adapter_path": "/x"}}, "lora.init_adapter_path"),
        ({"lora": {"lora_dropout": 0.1}}, "lora.r=0 has no adapter"),
        ({"rollout": {"merge": "always"}}, "rollout.merge"),
        ({"full": {"frozen": "("}}, "full.frozen='(' is not a regex"),
        ({"lora": {"r": 8}, "full": {"frozen": "embed"}}, "for lora.r=0 only"),
        ({"lora": {"r": -1}}, "lora.r"),
    ],
)
def test_full_mode_config_errors(overrides, expect):
    c = default_config()
    c.lora.r = 0
    for g, kv in overrides.items():
        c[g].update(kv)
    with pytest.raises(ValueError, match=expect.replace("(", r"\(").replace(".", r"\.")):
        from_config_dict(c)


def _tree():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "embed_tokens": {"embedding": jax.random.normal(k[0], (8, 4))},
        "layers_0": {
            "mlp": {"up_proj": {"kernel": jax.random.normal(k[1], (4, 6))}},
            "input_layernorm": {"scale": jax.random.normal(k[2], (4,))},
        },
    }


def test_labels_freeze_leaves_and_optimizer_state():
    """full.trainable / full.frozen → labels; frozen leaves get no gradient (stop_gradient) and
    no update or state, trained ones get exactly AdamW's update."""
    params = _tree()
    labels = policy.param_labels(params, FullCfg(frozen="embed_tokens|norm"))
    assert labels["embed_tokens"]["embedding"] == policy.FREEZE
    assert labels["layers_0"]["input_layernorm"]["scale"] == policy.FREEZE
    assert labels["layers_0"]["mlp"]["up_proj"]["kernel"] == policy.TRAIN
    only = policy.param_labels(params, FullCfg(trainable=r"layers_\d+/mlp"))
    assert jax.tree.leaves(only).count(policy.TRAIN) == 1
    with pytest.raises(ValueError, match="leave no parameter to train"):
        policy.check_labels(policy.param_labels(params, FullCfg(frozen=".")), FullCfg(frozen="."))

    def loss(p):
        p = policy.stop_frozen(p, labels)
        return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(p))

    g = jax.grad(loss)(params)
    assert float(jnp.abs(g["embed_tokens"]["embedding"]).max()) == 0.0
    np.testing.assert_allclose(
        g["layers_0"]["mlp"]["up_proj"]["kernel"],
        jnp.cos(params["layers_0"]["mlp"]["up_proj"]["kernel"]),
        rtol=1e-6,
    )
    adam = optax.adamw(0.1, weight_decay=0.01)
    tx = policy.masked_optimizer(adam, labels)
    state = tx.init(params)
    n_state = sum(x.size for x in jax.tree.leaves(state))
    assert n_state == 2 * 24 + 1  # moments of the one trained kernel + the step counter
    updates, _ = tx.update(g, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(
        new["embed_tokens"]["embedding"], params["embed_tokens"]["embedding"]
    )
    k = ("layers_0", "mlp", "up_proj", "kernel")
    kernel = params[k[0]][k[1]][k[2]][k[3]]
    ref_up, _ = adam.update(g[k[0]][k[1]][k[2]][k[3]], adam.init(kernel), kernel)
    np.testing.assert_allclose(new[k[0]][k[1]][k[2]][k[3]], kernel + ref_up, rtol=1e-6)


def _logits_ours(model_cfg, params, ids):
    from lorarl_jax.model.transformer import Transformer, positions_from_mask

    mask = jnp.ones_like(ids)
    logits, _ = Transformer(model_cfg).apply(
        {"params": params}, ids, positions_from_mask(mask), mask
    )
    return np.asarray(logits)


def test_full_rl_learns_keeps_reference_and_exports(tiny_model_dir, tmp_path):
    """GRPO with every parameter trainable learns to say 'yes' on the tiny model (as the LoRA test
    does); the reference stays the initial model; there is no adapter anywhere; the checkpoint
    holds `params`; the exported HF model loads in transformers with our logits."""
    from transformers import AutoModelForCausalLM

    from lorarl_jax.model.hf import load_hf_model
    from lorarl_jax.rl.setup import build
    from lorarl_jax.rl.trainer import train_run

    fn = tmp_path / "yes.py"
    fn.write_text(YES_REWARD)
    c = _smoke(
        tiny_model_dir,
        tmp_path / "run",
        rollout=dict(num_generations=8),
        data=dict(batch_size=4, reward_fns=(f"{fn}:yes_fraction",), max_val_samples=0),
        optim=dict(lr=1e-2),
        trainer=dict(steps=10, ckpt_interval=5, async_checkpoint=False),
    )
    run = build(from_config_dict(c))
    model_cfg, initial = load_hf_model(tiny_model_dir)
    assert jax.tree.structure(run.state.lora) == jax.tree.structure(initial)  # no lora_a / lora_b
    summary = train_run(run)
    rewards = [
        x["reward/mean"]
        for x in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))
        if "reward/mean" in x
    ]
    assert len(rewards) == 10
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert last > first + 0.2 and last > 0.3, rewards
    for a, b in zip(jax.tree.leaves(run.base), jax.tree.leaves(initial), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # π_ref = initial weights
    moved = max(
        float(jnp.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(run.state.lora), jax.tree.leaves(initial), strict=True)
    )
    assert moved > 1e-3
    items = os.listdir(tmp_path / "run" / "ckpt" / "10")
    assert "params" in items and "opt_state" in items and "lora" not in items, items
    assert summary["model"] == str(tmp_path / "run" / "model")
    assert not (tmp_path / "run" / "adapter").exists()
    ids = np.array([[3, 10, 11, 4, 7, 9]])
    ours = _logits_ours(model_cfg, jax.device_get(run.state.lora), jnp.asarray(ids))
    with torch.no_grad():
        hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "model")).eval()
        theirs = hf_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4)
    initial_logits = _logits_ours(model_cfg, initial, jnp.asarray(ids))
    assert np.abs(theirs - initial_logits).max() > 1e-2  # the export is the trained model

    # scripts/export.py from the checkpoint: the same model; --peft is a clear error
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    export = [sys.executable, "scripts/export.py", "--run-dir", str(tmp_path / "run")]
    r = subprocess.run(
        export + ["--merged", str(tmp_path / "m")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "exported step 10" in r.stdout, r.stderr[-2000:]
    from safetensors.numpy import load_file

    a = load_file(str(tmp_path / "m" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    r = subprocess.run(
        export + ["--peft", str(tmp_path / "p")], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert r.returncode != 0 and "full-parameter run" in r.stderr


def test_frozen_pattern_keeps_those_weights(tiny_model_dir, tmp_path):
    """full.frozen='embed_tokens': one full-parameter step leaves the (tied) embedding equal to
    the base and moves every other kernel."""
    from lorarl_jax.model.hf import load_hf_model
    from lorarl_jax.rl.setup import build
    from lorarl_jax.rl.trainer import train_run

    fn = tmp_path / "len.py"
    fn.write_text(LENGTH_REWARD)
    c = _smoke(
        tiny_model_dir,
        tmp_path / "run",
        full=dict(frozen="embed_tokens"),
        data=dict(reward_fns=(f"{fn}:length_reward",), max_val_samples=0),
        trainer=dict(steps=1, ckpt_interval=0),
    )
    run = build(from_config_dict(c))
    train_run(run)
    _, initial = load_hf_model(tiny_model_dir)
    np.testing.assert_array_equal(
        np.asarray(run.state.lora["embed_tokens"]["embedding"]),
        np.asarray(initial["embed_tokens"]["embedding"]),
    )
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        got = run.state.lora["layers_0"]["self_attn"][name]["kernel"]
        want = initial["layers_0"]["self_attn"][name]["kernel"]
        assert float(jnp.abs(got - want).max()) > 0, name


# ------------------------------------------------------------ runs in their own processes


def _main(overrides: dict, devices: int = 1, *extra: str):
    flags = [f"--config.{k}={v if isinstance(v, str) else repr(v)}" for k, v in overrides.items()]
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
    )
    cmd = [sys.executable, "-m", "lorarl_jax.main", "--config", "configs/smoke.py"]
    r = subprocess.run(
        cmd + flags + list(extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _model(run_dir):
    from safetensors.numpy import load_file

    return load_file(os.path.join(run_dir, "model", "model.safetensors"))


def _lines(run_dir):
    skip = ("time/", "perf/")
    return [
        {k: v for k, v in json.loads(x).items() if not k.startswith(skip)}
        for x in open(os.path.join(run_dir, "metrics.jsonl"))
    ]


@pytest.fixture(scope="module")
def full_runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    reward = root / "length_reward.py"
    reward.write_text(LENGTH_REWARD)

    def overrides(name, **kw):
        return {
            "model.path": str(tiny_model_dir),
            "lora.r": 0,
            "trainer.output_dir": str(root / name),
            "data.reward_fns": (f"{reward}:length_reward",),
            "data.batch_size": 8,
            "rollout.num_generations": 4,
            "algo.ppo_mini_batch_size": 4,  # two updates per step: π_old is its own forward
            "algo.micro_batch_size": 8,  # sequences: two micro-batches per update
            "data.max_val_samples": 0,
            "optim.lr": 1e-3,
            "trainer.eval_before": False,
            "trainer.tensorboard": False,
            "trainer.async_checkpoint": False,
            **kw,
        }

    return overrides


def test_full_resume_is_identical(full_runs):
    """4 steps straight == 2 steps, then resumed to 4: the same model and metrics, bit for bit
    (the policy's parameters and AdamW state come back from the checkpoint's `params` item)."""
    straight = full_runs("straight", **{"trainer.steps": 4, "trainer.ckpt_interval": 2})
    _main(straight)
    part = full_runs("part", **{"trainer.steps": 2, "trainer.ckpt_interval": 2})
    _main(part)
    r = _main(dict(part, **{"trainer.steps": 4, "trainer.resume": True}))
    assert "resumed from" in r.stdout
    a, b = _model(straight["trainer.output_dir"]), _model(part["trainer.output_dir"])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert _lines(straight["trainer.output_dir"]) == _lines(part["trainer.output_dir"])


def _close(run_dir, ref_dir):
    """(worst relative difference of the logged numbers, worst |Δ| of the final weights, the
    fraction of weights off by more than 1e-5)."""
    got, ref = _lines(run_dir), _lines(ref_dir)
    assert [x["step"] for x in got] == [x["step"] for x in ref]
    worst = 0.0
    for x, y in zip(got, ref, strict=True):
        assert set(x) == set(y)
        for k, v in x.items():
            if k.startswith(("reward/", "response/")):
                assert v == y[k], k  # the same tokens were sampled
            elif not k.startswith("rollout/logp_gap"):
                worst = max(worst, abs(v - y[k]) / max(abs(y[k]), 1e-3))
    a, b = _model(run_dir), _model(ref_dir)
    diff = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in b])
    return worst, float(diff.max()), float(np.mean(diff > 1e-5))


def test_full_mesh_and_scan_remat_equal_one_device(full_runs):
    """Mesh (1,2,4) on 8 devices (params and AdamW moments sharded as the base) and the scanned
    decoder with remat each give the one-device unrolled run's metrics and weights."""
    ref = full_runs("ref", **{"trainer.steps": 2})
    _main(ref)
    mesh = full_runs("mesh", **{"trainer.steps": 2, "trainer.mesh": (1, 2, 4)})
    _main(mesh, 8)
    scan = full_runs(
        "scan",
        **{"trainer.steps": 2, "model.scan_layers": True, "model.gradient_checkpointing": True},
    )
    _main(scan)
    # Adam moves a weight by ≈ lr · g / (|g| + eps): where g is at float-noise level (a few
    # entries of the tied embedding) another summation order moves it by a fraction of lr. So:
    # metrics ≤ 1e-4 relative, ≥ 99.9 % of the weights within 1e-5 and all within 0.05 · lr ·
    # updates (4 updates at lr 1e-3; measured: 1 of 20640 entries off, by 3.7e-5 on the mesh)
    for run in (mesh, scan):
        metrics, worst, frac = _close(run["trainer.output_dir"], ref["trainer.output_dir"])
        print(f"{run['trainer.output_dir']}: metrics {metrics:.2e}, weights {worst:.2e} ({frac})")
        assert metrics <= 1e-4 and frac <= 1e-3 and worst <= 0.05 * 1e-3 * 4, (metrics, worst)
