"""Fault injection: bad values, previous runs, broken files, hung or failing rewards, runaway
updates, kills. Every probe here once lost data, hung, trained on garbage silently or printed a
traceback for a user error; each now fails fast with one line, or recovers."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

from lorarl_jax import config as config_lib
from lorarl_jax.config import RANGES, default_config, from_config_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _outside(spec: str) -> list:
    """Values just outside a RANGES spec (and NaN for float keys)."""
    is_int = spec.startswith("int ")
    body = spec.removeprefix("int ")
    lo_s, hi_s = body[1:-1].split(", ")
    lo, hi = float(lo_s), float(hi_s)
    step = 1 if is_int else 1e-3
    out = []
    if math.isfinite(lo):
        out.append(lo if body[0] == "(" else lo - step)
    if math.isfinite(hi):
        out.append(hi if body[-1] == ")" else hi + step)
    if is_int:
        out = [int(v) for v in out] + [1.5]  # a float for an integer key
    else:
        out += [math.nan] + ([math.inf] if body[-1] == ")" else [])
    return out


@pytest.mark.parametrize("group,key", sorted(RANGES), ids=lambda x: str(x))
def test_every_ranged_key_rejects_values_outside_its_range(group, key):
    spec = RANGES[(group, key)]
    for value in _outside(spec):
        d = default_config().to_dict()
        d[group][key] = value
        with pytest.raises(ValueError, match=rf"config key {group}\.{key}=") as e:
            from_config_dict(d)
        assert "\n" not in str(e.value)


def test_every_numeric_key_has_a_range():
    """A new int/float config key cannot be added without its range."""
    for group, cls in config_lib._GROUPS.items():
        for f in dataclasses.fields(cls):
            if f.type in ("int", "float", int, float):
                assert (group, f.name) in RANGES, f"{group}.{f.name} has no entry in RANGES"


@pytest.mark.parametrize(
    "group,key,value",
    [
        ("algo", "clip_ratio_low", -1.0),  # silently zeroed every negative-advantage gradient
        ("algo", "clip_ratio_low", 1.0),
        ("algo", "clip_ratio_high", -0.1),
        ("optim", "lr", -1.0),  # gradient ascent
        ("optim", "lr", 0.0),
        ("data", "reward_timeout_s", 0.0),
        ("rollout", "temperature", 0.0),
        ("rollout", "top_p", 0.0),
        ("rollout", "top_p", 1.5),
        ("trainer", "log_interval", 0),  # a ZeroDivisionError after a whole step
        ("model", "param_dtype", "fp32"),  # a TypeError deep in flax
    ],
)
def test_issue_probes_are_rejected_up_front(group, key, value):
    d = default_config().to_dict()
    d[group][key] = value
    with pytest.raises(ValueError, match=rf"{group}\.{key}"):
        from_config_dict(d)


def test_reward_weights_must_be_finite():
    d = default_config().to_dict()
    d["data"].update(reward_fns=("builtin", "format"), reward_weights=(1.0, math.nan))
    with pytest.raises(ValueError, match=r"data\.reward_weights\[1\]"):
        from_config_dict(d)


# ------------------------------------------------------------------------------------------
# Through `python -m lorarl_jax.main` on the tiny model (tests/conftest.py)
# ------------------------------------------------------------------------------------------

ENV = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")


def _main(args, timeout=600, config="configs/smoke.py", env=ENV):
    return subprocess.run(
        [sys.executable, "-m", "lorarl_jax.main", "--config", config, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _args(model, out, *extra):
    return [
        f"--config.model.path={model}",
        f"--config.trainer.output_dir={out}",
        "--config.trainer.eval_before=False",
        "--config.data.max_val_samples=0",
        *extra,
    ]


def _one_line_error(r, *needles):
    """Exit code 2, no traceback, and the last stderr line is `error: ...` holding `needles`."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr[-3000:]
    for n in needles:
        assert n in last, (n, last)
    return last


def _snapshot(path):
    """{relative path: bytes} of every file under `path`."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A finished 1-step run with ckpt_interval=0 (no checkpoints: the data-loss probe)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    r = _main(
        _args(tiny_model_dir, out, "--config.trainer.steps=1", "--config.trainer.ckpt_interval=0")
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_new_run_refuses_a_finished_run_without_checkpoints(finished_run, tiny_model_dir):
    """Before: metrics.jsonl truncated, adapter/curves/samples overwritten, run_config replaced."""
    before = _snapshot(finished_run)
    assert "metrics.jsonl" in before and not os.path.exists(finished_run / "ckpt" / "1")
    r = _main(_args(tiny_model_dir, finished_run, "--config.trainer.steps=1", "--config.lora.r=8"))
    _one_line_error(r, "already holds a run", "metrics.jsonl", "adapter/", "resume=True")
    assert _snapshot(finished_run) == before  # nothing written, run_config.json included
    # resuming it is refused too (nothing to resume), and still writes nothing
    r = _main(
        _args(
            tiny_model_dir, finished_run, "--config.trainer.steps=2", "--config.trainer.resume=True"
        )
    )
    _one_line_error(r, "finished run without checkpoints")
    assert _snapshot(finished_run) == before


@pytest.mark.parametrize(
    "artefact",
    [
        "run_config.json",
        "metrics.jsonl",
        "summary.json",
        "curves.png",
        "adapter/x",
        "tb/ev",
        "ckpt/3/x",
        "val_samples_step0.jsonl",
    ],
)
def test_any_single_artefact_blocks_a_new_run(artefact, tmp_path):
    from lorarl_jax.run_dir import prepare

    p = tmp_path / artefact
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("previous run")
    d = default_config().to_dict()
    d["trainer"]["output_dir"] = str(tmp_path)
    with pytest.raises(ValueError, match="already holds a run"):
        prepare(from_config_dict(d))
    assert p.read_text() == "previous run"
    d["trainer"]["output_dir"] = str(tmp_path / "empty")
    (tmp_path / "empty" / "ckpt").mkdir(parents=True)  # empty dirs are no artefacts
    assert prepare(from_config_dict(d)).previous is None


def test_output_dir_problems_fail_before_the_model_loads(tmp_path):
    from lorarl_jax.run_dir import prepare

    d = default_config().to_dict()
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = {
        str(afile): "is a file",
        str(afile / "sub"): "cannot be created",
        "/proc/self": "not writable",
    }
    for out, needle in cases.items():
        d["trainer"]["output_dir"] = out
        with pytest.raises(ValueError, match=needle):
            prepare(from_config_dict(d))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt").write_text("x")
    d["trainer"]["output_dir"] = str(tmp_path / "run")
    with pytest.raises(ValueError, match="ckpt.*is a file"):
        prepare(from_config_dict(d))


def test_free_space_is_checked_up_front(tmp_path, monkeypatch):
    import shutil

    from lorarl_jax import run_dir

    run_dir.check_free_space(str(tmp_path), 10 << 20, 3, 1 << 20)  # a real disk has room
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=50 << 20))
    with pytest.raises(ValueError, match=r"50 MiB free, the run needs about 95 MiB"):
        run_dir.check_free_space(str(tmp_path), 10 << 20, 3, 1 << 20)


def test_resume_refuses_policy_changes_and_keeps_the_record(tmp_path):
    from lorarl_jax import run_dir

    d = default_config().to_dict()
    d["trainer"].update(output_dir=str(tmp_path), resume=True)
    d["optim"]["schedule"] = "cosine"
    cfg = from_config_dict(d)
    os.makedirs(tmp_path / "ckpt" / "2")
    run_dir.write_record(str(tmp_path), cfg, cfg.lora, str(tmp_path))
    record = (tmp_path / "run_config.json").read_bytes()
    changes = {
        ("lora", "r"): 8,
        ("lora", "lora_alpha"): 64.0,
        ("lora", "target_modules"): ("q_proj",),
        ("lora", "use_rslora"): True,
        ("model", "path"): "/other/model",
        ("algo", "adv_estimator"): "rloo",
        ("optim", "lr"): 3e-4,
        ("optim", "b2"): 0.99,
        ("trainer", "seed"): 1,
        ("data", "batch_size"): 8,
        ("trainer", "steps"): 20,  # cosine: its decay spans the original steps
    }
    for (g, k), v in changes.items():
        d2 = json.loads(json.dumps(d))
        d2[g][k] = v
        with pytest.raises(ValueError, match=rf"{g}\.{k} from") as e:
            run_dir.prepare(from_config_dict(d2))
        old = getattr(getattr(cfg, g), k)
        assert repr(old if not isinstance(old, tuple) else list(old)) in str(e.value)
    assert (tmp_path / "run_config.json").read_bytes() == record
    for key in sorted(
        run_dir.RESUME_MAY_CHANGE - {"trainer.steps", "trainer.output_dir", "trainer.resume"}
    ):
        g, k = key.split(".")
        d2 = json.loads(json.dumps(d))
        v = d2[g][k]
        d2[g][k] = (
            (not v)
            if isinstance(v, bool)
            else (v + 1 if isinstance(v, (int, float)) and k != "mesh" else v)
        )
        if key == "algo.micro_batch_size":  # a valid split of the 4 × 8-row mini-batch
            d2[g][k] = 8
        run_dir.prepare(from_config_dict(d2))  # allowed
    d2 = json.loads(json.dumps(d))
    d2["optim"]["schedule"], d2["trainer"]["steps"] = "constant", 20
    with pytest.raises(ValueError, match="optim.schedule from 'cosine'"):
        run_dir.prepare(from_config_dict(d2))


REWARDS = """
import math, time

def hang(prompts, completions, **columns):
    while True:
        time.sleep(0.1)

def nan(prompts, completions, **columns):
    return [math.nan] * len(completions)

def boom(prompts, completions, **columns):
    raise RuntimeError("reward service down")

def huge(prompts, completions, **columns):
    return [(1e38 if len(c) % 2 else -1e38) for c in completions]

def length(prompts, completions, **columns):
    return [len(c) / 40.0 for c in completions]

not_callable = 3
"""


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("rewards") / "rewards.py"
    p.write_text(REWARDS)
    return p


@pytest.mark.parametrize("fn", ["hang", "nan", "boom"])
def test_a_reward_that_never_scores_stops_the_run(fn, reward_file, tiny_model_dir, tmp_path):
    """Before: NaN silently 0 without a warning, a hung reward blocked exit forever."""
    out = tmp_path / "r"
    r = _main(
        _args(
            tiny_model_dir,
            out,
            "--config.trainer.steps=10",
            "--config.trainer.ckpt_interval=1",
            f"--config.data.reward_fns=('{reward_file}:{fn}',)",
            "--config.data.reward_timeout_s=0.5",
            "--config.data.max_failed_reward_steps=2",
        ),
        timeout=300,
    )
    _one_line_error(r, f"reward '{fn}'", "2 consecutive steps", "max_failed_reward_steps")
    steps = [json.loads(x)["step"] for x in open(out / "metrics.jsonl")]
    assert steps == [1]  # step 2 stopped before its metrics and checkpoint
    assert sorted(os.listdir(out / "ckpt")) == ["1"]


def test_huge_rewards_give_finite_advantages(reward_file, tiny_model_dir, tmp_path):
    """±1e38 rewards: before, the fp32 std overflowed and every advantage was 0."""
    from lorarl_jax.rl.trainer import train

    c = _smoke(tiny_model_dir, tmp_path / "r", data=dict(reward_fns=(f"{reward_file}:huge",)))
    c.rollout.num_generations = 4
    train(from_config_dict(c))
    lines = [json.loads(x) for x in open(tmp_path / "r" / "metrics.jsonl")]
    for x in lines:
        assert x["actor/skipped"] == 0 and math.isfinite(x["actor/loss"]), x
        assert x["actor/grad_norm"] > 0, x  # non-zero advantages


def _smoke(model, out, **groups):
    import importlib.util

    spec = importlib.util.spec_from_file_location("smoke", os.path.join(REPO, "configs/smoke.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.model.path = str(model)
    c.trainer.update(output_dir=str(out), ckpt_interval=0, eval_before=False)
    c.data.max_val_samples = 0
    for g, kv in groups.items():
        c[g].update(kv)
    return c


def test_catastrophic_update_stops_before_its_checkpoint(tiny_model_dir, tmp_path):
    """optim.lr=1e30: before, the adapter reached |w| 2.6e30 and was trained on and saved."""
    out = tmp_path / "r"
    r = _main(
        _args(
            tiny_model_dir,
            out,
            "--config.trainer.steps=3",
            "--config.trainer.ckpt_interval=1",
            "--config.optim.lr=1e30",
            "--config.optim.grad_clip=0.0",
        )
    )
    _one_line_error(r, "step 1", "algo.max_adapter_absmax")
    assert not os.path.exists(out / "ckpt" / "1") and not os.path.exists(out / "adapter")
    assert "orbax" not in r.stderr.lower()  # the checkpointer was closed: no exit traceback


def test_every_update_skipped_stops_the_run(tiny_model_dir, tmp_path, monkeypatch):
    """A run whose every update is skipped (non-finite gradients) learns nothing: it stops."""
    import jax.numpy as jnp

    from lorarl_jax.rl import step as step_lib
    from lorarl_jax.rl.guards import RunStopped
    from lorarl_jax.rl.trainer import train

    make = step_lib.make_policy_step

    def poisoned(*a, **kw):  # NaN advantages: a non-finite loss and gradient in every update
        inner = make(*a, **kw)
        return lambda lora, opt, base, mb, key: inner(
            lora, opt, base, {**mb, "advantages": mb["advantages"] * jnp.nan}, key
        )

    monkeypatch.setattr(step_lib, "make_policy_step", poisoned)
    c = _smoke(tiny_model_dir, tmp_path / "r", algo=dict(max_skipped_steps=2))
    c.trainer.steps = 5
    with pytest.raises(RunStopped, match=r"step 2: every update of the last 2 steps was skipped"):
        train(from_config_dict(c))
    lines = [json.loads(x) for x in open(tmp_path / "r" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1] and lines[0]["actor/skipped"] == 1


def _model_copy(tiny, tmp_path, damage):
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(tiny, dst)
    st = dst / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    return dst


def _parquet(tmp_path, rows):
    from lorarl_jax.data import write_rows

    p = tmp_path / "train.parquet"
    write_rows(rows, p)
    return p


def _empty_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lorarl_jax.datasets import arith_rows

    p = tmp_path / "empty.parquet"
    table = pa.Table.from_pylist(arith_rows(2, 0))
    pq.write_table(table.slice(0, 0), p)
    return p


def _bad_input(case, tmp_path, tiny, rewards):
    """(extra args, needles of the one-line error, config file) for one probe."""
    from lorarl_jax.datasets import arith_rows

    if case == "missing_config":
        return [], ["config file", "nope.py", "does not exist"], "configs/nope.py"
    if case == "broken_config":
        p = tmp_path / "broken.py"
        p.write_text("def get_config(:\n")
        return [], [str(p), "SyntaxError at line 1"], str(p)
    if case == "unknown_key":
        return ["--config.lora.rank=4"], ["unknown config key 'lora.rank'", "'lora.r'"], None
    if case == "temperature":
        return ["--config.rollout.temperature=0.0"], ["rollout.temperature=0.0", "(0, inf)"], None
    if case in ("truncated", "random"):
        model = _model_copy(tiny, tmp_path, case)
        return [f"--config.model.path={model}"], ["model.safetensors", "not a readable"], None
    if case == "reward_syntax":
        p = tmp_path / "bad_reward.py"
        p.write_text("def f(prompts, completions, **kw)\n    return []\n")
        return [f"--config.data.reward_fns=('{p}:f',)"], [str(p), "SyntaxError at line 1"], None
    if case == "reward_not_callable":
        spec = f"{rewards}:not_callable"
        return [f"--config.data.reward_fns=('{spec}',)"], ["not_callable", "not a function"], None
    if case == "reward_missing_name":
        spec = f"{rewards}:nothere"
        return [f"--config.data.reward_fns=('{spec}',)"], ["nothere", "defines"], None
    if case == "missing_train_file":
        p = tmp_path / "nothere.parquet"
        return [f"--config.data.train_files={p}"], ["data.train_files", str(p), "not exist"], None
    if case == "empty_parquet":
        p = _empty_parquet(tmp_path)
        return [f"--config.data.train_files={p}"], ["data.train_files", "holds no rows"], None
    if case == "unknown_data_source":
        rows = arith_rows(8, 0)
        rows[5]["data_source"] = "my/dataset"
        p = _parquet(tmp_path, rows)
        return [f"--config.data.train_files={p}"], ["'my/dataset' (1 of", "known"], None
    if case == "resume_empty_dir":
        return ["--config.trainer.resume=True"], ["no run to resume", "trainer.resume=False"], None
    raise AssertionError(case)


BAD_INPUTS = [
    "missing_config",
    "broken_config",
    "unknown_key",
    "temperature",
    "truncated",
    "random",
    "reward_syntax",
    "reward_not_callable",
    "reward_missing_name",
    "missing_train_file",
    "empty_parquet",
    "unknown_data_source",
    "resume_empty_dir",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, tiny_model_dir, reward_file):
    args, needles, config = _bad_input(case, tmp_path, tiny_model_dir, reward_file)
    out = tmp_path / "out"
    r = _main(_args(tiny_model_dir, out) + args, config=config or "configs/smoke.py")
    last = _one_line_error(r, *needles)
    assert "auto" not in last and "greedy" not in last
    assert not os.path.exists(out) or _snapshot(out) == {}, "a failed start wrote files"


DISK_FULL_AT_STEP_2 = """
import errno, runpy, sys
from lorarl_jax import metrics

log = metrics.MetricsLogger.log

def full(self, step, m, *a, **kw):
    if step == 2:
        raise OSError(errno.ENOSPC, "No space left on device", self.path)
    return log(self, step, m, *a, **kw)

metrics.MetricsLogger.log = full
sys.argv = ["main", "--config", "configs/smoke.py", *sys.argv[1:]]
runpy.run_module("lorarl_jax.main", run_name="__main__")
"""


def test_disk_full_is_one_line_and_the_last_checkpoint_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    args = _args(
        tiny_model_dir, out, "--config.trainer.steps=3", "--config.trainer.ckpt_interval=1"
    )
    r = subprocess.run(
        [sys.executable, "-c", DISK_FULL_AT_STEP_2, *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    _one_line_error(r, "No space left on device", "metrics.jsonl")
    assert "note: checkpoint step 1" in r.stderr and "is intact" in r.stderr
    assert "orbax" not in r.stderr.lower()
    r = _main(args + ["--config.trainer.resume=True"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 1" in r.stdout
    steps = [json.loads(x)["step"] for x in open(out / "metrics.jsonl")]
    assert steps == [1, 2, 3]


def _adapter(out):
    from safetensors.numpy import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _comparable(out):
    skip = ("time/", "perf/")
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    return [{k: v for k, v in x.items() if not k.startswith(skip)} for x in lines]


def _tmp_ckpts(out):
    d = out / "ckpt"
    return {n for n in os.listdir(d) if "tmp" in n} if d.is_dir() else set()


@pytest.mark.ci
@pytest.mark.slow
def test_kill_anywhere_then_resume_gives_the_same_adapter(tiny_model_dir, tmp_path):
    """SIGKILL at ≥ 20 random moments (start-up, mid-step, mid-checkpoint, export), resuming
    after each: the final adapter and metrics equal an uninterrupted run's, every time."""
    import random
    import signal
    import time

    import numpy as np

    common = [
        f"--config.model.path={tiny_model_dir}",
        "--config.trainer.eval_before=False",
        "--config.data.max_val_samples=0",
        "--config.trainer.steps=6",
        "--config.trainer.ckpt_interval=1",
        "--config.trainer.max_to_keep=2",
    ]
    straight = tmp_path / "straight"
    t0 = time.time()
    r = _main(common + [f"--config.trainer.output_dir={straight}"])
    assert r.returncode == 0, r.stderr[-3000:]
    duration = time.time() - t0
    want_adapter, want_metrics = _adapter(straight), _comparable(straight)

    rng = random.Random(0)
    kills, modes, chain = 0, [], 0
    argv = [sys.executable, "-m", "lorarl_jax.main", "--config", "configs/smoke.py", *common]
    while kills < 20:
        chain += 1
        out = tmp_path / f"chain{chain}"
        while True:
            resume = (out / "run_config.json").exists()
            p = subprocess.Popen(
                argv + [f"--config.trainer.output_dir={out}", f"--config.trainer.resume={resume}"],
                cwd=REPO,
                env=ENV,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            mode = ["time", "time", "checkpoint"][kills % 3] if kills < 20 else "none"
            start, deadline = time.time(), rng.uniform(0.5, duration)
            while p.poll() is None and mode != "none":
                if mode == "time" and time.time() - start >= deadline:
                    break
                if mode == "checkpoint" and _tmp_ckpts(out):  # orbax is writing a step
                    time.sleep(rng.uniform(0.0, 0.05))
                    break
                time.sleep(0.01)
            if p.poll() is None and mode != "none":
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills += 1
                modes.append(mode)
                continue
            err = p.communicate(timeout=600)[1]
            assert p.returncode == 0, err[-3000:]
            break
        got = _adapter(out)
        assert got.keys() == want_adapter.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], want_adapter[k], err_msg=f"chain {chain}: {k}")
        assert _comparable(out) == want_metrics, f"chain {chain}"
    assert kills >= 20 and "checkpoint" in modes


def test_serve_binds_localhost_by_default_and_the_readme_says_so():
    """Before: insecure gRPC without auth on every interface ('[::]')."""
    import inspect

    from lorarl_jax import serve

    assert serve._parser().parse_args([]).host == "127.0.0.1"
    assert inspect.signature(serve.start_server).parameters["host"].default == "127.0.0.1"
    readme = open(os.path.join(REPO, "README.md")).read()
    assert "--host 0.0.0.0" in readme  # how to expose it, deliberately
    assert "imported and runs as Python code" in readme  # custom reward files


def test_corrupt_latest_checkpoint_falls_back_and_redoes_the_step(tiny_model_dir, tmp_path):
    """A truncated latest step: resume warns naming it, keeps it as 3.corrupt, restores step 2,
    redoes step 3 and ends with the uninterrupted run's adapter."""
    import shutil

    import numpy as np

    out = tmp_path / "r"
    args = _args(
        tiny_model_dir,
        out,
        "--config.trainer.steps=3",
        "--config.trainer.ckpt_interval=1",
        "--config.trainer.max_to_keep=3",
    )
    assert _main(args).returncode == 0
    want = _adapter(out)
    shutil.rmtree(out / "adapter")
    for root, _, files in os.walk(out / "ckpt" / "3" / "lora"):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "r+b") as fh:
                fh.truncate(os.path.getsize(p) // 2)
    r = _main(args + ["--config.trainer.resume=True"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoint {out / 'ckpt' / '3'} failed to restore" in r.stderr
    assert "resumed from" in r.stdout and "at step 2" in r.stdout
    assert (out / "ckpt" / "3.corrupt").is_dir() and (out / "ckpt" / "3").is_dir()
    got = _adapter(out)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_a_non_finite_adapter_is_never_checkpointed():
    import types

    import jax.numpy as jnp

    from lorarl_jax.rl.guards import RunStopped
    from lorarl_jax.rl.setup import save_checkpoint

    class Refuse:
        def should_save(self, step):
            return True

        def save(self, *a, **kw):
            raise AssertionError("a NaN adapter reached the checkpointer")

    lora = {"a": jnp.ones(3), "b": jnp.array([0.0, jnp.nan])}
    run = types.SimpleNamespace(
        ckpt=Refuse(), state=types.SimpleNamespace(step=4, lora=lora, full=False)
    )
    with pytest.raises(RunStopped, match="step 4: the adapter holds NaN/inf; not checkpointed"):
        save_checkpoint(run)
