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
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_smoke_config_runs_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    r = _main([f"--config.model.path={tiny_model_dir}", f"--config.trainer.output_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    steps = [x["step"] for x in lines if "reward/mean" in x]
    assert steps == [1, 2]
    assert all(np.isfinite(x["actor/loss"]) for x in lines if "actor/loss" in x)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "curves.png").exists()
    assert any(os.scandir(out / "tb"))
