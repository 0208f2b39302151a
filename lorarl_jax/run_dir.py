"""The run directory (`trainer.output_dir`): checked before anything is built, written after.

Design: a run never loses or mixes up another run's files.
- `prepare(cfg)` runs before the model is loaded. It creates the directory, probes that it is
  writable (a file is written, synced and removed), and rejects a `ckpt` path that is not a
  directory. A new run (`trainer.resume=False`) is refused if *any* artefact of a previous run
  is there (`ARTEFACTS`: the run record, metrics, adapter, curves, validation samples,
  TensorBoard events, checkpoints), not only checkpoints. A resumed run is refused if its config
  changes a key that defines the policy or its optimisation: every key except `RESUME_MAY_CHANGE`
  must equal the previous run's `run_config.json` (the error names the key and both values).
- `check_free_space` compares the free bytes with what the checkpoints and the export will take,
  once the trainable state's size is known, still before step 1.
- `write_record` writes `run_config.json` (what `scripts/export.py` and `serve --run-dir`
  rebuild the model from) only after every check, and the resume, have passed: a refused run
  leaves the previous record untouched.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil

import jax

RUN_CONFIG = "run_config.json"
ARTEFACTS = (
    RUN_CONFIG,
    "metrics.jsonl",
    "summary.json",
    "curves.png",
    "adapter",
    "model",  # full-parameter RL's exported HF model
    "tb",
    "ckpt",
    "val_samples_step*.jsonl",
)
# keys a resumed run may change: lengths and intervals, outputs, placement and switches that do
# not change the math (tests/test_distributed.py, test_step.py), evaluation and run guards
RESUME_MAY_CHANGE = frozenset(
    {
        "trainer.steps",  # not with optim.schedule=cosine: its decay spans the original steps
        "trainer.log_interval",
        "trainer.eval_interval",
        "trainer.eval_before",
        "trainer.ckpt_interval",
        "trainer.max_to_keep",
        "trainer.resume",
        "trainer.async_checkpoint",
        "trainer.export_adapter",
        "trainer.tensorboard",
        "trainer.output_dir",
        "trainer.mesh",
        "trainer.distributed",
        "trainer.coordinator_address",
        "trainer.num_processes",
        "trainer.process_id",
        "model.gradient_checkpointing",
        "model.scan_layers",
        "algo.micro_batch_size",
        "algo.logprob_chunk",
        "algo.max_skipped_steps",
        "algo.max_adapter_absmax",
        "rollout.max_logp_gap",
        "rollout.logp_gap_action",
        "data.val_files",
        "data.val_batch_size",
        "data.max_val_samples",
        "data.reward_timeout_s",
        "data.max_failed_reward_steps",
    }
)


@dataclasses.dataclass(frozen=True)
class RunDir:
    path: str
    previous: dict | None  # the previous run's run_config.json (resume), else None
    has_checkpoint: bool  # a finalised checkpoint step exists

    @property
    def ckpt(self) -> str:
        return os.path.join(self.path, "ckpt")


def previous_artefacts(path: str) -> list[str]:
    """The `ARTEFACTS` present in `path` (empty directories do not count)."""
    found = []
    for name in ARTEFACTS:
        for p in sorted(glob.glob(os.path.join(path, name))):
            if os.path.isdir(p) and not os.listdir(p):
                continue
            found.append(os.path.basename(p) + ("/" if os.path.isdir(p) else ""))
    return found


def checkpoint_steps(ckpt: str) -> list[int]:
    return [int(n) for n in os.listdir(ckpt) if n.isdigit()] if os.path.isdir(ckpt) else []


def _probe_writable(path: str) -> None:
    probe = os.path.join(path, f".write_probe.{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("x")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"trainer.output_dir {path!r} is not writable: {e.strerror}") from None


def _flat(record: dict) -> dict[str, object]:
    """{"group.key": JSON value} of a run record (tuples as lists, as run_config.json holds)."""
    record = json.loads(json.dumps(record))
    return {
        f"{g}.{k}": v for g, sub in record.items() if isinstance(sub, dict) for k, v in sub.items()
    }


def config_record(cfg) -> dict:
    """The user-facing config as run_config.json stores it (before the adapter is loaded)."""
    return dataclasses.asdict(cfg)


def check_resume_compatible(previous: dict, cfg) -> None:
    """Raises ValueError naming the first key (and both values) a resume may not change."""
    old, new = _flat(previous), _flat(config_record(cfg))
    old["lora.init_adapter_path"] = previous.get("init_adapter_path", "")
    new["lora.init_adapter_path"] = cfg.init_adapter_path
    # run_config.json's lora.* is the adapter's shape: read from the file when one was given
    from_adapter = bool(old["lora.init_adapter_path"] or cfg.init_adapter_path)
    for key in sorted(new):
        if key not in old or old[key] == new[key]:
            continue
        if key == "trainer.steps" and cfg.optim.schedule == "cosine":
            raise ValueError(
                f"resume changes trainer.steps from {old[key]} to {new[key]}, but "
                "optim.schedule='cosine' decays over the original steps: keep "
                f"trainer.steps={old[key]}, or start a new run"
            )
        if key in RESUME_MAY_CHANGE or (
            from_adapter and key != "lora.init_adapter_path" and key.startswith("lora.")
        ):
            continue
        raise ValueError(
            f"resume changes {key} from {old[key]!r} to {new[key]!r}: a resumed run keeps the "
            "policy and its optimisation (README: keys that may change on resume)"
        )


def prepare(cfg) -> RunDir:
    """Checks the output directory for `cfg`'s run before anything is built (module docstring)."""
    tc = cfg.trainer
    path = tc.output_dir
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"trainer.output_dir {path!r} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"trainer.output_dir {path!r} cannot be created: {e.strerror}") from None
    _probe_writable(path)
    ckpt = os.path.join(path, "ckpt")
    if os.path.exists(ckpt) and not os.path.isdir(ckpt):
        raise ValueError(f"{ckpt!r} (checkpoints of trainer.output_dir) is a file, not a directory")
    found = previous_artefacts(path)
    has_ckpt = bool(checkpoint_steps(ckpt))
    if not tc.resume:
        if found:
            raise ValueError(
                f"{path} already holds a run ({', '.join(found)}): pass "
                "--config.trainer.resume=True to continue it, or choose another "
                "trainer.output_dir (nothing was overwritten)"
            )
        return RunDir(path, None, False)
    previous = None
    record = os.path.join(path, RUN_CONFIG)
    if os.path.exists(record):
        try:
            with open(record) as f:
                previous = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{record}: unreadable run record ({e}); cannot resume") from None
        check_resume_compatible(previous, cfg)
    if not has_ckpt:
        if previous is None:
            raise ValueError(
                f"trainer.resume=True but {path} holds no run to resume (no {RUN_CONFIG}, no "
                "checkpoint): set trainer.resume=False to start a new run there"
            )
        if os.path.exists(os.path.join(path, "summary.json")):
            raise ValueError(
                f"{path} holds a finished run without checkpoints (trainer.ckpt_interval=0): "
                "there is nothing to resume; choose another trainer.output_dir"
            )
    return RunDir(path, previous, has_ckpt)


def check_free_space(path: str, state_bytes: int, n_checkpoints: int, adapter_bytes: int) -> None:
    """Refuses to start when `path`'s disk cannot hold `n_checkpoints` copies of the trainable
    state (orbax keeps max_to_keep plus the one being written), the exported adapter and 64 MiB
    of metrics, events and samples."""
    need = state_bytes * n_checkpoints + adapter_bytes + (64 << 20)
    free = shutil.disk_usage(path).free
    if free < need:
        raise ValueError(
            f"trainer.output_dir {path!r}: {free / 2**20:.0f} MiB free, the run needs about "
            f"{need / 2**20:.0f} MiB ({n_checkpoints} checkpoints of {state_bytes / 2**20:.1f} "
            "MiB, the adapter, logs); free space or lower trainer.max_to_keep"
        )


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def write_record(path: str, cfg, lcfg, model_dir: str) -> None:
    """run_config.json: the config, the adapter's LoRA shape and the resolved model path."""
    record = config_record(cfg) | {"resolved_model_path": os.path.abspath(model_dir)}
    record["lora"] = dataclasses.asdict(lcfg)
    tmp = os.path.join(path, RUN_CONFIG + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(path, RUN_CONFIG))  # never a half-written record
