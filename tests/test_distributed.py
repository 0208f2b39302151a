"""Sharded and multi-process GRPO == one device: the real trainer, two steps, on a tiny model.

JAX fixes its device count when it starts, so every run is its own `python -m lorarl_jax.main`
with `--xla_force_host_platform_device_count`: one device (the reference); 8 devices on the meshes
(data, fsdp, tensor) = (1,2,4), (2,4,1), (8,1,1) and 2 devices on (2,1,1), (1,2,1) (the loss is
normalised by the mini-batch's global token count, however many shards hold it); two processes
of 4 devices each, joined by jax.distributed on 127.0.0.1 (gloo), on mesh (2,4,1). Each step is
a rollout, reference and old log-probs (two mini-batches, so the update is off-policy) and two
optimizer updates of two micro-batches each; each run logs metrics.jsonl and exports the
adapter. PPO (GAE, the full-parameter critic sharded as the base) runs on 2 processes × 4
devices, mesh (1,2,4), against its own one-device run; the scanned decoder with remat
(model.scan_layers) against the unrolled reference on one device and on mesh (1,2,4); and
micro-batches of 32, 2 and 1 sequences against the reference's 16.

Tolerance (fp32; measured on this machine in brackets): loss, grad norm, KL loss and entropy
≤ 1e-5 relative [≤ 2e-6]; every other logged number ≤ 1e-4 · max(|ref|, 1e-3) [≤ 2.3e-5, ppo_kl,
a mean of log-prob differences]; the sampler-vs-trainer gaps (float noise, ~1e-6) ≤ 1e-4
absolute [≤ 5e-6]; rewards and response lengths exactly equal (the same tokens are
sampled); final adapter ≤ 2e-5 · max|adapter| [≤ 6e-6].

The reward is the completion's length, so every GRPO group has a spread of rewards. With a sparse
reward most groups have zero advantages, the gradient there is the rounding noise of the KL term,
and Adam's first update (≈ lr · sign(g)) turns any change of summation order into an O(lr) change
of the adapter: a property of the optimizer, not of the sharding, so the test avoids it.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(1, 2, 4), (2, 4, 1), (8, 1, 1), (2, 1, 1), (1, 2, 1)]
LENGTH_REWARD = """
def length_reward(prompts, completions, **columns):
    return [len(c) / 20.0 for c in completions]
"""
EXACT = ("reward/", "response/")
# sampler-vs-trainer log-prob gaps are float noise themselves (~1e-6): compared in absolute terms
NOISE = ("rollout/logp_gap",)
TIGHT = ("actor/loss", "actor/pg_loss", "actor/grad_norm", "actor/kl_loss", "actor/entropy")


def _overrides(model_dir, reward_file, out, mesh) -> dict:
    return {
        "model.path": str(model_dir),
        "trainer.output_dir": str(out),
        "trainer.mesh": tuple(mesh),
        "data.reward_fns": (f"{reward_file}:length_reward",),
        "data.batch_size": 32,  # prompts; 64 sequences per step
        "algo.ppo_mini_batch_size": 16,  # two updates per step: π_old is its own forward
        "algo.micro_batch_size": 16,  # sequences: two micro-batches per update
        "data.val_batch_size": 8,
        "data.max_val_samples": 8,
        "optim.lr": 0.01,
        "trainer.eval_before": False,
        "trainer.tensorboard": False,
    }


def _env(devices: int) -> dict:
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
    )


def _args(overrides: dict, *extra: str) -> list[str]:
    flags = [f"--config.{k}={v if isinstance(v, str) else repr(v)}" for k, v in overrides.items()]
    cmd = [sys.executable, "-m", "lorarl_jax.main", "--config", "configs/smoke.py"]
    return cmd + flags + list(extra)


def _train(overrides: dict, devices: int, *extra: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        _args(overrides, *extra),
        cwd=REPO,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return time.perf_counter() - t0


def _metrics(run_dir):
    return [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]


def _adapter(run_dir):
    from safetensors.numpy import load_file

    return load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))


def _differences(run_dir, ref_dir) -> dict:
    """Worst relative difference of each metric group and of the adapter vs the reference."""
    got, ref = _metrics(run_dir), _metrics(ref_dir)
    assert [x["step"] for x in got] == [x["step"] for x in ref]
    out = {"exact": 0.0, "tight": 0.0, "other": 0.0, "noise": 0.0}
    for x, y in zip(got, ref, strict=True):
        assert set(x) == set(y), set(x) ^ set(y)
        for k, v in x.items():
            if k.startswith(("time/", "perf/")):
                continue
            if k.startswith(EXACT):
                out["exact"] = max(out["exact"], abs(v - y[k]))
            elif k.startswith(NOISE):
                out["noise"] = max(out["noise"], abs(v - y[k]))
            elif k in TIGHT:
                out["tight"] = max(out["tight"], abs(v - y[k]) / abs(y[k]))
            else:
                out["other"] = max(out["other"], abs(v - y[k]) / max(abs(y[k]), 1e-3))
    a, b = _adapter(run_dir), _adapter(ref_dir)
    assert sorted(a) == sorted(b)
    scale = max(float(np.abs(v).max()) for v in b.values())
    out["adapter"] = max(float(np.abs(a[k] - b[k]).max()) for k in b) / scale
    return out


def _assert_close(d: dict):
    assert d["exact"] == 0.0, d
    assert d["tight"] <= 1e-5, d
    assert d["other"] <= 1e-4, d
    assert d["noise"] <= 1e-4, d
    assert d["adapter"] <= 2e-5, d


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    reward = root / "length_reward.py"
    reward.write_text(LENGTH_REWARD)
    return lambda name, mesh: _overrides(tiny_model_dir, reward, root / name, mesh)


@pytest.fixture(scope="module")
def reference(runs):
    ov = runs("ref", (1, 1, 1))
    seconds = _train(ov, 1)
    lines = [x for x in _metrics(ov["trainer.output_dir"]) if "actor/loss" in x]
    assert len(lines) == 2 and all(x["actor/grad_norm"] > 0 for x in lines)
    print(f"1 device: {seconds:.0f} s")
    return ov["trainer.output_dir"]


@pytest.mark.parametrize("mesh", MESHES, ids=["x".join(map(str, m)) for m in MESHES])
def test_mesh_equals_single_device(mesh, runs, reference):
    ov = runs("mesh_" + "_".join(map(str, mesh)), mesh)
    seconds = _train(ov, int(np.prod(mesh)))
    d = _differences(ov["trainer.output_dir"], reference)
    print(f"mesh {mesh}: {seconds:.0f} s, differences {d}")
    _assert_close(d)


def test_micro_batch_size_does_not_change_the_run(runs, reference):
    """The loss is normalised over the whole mini-batch: one micro-batch per update (32
    sequences), one group per micro-batch (2) and half a group (1: each prompt run once per
    sub-group) give the reference's run (16), on variable-length responses (each step's
    responses have different lengths)."""
    for micro in (32, 2, 1):
        ov = dict(runs(f"micro_{micro}", (1, 1, 1)), **{"algo.micro_batch_size": micro})
        _train(ov, 1)
        d = _differences(ov["trainer.output_dir"], reference)
        print(f"micro_batch_size {micro} vs 16: differences {d}")
        _assert_close(d)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(ov: dict, mesh: tuple) -> tuple:
    port = _free_port()
    procs = [
        subprocess.Popen(
            _args(
                dict(ov, **{"trainer.mesh": mesh}),
                f"--config.trainer.coordinator_address=127.0.0.1:{port}",
                "--config.trainer.num_processes=2",
                f"--config.trainer.process_id={i}",
            ),
            cwd=REPO,
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    return outs


@pytest.fixture(scope="module")
def two_processes(runs, reference):
    """Two processes × 4 devices on mesh (2,4,1): each holds half of the batch rows."""
    ov = runs("two_proc", (2, 4, 1))
    t0 = time.perf_counter()
    outs = _two_processes(ov, (2, 4, 1))
    print(f"2 processes: {time.perf_counter() - t0:.0f} s")
    return ov, outs


def test_two_processes_equal_single_process(two_processes, reference):
    ov, outs = two_processes
    run_dir = ov["trainer.output_dir"]
    d = _differences(run_dir, reference)
    print(f"2 processes × 4 devices: differences {d}")
    _assert_close(d)
    (out0, _), (out1, _) = outs
    assert "step 2/2" in out0 and "step 2/2" not in out1  # only process 0 logs and exports
    assert '"adapter"' in out0 and '"adapter"' not in out1


def test_two_process_checkpoint_restores_in_one_process(two_processes, runs, tmp_path):
    """One orbax checkpoint per step, written by both processes; resumed on one device it
    gives the adapter the two processes exported."""
    ov, _ = two_processes
    src = ov["trainer.output_dir"]
    assert sorted(os.listdir(os.path.join(src, "ckpt"))) == ["1", "2"]
    dst = tmp_path / "resumed"
    shutil.copytree(os.path.join(src, "ckpt"), dst / "ckpt")
    one = dict(ov, **{"trainer.output_dir": str(dst), "trainer.mesh": (1, 1, 1)})
    _train(one, 1, "--config.trainer.resume=True")
    a, b = _adapter(dst), _adapter(src)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in b)


PPO = {  # GAE with the full-parameter critic, KL in the reward, two epochs × two mini-batches
    "algo.adv_estimator": "gae",
    "algo.use_kl_in_reward": True,
    "algo.use_kl_loss": False,
    "algo.ppo_epochs": 2,
}


def test_ppo_critic_two_processes_equal_one_device(runs):
    """PPO: the critic (a full copy of the base, sharded as the base, its value head and step
    counters replicated) on 2 processes × 4 devices, mesh (1,2,4), == one device."""
    ref = dict(runs("ppo_ref", (1, 1, 1)), **PPO)
    _train(ref, 1)
    ov = dict(runs("ppo_two_proc", (1, 2, 4)), **PPO)
    _two_processes(ov, (1, 2, 4))
    d = _differences(ov["trainer.output_dir"], ref["trainer.output_dir"])
    lines = _metrics(ov["trainer.output_dir"])
    assert sum("critic/vf_loss" in x for x in lines) == 2
    print(f"PPO, 2 processes × 4 devices: differences {d}")
    _assert_close(d)


def test_scanned_layers_with_remat_on_a_mesh(runs, reference):
    """model.scan_layers + gradient_checkpointing: one device == the unrolled reference, and
    mesh (1,2,4) on 8 devices == its one-device run (the layers are stacked inside the jitted
    passes from parameters sharded as loaded)."""
    scan = {"model.scan_layers": True, "model.gradient_checkpointing": True}
    one = dict(runs("scan_ref", (1, 1, 1)), **scan)
    _train(one, 1)
    d = _differences(one["trainer.output_dir"], reference)
    print(f"scanned + remat vs unrolled, 1 device: differences {d}")
    _assert_close(d)
    mesh = dict(runs("scan_mesh", (1, 2, 4)), **scan)
    _train(mesh, 8)
    d = _differences(mesh["trainer.output_dir"], one["trainer.output_dir"])
    print(f"scanned + remat, mesh (1,2,4): differences {d}")
    _assert_close(d)


def test_batch_not_splitting_over_mesh_is_one_line_error(runs):
    ov = dict(runs("bad", (8, 1, 1)), **{"data.batch_size": 4, "algo.ppo_mini_batch_size": 0})
    ov.pop("algo.micro_batch_size")
    r = subprocess.run(
        _args(ov), cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2
    assert "data.batch_size: 4 prompts" in r.stderr and "trainer.mesh=(8, 1, 1)" in r.stderr
    assert "Traceback" not in r.stderr


def test_distributed_keys_are_validated():
    from lorarl_jax.config import default_config, from_config_dict

    c = default_config()
    c.model.path = "x"
    c.trainer.coordinator_address = "127.0.0.1:1234"
    with pytest.raises(ValueError, match="trainer.num_processes"):
        from_config_dict(c)
    c.trainer.update(num_processes=2, process_id=1)
    assert from_config_dict(c).trainer.process_id == 1


def test_launch_tpu_pod_script_parses():
    script = os.path.join(REPO, "scripts", "launch_tpu_pod.sh")
    r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = open(script).read()
    assert "--worker=all" in text and "trainer.distributed=True" in text


def _spec(x) -> list:
    spec = tuple(x.sharding.spec)
    return list(spec + (None,) * (x.ndim - len(spec)))


def _placement(model_dir: str, reward_file: str, out: str) -> dict:
    """Builds a run on mesh (1,2,4), takes one GRPO step, reports where its arrays live."""
    import importlib.util

    import jax
    from flax import traverse_util

    from lorarl_jax.config import from_config_dict
    from lorarl_jax.rl import trainer
    from lorarl_jax.rl.setup import build

    spec = importlib.util.spec_from_file_location("smoke", os.path.join(REPO, "configs/smoke.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    for key, value in _overrides(model_dir, reward_file, out, (1, 2, 4)).items():
        group, name = key.split(".")
        c[group][name] = value
    run = build(from_config_dict(c))
    q = ("layers_0", "self_attn", "q_proj")
    lora_a_before = traverse_util.flatten_dict(run.state.lora)[q + ("lora_a",)]
    state, tb, _ = trainer.rollout_step(run, run.state, next(run.data_iter), 1)
    state, _ = trainer.update(run, state, tb, 1)
    lora = traverse_util.flatten_dict(state.lora)
    named = [
        (jax.tree_util.keystr(p), x)
        for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    ]
    moments = {  # Adam's mu and nu of layer 0's q_proj A
        k: _spec(x) for k, x in named if all(s in k for s in ("layers_0", "q_proj", "lora_a"))
    }
    base = traverse_util.flatten_dict(run.base)
    merged = traverse_util.flatten_dict(run.programs.merge(run.base, state.lora).params)
    return {
        "lora_a": _spec(lora[q + ("lora_a",)]),
        "lora_b": _spec(lora[q + ("lora_b",)]),
        "moments": sorted(moments.values()),
        "n_moments": len(moments),
        "base_q": _spec(base[q + ("kernel",)]),
        "decode_q": _spec(merged[q + ("kernel",)]),
        "base_embed": _spec(base[("embed_tokens", "embedding")]),
        "decode_embed": _spec(merged[("embed_tokens", "embedding")]),
        "batch": _spec(run.place.put(np.zeros((32, 8), np.int32))),
        "donated": lora_a_before.is_deleted(),
    }


def test_run_places_adapter_optimizer_and_decode_weights(runs):
    """Mesh (1,2,4): adapter and Adam moments sharded as the kernels they adapt, the sampler's
    merged weights replicated over fsdp and split over tensor, batches split over data×fsdp,
    and the step updates the adapter in place (donated)."""
    ov = runs("placement", (1, 2, 4))
    model_dir, out = ov["model.path"], ov["trainer.output_dir"]
    reward = ov["data.reward_fns"][0].rsplit(":", 1)[0]
    r = subprocess.run(
        [sys.executable, os.path.abspath(__file__), model_dir, reward, out],
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["base_q"] == ["fsdp", "tensor"]
    assert m["lora_a"] == ["fsdp", None] and m["lora_b"] == [None, "tensor"]
    assert m["n_moments"] == 2 and m["moments"] == [["fsdp", None]] * 2
    assert m["decode_q"] == [None, "tensor"]
    assert m["base_embed"] == ["tensor", "fsdp"] and m["decode_embed"] == ["tensor", None]
    assert m["batch"] == [["data", "fsdp"], None]
    assert m["donated"]


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    print(json.dumps(_placement(*sys.argv[1:4])))
