"""Checkpoints of the trainable RL state: adapter, optimizer, critic, RNG, data and KL state.

Design:
- One orbax ``CheckpointManager``; each step directory holds one composite item per state field:
  ``lora`` (full-parameter RL: ``params``, the whole policy), ``opt_state``, ``critic``,
  ``critic_opt_state`` (``StandardSave``: arrays, OCDBT), ``rng`` (raw ``jax.random.key_data``),
  and JSON items ``meta`` (``step``, RNG impl name), ``data_state`` (the grain iterator state)
  and ``kl_ctl`` (adaptive KL controller). The frozen base weights are never in the state
  dict: they are re-loaded from the HF checkpoint on resume.
- Restore is always into an abstract target (``jax.ShapeDtypeStruct`` trees carrying ``sharding``,
  e.g. ``jax.tree.map(ocp.utils.to_shape_dtype_struct, live_state)``): the tree structure (optax
  NamedTuples), dtypes and device placement come from the target, not from the files.
- The typed PRNG key is stored as its uint32 key data plus the impl name (``meta``) and re-wrapped
  with ``jax.random.wrap_key_data``: explicit, and independent of orbax's key metadata.
- Kill safety is orbax's atomic finalize: a step is written under ``<step>.orbax-checkpoint-tmp-*``
  and renamed to ``<step>`` only after every item (and every process) has committed. A kill before
  the rename leaves an unfinalised tmp dir that ``all_steps``/``latest_step`` never list, and that
  ``cleanup_tmp_directories=True`` deletes when the next ``Checkpointer`` opens the directory.
- Save cadence: ``FixedIntervalPolicy(save_interval_steps)`` plus orbax's preemption policy; no
  "save the first step" policy, so off-interval ``save`` returns False unless ``force=True``.
  Retention: ``LatestN(max_to_keep)``.
- Multi-process: every process calls every method; orbax does the primary-host writes and barriers.
- Corrupt steps: a finalised step can still be unreadable (array files truncated or deleted by a
  full disk or a partial copy, garbage JSON). ``restore_or_none`` tries the finalised steps newest
  first; one that fails to restore is moved aside (``quarantine``: renamed to ``<step>.corrupt``,
  or ``<step>.corrupt-1``, ... if taken; nothing is deleted) with a warning on stderr, and the
  next older step is tried. The ``.corrupt`` names are neither steps nor orbax tmp dirs, so
  ``all_steps`` does not list them (after ``CheckpointManager.reload``) and the tmp cleanup keeps
  them; the resumed run redoes the broken step and saves it again under the same number. Only
  process 0 renames; a barrier then lets every process reload the step list. If no step
  restores, ``ValueError`` (the directory, every step's reason); the steps stay as ``*.corrupt``.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Literal

import jax
import orbax.checkpoint as ocp
from etils import epath

# pytrees of arrays; the trainable tree is `lora` (an adapter) or `params` (full-parameter RL)
ARRAY_ITEMS = ("lora", "params", "opt_state", "critic", "critic_opt_state")
JSON_ITEMS = ("data_state", "kl_ctl")  # small JSON dicts
REQUIRED = ("opt_state", "step", "rng")
TRAINABLE = ("lora", "params")  # exactly one of them


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _abstract_key_data(rng: Any) -> jax.ShapeDtypeStruct:
    """The uint32 key-data target for an abstract or live key (typed, or already raw key data)."""
    sharding = getattr(rng, "sharding", None)
    if _is_key(rng):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(rng.shape, rng.dtype))
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=sharding)


class Checkpointer:
    """Saves/restores the trainable state dict every ``save_interval_steps`` steps.

    The state dict has keys ``lora`` (or, full-parameter RL, ``params``), ``opt_state``,
    ``step`` (int), ``rng`` (typed key) and optionally ``critic``, ``critic_opt_state``,
    ``data_state``, ``kl_ctl`` (JSON dicts).
    """

    def __init__(
        self,
        directory: str | epath.PathLike,
        *,
        save_interval_steps: int,
        max_to_keep: int | None,
        async_save: bool = True,
    ):
        if save_interval_steps < 1 or (max_to_keep is not None and max_to_keep < 1):
            raise ValueError(
                "need save_interval_steps, max_to_keep >= 1 (max_to_keep None: keep all)"
            )
        # orbax's tensorstore writer needs an absolute path (a relative output_dir fails on save)
        self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(
                [
                    policies.FixedIntervalPolicy(save_interval_steps),
                    policies.PreemptionCheckpointingPolicy(),
                ]
            ),
            preservation_policy=policies.LatestN(max_to_keep) if max_to_keep is not None else None,
            cleanup_tmp_directories=True,  # drop tmp dirs left by a kill mid-save
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: dict[str, Any], *, force: bool = False) -> bool:
        """Starts saving ``state`` at ``step`` if the interval (or ``force``) says so; True if so.

        With ``async_save`` this returns once arrays are copied off the devices; the write runs in
        the background (call ``wait`` before reading the files, or before exiting).
        """
        missing = [k for k in REQUIRED if k not in state]
        if sum(k in state for k in TRAINABLE) != 1:
            missing.append(" or ".join(TRAINABLE) + " (exactly one)")
        unknown = set(state) - set(REQUIRED) - set(ARRAY_ITEMS) - set(JSON_ITEMS)
        if missing or unknown:
            raise KeyError(f"state keys: missing {missing}, unknown {sorted(unknown)}")
        if int(state["step"]) != step:
            raise ValueError(f"state['step']={state['step']} differs from save step {step}")
        rng = state["rng"]
        if not _is_key(rng):
            raise TypeError(f"state['rng'] must be a typed key (jax.random.key), got {rng!r}")
        items = {k: ocp.args.StandardSave(state[k]) for k in ARRAY_ITEMS if k in state}
        items["rng"] = ocp.args.StandardSave({"key_data": jax.random.key_data(rng)})
        meta = {"step": int(step), "rng_impl": str(jax.random.key_impl(rng))}
        items["meta"] = ocp.args.JsonSave(meta)
        items |= {k: ocp.args.JsonSave(state[k]) for k in JSON_ITEMS if k in state}
        return self._mgr.save(step, args=ocp.args.Composite(**items), force=force)

    def should_save(self, step: int) -> bool:
        """Whether `save(step)` without `force` would write (interval or preemption)."""
        return self._mgr.should_save(step)

    def latest_step(self) -> int | None:
        """The newest finalised step (in-flight or killed saves are not counted)."""
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def restore(self, step: int | None = None, *, abstract_state: dict[str, Any]) -> dict[str, Any]:
        """Restores ``step`` (default: latest) into the structure/dtypes/shardings of the target.

        ``abstract_state`` has the same keys as the saved state; its array items are
        ``jax.ShapeDtypeStruct`` trees (or live arrays); ``step``/``data_state``/``kl_ctl`` values
        in it are ignored (they come from the checkpoint) but their presence selects the items.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finalised checkpoint in {self.directory}")
        abstract = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, t)  # noqa: E731
        items = {
            k: ocp.args.StandardRestore(abstract(abstract_state[k]))
            for k in ARRAY_ITEMS
            if k in abstract_state
        }
        rng_target = {"key_data": _abstract_key_data(abstract_state["rng"])}
        items["rng"] = ocp.args.StandardRestore(rng_target)
        items["meta"] = ocp.args.JsonRestore()
        items |= {k: ocp.args.JsonRestore() for k in JSON_ITEMS if k in abstract_state}
        restored = self._mgr.restore(step, args=ocp.args.Composite(**items))
        out = {k: restored[k] for k in items if k not in ("rng", "meta")}
        out["step"] = int(restored["meta"]["step"])
        out["rng"] = jax.random.wrap_key_data(
            restored["rng"]["key_data"], impl=restored["meta"]["rng_impl"]
        )
        return out

    def step_dir(self, step: int) -> epath.Path:
        """The directory of finalised ``step``: ``<directory>/<step>`` (orbax's default naming)."""
        return self.directory / str(step)

    def quarantine(self, step: int) -> epath.Path | None:
        """Moves the finalised ``step`` aside, to ``<step>.corrupt`` (``.corrupt-1``, ... if taken).

        Nothing is deleted. Process 0 renames (it returns the new path; other processes None), all
        processes then meet at a barrier and reload orbax's step list, so ``all_steps`` and
        ``latest_step`` no longer list ``step`` and a later ``save(step, ...)`` writes it anew.
        """
        moved = None
        src = self.step_dir(step)
        if jax.process_index() == 0 and src.exists():
            moved = self.directory / f"{step}.corrupt"
            n = 0
            while moved.exists():
                n += 1
                moved = self.directory / f"{step}.corrupt-{n}"
            src.rename(moved)
        ocp.multihost.sync_global_processes(f"lorarl_checkpoint_quarantine_{step}")
        self._mgr.reload()
        return moved

    def wait(self) -> None:
        """Blocks until pending async saves are finalised (renamed from tmp to ``<step>``)."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads (once; later calls do nothing)."""
        if not getattr(self, "_closed", False):
            self._closed = True
            self._mgr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, at most ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def restore_or_none(
    ckpt: Checkpointer, abstract_state: dict[str, Any], *, resume: bool | Literal["auto"]
) -> dict[str, Any] | None:
    """The newest checkpoint that restores if resuming, else None (start fresh).

    ``resume=True`` requires a checkpoint (clear error if there is none); ``"auto"`` restores one
    if present (the re-launch-after-preemption case); ``False`` never restores.

    Finalised steps are tried newest first. Once one restores, every newer step that failed (any
    exception) is moved aside to ``<step>.corrupt`` (``Checkpointer.quarantine``; the run will
    save those step numbers again) with a warning on stderr naming its directory and the reason.
    If none restores: ``ValueError`` naming the directory and every step's reason, renaming
    nothing (a config that no longer matches fails every step the same way), for either mode.
    """
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
    if resume is False:
        return None
    steps = sorted(ckpt.all_steps(), reverse=True)
    if not steps:
        if resume == "auto":
            return None
        raise FileNotFoundError(
            f"resume=True but {ckpt.directory} holds no finalised checkpoint "
            "(unfinished tmp dirs from a killed save do not count); "
            "set trainer.resume=False to start a new run"
        )
    broken = []  # (step, reason): moved aside only once an older step has restored
    for step in steps:
        try:
            restored = ckpt.restore(step, abstract_state=abstract_state)
        except Exception as exc:  # any failure of a finalised step: try the next older one
            broken.append((step, _one_line(exc)))
            continue
        for bad, reason in broken:
            step_dir = ckpt.step_dir(bad)
            moved = ckpt.quarantine(bad)
            if moved is not None:  # process 0 renamed it
                print(
                    f"WARNING: checkpoint {step_dir} failed to restore: {reason}; moved it "
                    f"aside to {moved.name} and resumed from step {step}",
                    file=sys.stderr,
                    flush=True,
                )
        return restored
    listed = "; ".join(f"step {s} ({r})" for s, r in broken)
    raise ValueError(
        f"no checkpoint in {ckpt.directory} restores (nothing was renamed or deleted): {listed}; "
        "if the reasons point at a changed config (shapes, tree structure) rather than damaged "
        "files, resume with the original config"
    )
