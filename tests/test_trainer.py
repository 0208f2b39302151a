"""End to end through `main` and the trainer on a tiny model: smoke, resume, learning, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(args, cwd=REPO, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "lorarl_jax.main", "--config", "configs/smoke.py", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_smoke_config_runs_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    r = _main([f"--config.model.path={tiny_model_dir}", f"--config.trainer.output_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    steps = [x["step"] for x in lines if "reward/mean" in x]
    assert steps == [1, 2]
    assert all(np.isfinite(x["actor/loss"]) for x in lines if "actor/loss" in x)
    if sys.platform == "linux":  # the peak RSS so far after each phase: never decreasing, but
        # for the kernel's per-CPU RSS counters that VmHWM reads (seen 0.06 MiB lower once)
        peaks = [
            x[f"perf/peak_rss_{p}_gib"]
            for x in lines
            for p in ("eval", "rollout", "update")
            if f"perf/peak_rss_{p}_gib" in x
        ]
        assert len(peaks) == 2 + 2 * 2 and 0.1 < peaks[0] < 8, peaks
        assert all(b > a - 0.01 for a, b in zip(peaks[:-1], peaks[1:], strict=True)), peaks
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "curves.png").exists()
    assert any(os.scandir(out / "tb"))


def _metric_lines(path):
    return [json.loads(x) for x in open(path)]


def _comparable(lines):
    skip = ("time/", "perf/")
    return [{k: v for k, v in x.items() if not k.startswith(skip)} for x in lines]


def test_resume_after_kill_is_identical(tiny_model_dir, tmp_path):
    """4 steps straight vs. killed after ≥2 checkpoints then resumed → same adapter, metrics."""
    import signal
    import time

    from safetensors.numpy import load_file

    common = [
        f"--config.model.path={tiny_model_dir}",
        "--config.trainer.steps=4",
        "--config.trainer.ckpt_interval=1",
        "--config.trainer.async_checkpoint=False",
        "--config.trainer.eval_before=False",
    ]
    straight = tmp_path / "straight"
    r = _main(common + [f"--config.trainer.output_dir={straight}"])
    assert r.returncode == 0, r.stderr[-3000:]

    killed = tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    args = [sys.executable, "-m", "lorarl_jax.main", "--config", "configs/smoke.py"]
    p = subprocess.Popen(
        args + common + [f"--config.trainer.output_dir={killed}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once step 2 is checkpointed (orbax renames on commit)
        if (killed / "ckpt" / "2").exists():
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (killed / "adapter").exists(), "the run finished before it could be killed"
    r = _main(common + [f"--config.trainer.output_dir={killed}", "--config.trainer.resume=True"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout

    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    ma = _comparable(_metric_lines(straight / "metrics.jsonl"))
    mb = _comparable(_metric_lines(killed / "metrics.jsonl"))
    assert [x["step"] for x in mb] == [x["step"] for x in ma]
    assert ma == mb


YES_REWARD = '''
def yes_fraction(prompts, completions, **columns):
    """Fraction of generated words that are 'yes' (a dense, trivially learnable signal)."""
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(w == "yes" for w in words) / 8.0)
    return out
'''

LENGTH_REWARD = '''
def char_length(prompts, completions, **columns):
    """Completion length in characters / 100: dense and never constant across a random group."""
    return [len(c) / 100.0 for c in completions]
'''


def test_reward_rises_on_learnable_task(tiny_model_dir, tmp_path):
    """A real learning signal: GRPO on a random tiny model learns to say 'yes'."""
    from ml_collections import ConfigDict

    from lorarl_jax.config import from_config_dict
    from lorarl_jax.rl.trainer import train

    fn = tmp_path / "yes_reward.py"
    fn.write_text(YES_REWARD)
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "smoke_cfg", os.path.join(REPO, "configs/smoke.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c: ConfigDict = mod.get_config()
    c.model.path = tiny_model_dir
    c.lora.target_modules = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    c.lora.r = 8
    c.lora.lora_alpha = 16.0
    c.rollout.num_generations = 8
    c.data.batch_size = 4
    c.data.reward_fns = (f"{fn}:yes_fraction",)
    c.data.max_val_samples = 0
    c.optim.lr = 2e-2
    c.trainer.steps = 10
    c.trainer.ckpt_interval = 0
    c.trainer.output_dir = str(tmp_path / "run")
    train(from_config_dict(c))
    rewards = [
        x["reward/mean"]
        for x in _metric_lines(tmp_path / "run" / "metrics.jsonl")
        if "reward/mean" in x
    ]
    assert len(rewards) == 10
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert last > first + 0.2 and last > 0.3, rewards


def test_unknown_config_key_is_a_clear_error(tiny_model_dir, tmp_path):
    r = _main([f"--config.model.path={tiny_model_dir}", "--config.algo.kl_los_coef=0.1"])
    assert r.returncode != 0
    assert "kl_los_coef" in r.stderr and "kl_loss_coef" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--config.model.path=/nonexistent/model"], "/nonexistent/model"),
        (["--config.lora.target_modules=('q_proj','qq_proj')"], "qq_proj"),
        (["--config.algo.adv_estimator=grpoo"], "adv_estimator"),
    ],
)
def test_bad_inputs_give_one_line_errors(args, expect, tiny_model_dir, tmp_path):
    base = [f"--config.model.path={tiny_model_dir}", f"--config.trainer.output_dir={tmp_path}/r"]
    r = _main(base + args)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert err and err[-1].startswith("error:") and expect in err[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_malformed_row_names_file_and_row(tiny_model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lorarl_jax.data import write_rows
    from lorarl_jax.datasets import arith_rows

    rows = arith_rows(6, 0)
    good = tmp_path / "train.parquet"
    write_rows(rows, good)
    table = pq.read_table(good).to_pylist()
    table[3]["prompt"] = []
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(table), bad)
    r = _main(
        [
            f"--config.model.path={tiny_model_dir}",
            f"--config.data.train_files={bad}",
            f"--config.trainer.output_dir={tmp_path}/r",
        ]
    )
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert str(bad) in last and "row 3" in last, last


def test_existing_checkpoints_are_not_overwritten(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = [
        f"--config.model.path={tiny_model_dir}",
        f"--config.trainer.output_dir={out}",
        "--config.trainer.steps=1",
        "--config.trainer.eval_before=False",
    ]
    assert _main(args).returncode == 0
    r = _main(args)
    assert r.returncode == 2 and "resume=True" in r.stderr.strip().splitlines()[-1]
    assert (out / "ckpt" / "1").exists()


@pytest.mark.parametrize("torch_importable", [True, False])
def test_training_runtime_does_not_import_torch(tiny_model_dir, tmp_path, torch_importable):
    """The whole smoke run imports no torch when torch is installed (transformers and tensorboardX
    would: lorarl_jax/process.py), and works with torch made unimportable."""
    hide = "" if torch_importable else "sys.modules['torch'] = None; "
    code = (
        f"import sys, runpy; {hide}"
        "sys.argv = ['main', '--config', 'configs/smoke.py', "
        f"'--config.model.path={tiny_model_dir}', '--config.trainer.output_dir={tmp_path}/r', "
        "'--config.trainer.steps=1']\n"
        "try:\n    runpy.run_module('lorarl_jax.main', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('TORCH', sys.modules.get('torch') is not None)"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "TORCH False"
    assert "PyTorch was not found" not in r.stderr
    assert (tmp_path / "r" / "adapter" / "adapter_model.safetensors").exists()


def _smoke_cfg(tiny_model_dir, out, **groups):
    import importlib.util

    spec = importlib.util.spec_from_file_location("smoke", os.path.join(REPO, "configs/smoke.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.model.path = tiny_model_dir
    c.trainer.update(output_dir=str(out), ckpt_interval=0, eval_before=False)
    for g, kv in groups.items():
        c[g].update(kv)
    return c


@pytest.mark.parametrize(
    "algo",
    [
        # PPO: critic + GAE, KL in reward with the adaptive controller, 2 epochs × 2 mini-batches
        dict(
            adv_estimator="gae",
            lam=0.95,
            use_kl_in_reward=True,
            kl_ctrl="adaptive",
            use_kl_loss=False,
            ppo_epochs=2,
            ppo_mini_batch_size=1,
        ),
        dict(adv_estimator="rloo", micro_batch_size=4, loss_agg_mode="seq-mean-token-sum-norm"),
        dict(
            adv_estimator="reinforce_plus_plus",
            gamma=0.99,
            use_kl_loss=True,
            kl_loss_type="k2",
            entropy_coeff=0.01,
        ),
    ],
    ids=["ppo_gae", "rloo", "reinforce_pp"],
)
def test_algorithm_variants_run_and_update(algo, tiny_model_dir, tmp_path):
    from lorarl_jax.config import from_config_dict
    from lorarl_jax.rl.trainer import train

    fn = tmp_path / "length_reward.py"
    fn.write_text(LENGTH_REWARD)  # varies whatever is sampled: every estimator has a signal
    c = _smoke_cfg(
        tiny_model_dir,
        tmp_path / "r",
        algo=algo,
        rollout=dict(num_generations=4),
        data=dict(reward_fns=(f"{fn}:char_length",)),
    )
    train(from_config_dict(c))
    lines = [x for x in _metric_lines(tmp_path / "r" / "metrics.jsonl") if "actor/loss" in x]
    assert len(lines) == 2
    for x in lines:
        assert np.isfinite(x["actor/loss"]) and x["actor/skipped"] == 0
        assert x["actor/grad_norm"] > 0
    if algo["adv_estimator"] == "gae":
        assert all(np.isfinite(x["critic/vf_loss"]) for x in lines)
        assert "actor/reward_kl_coef" in lines[0] and "rollout/logp_gap_mean" in lines[0]


def test_export_script_from_checkpoint(tiny_model_dir, tmp_path):
    """scripts/export.py: checkpoint → PEFT adapter (loads in peft) and merged HF model."""
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    fn = tmp_path / "yes_reward.py"
    fn.write_text(YES_REWARD)
    r = _main(
        [
            f"--config.model.path={tiny_model_dir}",
            f"--config.trainer.output_dir={out}",
            "--config.trainer.eval_before=False",
            "--config.optim.lr=0.05",
            "--config.rollout.num_generations=4",
            f"--config.data.reward_fns=('{fn}:yes_fraction',)",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    r = subprocess.run(
        [
            sys.executable,
            "scripts/export.py",
            "--run-dir",
            str(out),
            "--peft",
            str(tmp_path / "a"),
            "--merged",
            str(tmp_path / "m"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exported step 2" in r.stdout
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))  # the trainer's final export
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    ids = torch.tensor([[3, 10, 11, 4]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        peft_logits = PeftModel.from_pretrained(base, str(tmp_path / "a"))(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
        merged_logits = merged(ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
    np.testing.assert_allclose(peft_logits.numpy(), merged_logits.numpy(), atol=1e-4)
    assert np.abs(peft_logits.numpy() - base_logits.numpy()).max() > 1e-3  # training moved it
    assert max(np.abs(v).max() for k, v in a.items() if "lora_B" in k) > 0


def test_train_step_compiles_once(tiny_model_dir, tmp_path):
    """Fixed shapes → the jitted policy step is traced/compiled once across steps."""
    from lorarl_jax.config import from_config_dict
    from lorarl_jax.rl.setup import build
    from lorarl_jax.rl.trainer import rollout_step, update

    c = _smoke_cfg(tiny_model_dir, tmp_path / "r", rollout=dict(response_bucket=0))
    c.data.max_val_samples = 0
    import jax

    run = build(from_config_dict(c))
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    for step in (1, 2, 3):
        if step == 2:  # everything is compiled by now: later steps must not compile again
            jax.monitoring.register_event_duration_secs_listener(listener)
        state, tb, _ = rollout_step(run, run.state, next(run.data_iter), step)
        state, _ = update(run, state, tb, step)
        run.state = state.replace(step=step)
    jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    run.logger.close()


@pytest.mark.parametrize("reference", ["base", "init_adapter"])
def test_reference_choice_with_init_adapter(reference, tiny_model_dir, tmp_path):
    """Starting from a PEFT adapter: KL at step 1 is 0 against itself, > 0 against the base."""
    import jax

    from lorarl_jax.config import from_config_dict
    from lorarl_jax.model.hf import load_hf_model, save_peft_adapter
    from lorarl_jax.model.lora import LoraConfig, init_lora
    from lorarl_jax.rl.trainer import train

    _, base = load_hf_model(tiny_model_dir)
    lcfg = LoraConfig(r=4, lora_alpha=8.0, target_modules=("q_proj", "v_proj"))
    lora = init_lora(base, lcfg, jax.random.key(1))
    lora = jax.tree.map(lambda x: x + 0.3, lora)  # a non-zero starting adapter
    save_peft_adapter(lora, lcfg, str(tmp_path / "init"))
    c = _smoke_cfg(tiny_model_dir, tmp_path / "r", algo=dict(reference=reference, kl_loss_coef=0.1))
    c.lora.init_adapter_path = str(tmp_path / "init")
    c.trainer.steps = 1
    c.data.max_val_samples = 0
    train(from_config_dict(c))
    (line,) = [x for x in _metric_lines(tmp_path / "r" / "metrics.jsonl") if "actor/kl" in x]
    if reference == "init_adapter":
        assert abs(line["actor/kl"]) < 1e-5 and abs(line["actor/kl_loss"]) < 1e-5
    else:
        assert line["actor/kl_loss"] > 1e-3


def test_relative_output_dir_checkpoints_and_exports(tiny_model_dir, tmp_path):
    """The README runs with output_dir='runs/…' relative to the working directory."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    args = [
        sys.executable,
        "-m",
        "lorarl_jax.main",
        "--config",
        f"{REPO}/configs/smoke.py",
        f"--config.model.path={tiny_model_dir}",
        "--config.trainer.output_dir=runs/rel",
        "--config.trainer.eval_before=False",
    ]
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "runs" / "rel" / "ckpt" / "2").is_dir()
    assert (tmp_path / "runs" / "rel" / "adapter" / "adapter_model.safetensors").exists()
