"""Rollouts sample the policy being trained: bf16 decode, the sync gate, and the metrics that
show it (trainer-level, on the tiny model)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorarl_jax.rl import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH_REWARD = """
def length_reward(prompts, completions, **columns):
    return [len(c) / 20.0 for c in completions]
"""


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward") / "length_reward.py"
    path.write_text(LENGTH_REWARD)
    return f"{path}:length_reward"


def _overrides(model_dir, reward, out, **kw):
    ov = {
        "model.path": str(model_dir),
        "trainer.output_dir": str(out),
        "data.reward_fns": (reward,),
        "data.batch_size": 4,
        "rollout.num_generations": 4,
        "rollout.max_new_tokens": 16,
        "data.max_val_samples": 0,
        "trainer.eval_before": False,
        "trainer.tensorboard": False,
        "trainer.ckpt_interval": 0,
    }
    return ov | kw


def _main(ov: dict):
    flags = [f"--config.{k}={v if isinstance(v, str) else repr(v)}" for k, v in ov.items()]
    cmd = [sys.executable, "-m", "lorarl_jax.main", "--config", "configs/smoke.py", *flags]
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in open(os.path.join(ov["trainer.output_dir"], "metrics.jsonl"))]
    return r, [x["rollout/logp_gap_mean"] for x in lines if "rollout/logp_gap_mean" in x]


def test_bf16_default_rollouts_sample_the_trained_policy(tiny_model_dir, reward_file, tmp_path):
    """bf16 base, lr 1e-4, 5 steps: the default (merge=auto decodes unmerged) keeps the sampler
    within 1e-3 of the trainer; merging into bf16 kernels (merge=always) drifts past it."""
    bf16 = {"model.dtype": "bfloat16", "model.param_dtype": "bfloat16", "optim.lr": 1e-4}
    bf16["trainer.steps"] = 5
    r, gaps = _main(_overrides(tiny_model_dir, reward_file, tmp_path / "auto", **bf16))
    assert "unmerged" in r.stdout
    assert len(gaps) == 5 and max(gaps) <= 1e-3, gaps
    ov = _overrides(tiny_model_dir, reward_file, tmp_path / "always", **bf16)
    ov["rollout.merge"] = "always"
    ov["rollout.logp_gap_action"] = "off"
    _, merged = _main(ov)
    assert merged[0] <= 1e-3  # B = 0: merged == base
    assert max(merged[1:]) > 1e-3, merged  # updates rounded away: another policy is sampled


def _build(model_dir, reward, out, **kw):
    from lorarl_jax.config import from_config_dict
    from lorarl_jax.rl import setup

    c = _load_smoke().get_config()
    for k, v in _overrides(model_dir, reward, out, **kw).items():
        group, key = k.split(".")
        c[group][key] = v
    return setup.build(from_config_dict(c))


def _load_smoke():
    import importlib.util

    spec = importlib.util.spec_from_file_location("smoke", os.path.join(REPO, "configs/smoke.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _NeverSynced:
    """The most reported silent LoRA-RL failure: the sampler never receives the adapter."""

    def __init__(self, merge):
        self.merge = merge

    def __call__(self, base, lora):
        return self.merge(base, jax.tree.map(jnp.zeros_like, lora))


GATE = {"optim.lr": 0.02, "rollout.max_logp_gap": 1e-3, "trainer.steps": 3}


def test_sync_gate_errors_on_a_sampler_that_never_sees_the_adapter(
    tiny_model_dir, reward_file, tmp_path
):
    from lorarl_jax.checkpoint import Checkpointer

    out = tmp_path / "error"
    kw = GATE | {"rollout.logp_gap_action": "error", "trainer.ckpt_interval": 1}
    kw["trainer.async_checkpoint"] = False
    run = _build(tiny_model_dir, reward_file, out, **kw)
    run.programs = dataclasses.replace(run.programs, merge=_NeverSynced(run.programs.merge))
    with pytest.raises(trainer.LogpGapError, match=r"^step 2: sampler-vs-trainer log-prob gap"):
        trainer.train_run(run)
    with Checkpointer(out / "ckpt", save_interval_steps=1, max_to_keep=2, async_save=False) as ck:
        assert ck.latest_step() == 1  # step 2 was not saved: the last checkpoint is good


def test_sync_gate_warns_and_a_correct_run_never_fires(
    tiny_model_dir, reward_file, tmp_path, capsys
):
    run = _build(tiny_model_dir, reward_file, tmp_path / "warn", **GATE)
    run.programs = dataclasses.replace(run.programs, merge=_NeverSynced(run.programs.merge))
    trainer.train_run(run)
    err = capsys.readouterr().err
    assert err.count("WARNING: step 2: sampler-vs-trainer log-prob gap") == 1
    assert "step 3: sampler" not in err  # repeated at most every WARN_EVERY steps

    run = _build(tiny_model_dir, reward_file, tmp_path / "ok", **GATE)
    gate_before = trainer.LogpGapGate
    fired = []

    class Spy(gate_before):
        def check(self, step, metrics):
            super().check(step, metrics)
            fired.append((self.fired, metrics["rollout/logp_gap_mean"]))

    trainer.LogpGapGate = Spy
    try:
        trainer.train_run(run)
    finally:
        trainer.LogpGapGate = gate_before
    assert len(fired) == 3 and fired[-1][0] == 0, fired
    assert max(g for _, g in fired) < 1e-5  # fp32 merged decode == the trainer's forward
    assert "WARNING" not in capsys.readouterr().err


def test_update_metrics_take_max_of_max_keys():
    acc = {"rollout_is/ratio_max": [1.5, 3.0], "actor/pg_loss": [1.0, 3.0]}
    acc["actor/skipped"] = [1.0, 1.0]
    out = trainer.aggregate_updates(acc)
    want = {"rollout_is/ratio_max": 3.0, "actor/pg_loss": 2.0, "actor/skipped": 2.0}
    assert out == want | {"actor/updates": 2.0}
    assert trainer.aggregate_updates({}) == {"actor/skipped": 0.0, "actor/updates": 0.0}


def test_critic_uses_the_policy_loss_agg_mode(tiny_model_dir, reward_file, tmp_path):
    """PPO's value loss is aggregated with algo.loss_agg_mode, as verl's critic."""
    from lorarl_jax.rl import losses
    from lorarl_jax.rl.critic import response_values

    mode = "seq-mean-token-sum"
    kw = {"algo.adv_estimator": "gae", "algo.loss_agg_mode": mode, "trainer.steps": 1}
    run = _build(tiny_model_dir, reward_file, tmp_path / "ppo", **kw)
    assert run.static.cfg.algo.loss_agg_mode == mode
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, run.static.model_cfg.vocab_size, (4, 10)).astype(np.int32)
    attn = np.ones((4, 10), np.int32)
    rmask = np.ones((4, 4), np.int32)
    rmask[1, 2:] = 0
    state = run.state
    v = np.asarray(
        response_values(run.static.model_cfg.dense, state.critic_params, tokens, attn, 4)
    )
    returns = rng.normal(size=(4, 4)).astype(np.float32)
    mb = {"tokens": tokens, "attention_mask": attn, "response_mask": rmask}
    mb |= {"values": v, "returns": returns}
    clip = run.static.cfg.critic.cliprange_value
    want, _ = losses.value_loss(v, v, returns, rmask, clip, mode)
    token_mean, _ = losses.value_loss(v, v, returns, rmask, clip)
    update = run.programs.critic_update
    got = float(
        update(state.critic_params, state.critic_opt_state, run.place.put(mb))[2]["critic/vf_loss"]
    )
    np.testing.assert_allclose(got, float(want), rtol=1e-5)
    assert abs(float(want) - float(token_mean)) > 1e-3
