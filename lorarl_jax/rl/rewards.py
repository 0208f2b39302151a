"""Reward dispatch, custom reward functions and time-limited, weighted reward evaluation.

Design
- A reward function scores a whole batch, TRL style:
  `fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]`, where
  `columns` are dataset columns aligned with the batch (`ground_truth`, `data_source`,
  `extra_info`, ...). Custom ones are loaded from `"path/to/file.py:function_name"`; a file that
  is missing, does not import (SyntaxError, ImportError, ...), or lacks a callable of that name
  raises one clear line (`ValueError`, or `FileNotFoundError`) naming the file and the
  `data.reward_fns` entry (`reward_files.py`).
- `SampleRewardFn` wraps a scorer of *one* sample, evaluated sample by sample so that one slow
  or broken sample costs only itself. The builtin reward (`"builtin"`) is one: it dispatches on
  `data_source` like verl's `default_compute_score` (GSM8K / our `arith` task -> strict `#### N`,
  MATH -> `\\boxed{}`); the scorers and that dispatch live in `reward_fns.py`.
- Configuration mistakes (unknown `data_source`, missing or misaligned columns) raise instead of
  reading as zero rewards: every batch, and once up front over the whole dataset through
  `RewardManager.validate`, which names each unknown source and how many rows have it.
- `compute_rewards` starts every function on daemon worker threads (a batch function on one, a
  `SampleRewardFn` on up to `_SAMPLE_WORKERS` pulling samples from a shared queue), waits once
  against a shared deadline of `timeout_s`, cancels the work still queued, and sums the
  weighted scores (TRL `reward_funcs` + `reward_weights`). It never crashes on a bad score: a
  timeout or exception scores 0 for the samples it touches (the whole batch for a batch
  function, one sample for a `SampleRewardFn`), and so do None and NaN/inf (which would poison
  the advantages). They are counted, in samples, as `reward/timeouts`, `reward/errors`,
  `reward/none` and `reward/nonfinite` (all but None are also logged as warnings), and per
  function as `reward/<name>/failed` = timeouts + errors + none + nonfinite of that function;
  `failed_functions(metrics, batch)` names the functions that gave nothing usable this step.
- Threads cannot be killed, so a function that never returns keeps its thread: calls run on
  daemon threads (`reward_threads.py`) that neither `compute_rewards` nor interpreter exit
  waits for; the leak is bounded (`reward/hung_threads`; above `MAX_HUNG_THREADS` a call raises
  `RewardHangError` naming the function).
  C code that holds the GIL (e.g. a catastrophic regex) would still stall the caller, which is
  why the builtin scorers use only linear-time regexes. Functions that need hard isolation
  should run their own subprocess.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from lorarl_jax.rl import reward_threads
from lorarl_jax.rl.reward_files import load_reward_fn  # noqa: F401  (API: a file's reward)
from lorarl_jax.rl.reward_fns import (  # noqa: F401  (re-exported: the builtin dispatch)
    _SCORERS,
    GSM8K_SOURCES,
    KNOWN_SOURCES,
    MATH_SOURCES,
    default_compute_score,
    format_score,
    gsm8k_accuracy_metrics,
    gsm8k_score,
)
from lorarl_jax.rl.reward_threads import RewardHangError, hung_threads  # noqa: F401  (RewardHangError: API)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
_SAMPLE_WORKERS = 8  # threads per SampleRewardFn: how many hung samples we can absorb

RewardFn = Callable[..., Sequence[float | None]]
_FAILURES = ("timeouts", "errors", "none", "nonfinite")  # outcomes that score 0


@dataclasses.dataclass(frozen=True)
class SampleRewardFn:
    """A per-sample scorer `score_one(prompt, completion, **row) -> float | None`.

    `validate(columns)` (optional) raises on configuration errors, which should stop the run
    rather than read as zero rewards. It runs in the caller's thread on every batch, and on the
    whole dataset through `RewardManager.validate`, so it must not assume batch-sized columns.
    """

    name: str
    score_one: Callable[..., float | None]
    validate: Callable[[Mapping[str, Sequence]], None] | None = None


def _builtin_one(prompt, completion, *, data_source, ground_truth, extra_info=None, **_):
    return default_compute_score(data_source, completion, ground_truth, extra_info)


def _check_builtin_columns(columns: Mapping[str, Sequence]) -> None:
    """Raise unless `data_source` and `ground_truth` exist and every source has a scorer.

    The message names each unknown source with its row count, most frequent first, e.g.
    `no builtin reward for data_source 'my/data' (12 of 900 rows); known: [...]`.
    """
    missing = [k for k in ("data_source", "ground_truth") if k not in columns]
    if missing:
        raise ValueError(f"builtin reward needs columns {missing}; got {sorted(columns)}")
    sources = columns["data_source"]
    counts = Counter(str(s) for s in sources)
    unknown = sorted(
        ((s, n) for s, n in counts.items() if s.lower() not in _SCORERS),
        key=lambda x: (-x[1], x[0]),
    )
    if unknown:
        rows = len(sources)
        shown = ", ".join(f"{s!r} ({n} of {rows} rows)" for s, n in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise ValueError(
            f"no builtin reward for data_source {shown}{more}; known: {list(KNOWN_SOURCES)}"
        )


BUILTIN_REWARD = SampleRewardFn("builtin", _builtin_one, _check_builtin_columns)


def format_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """`format_score` of each completion: 1.0 if it ends with a `#### <number>` line."""
    return [format_score(c) for c in completions]


def flexible_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1.0 if the last number in the completion equals the ground truth (answer correctness
    without the format), for GSM8K-like sources; a denser signal than strict `#### N`."""
    truths = columns["ground_truth"]
    return [gsm8k_score(c, t, method="flexible") for c, t in zip(completions, truths, strict=True)]


# ------------------------------------------------------------------------------------------
# Custom reward functions
# ------------------------------------------------------------------------------------------


def resolve_reward_fn(fn: str | RewardFn | SampleRewardFn) -> RewardFn | SampleRewardFn:
    """`"builtin"`, `"format"`, `"flexible"`, a `"file.py:name"` spec, or a callable."""
    if not isinstance(fn, str):
        return fn
    if fn == "builtin":
        return BUILTIN_REWARD
    if fn == "format":
        return format_reward
    if fn == "flexible":
        return flexible_reward
    return load_reward_fn(fn)


def _fn_name(fn) -> str:
    if isinstance(fn, SampleRewardFn):
        return fn.name
    inner = getattr(fn, "func", fn)  # functools.partial
    return getattr(fn, "__name__", None) or getattr(inner, "__name__", type(fn).__name__)


def _unique_names(fns) -> list[str]:
    names, seen = [], Counter()
    for fn in fns:
        name = _fn_name(fn)
        seen[name] += 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name] - 1}")
    return names


# ------------------------------------------------------------------------------------------
# Time-limited evaluation
# ------------------------------------------------------------------------------------------


def _threads(fn, batch: int) -> int:
    """Threads one call of `fn` starts: min(B, _SAMPLE_WORKERS) per sample, 1 per batch."""
    return min(batch, _SAMPLE_WORKERS) if isinstance(fn, SampleRewardFn) else 1


def _launch(name: str, fn, prompts, completions, columns) -> list[reward_threads.Task]:
    """Start `fn` on its own daemon threads: one task per sample or one for the batch."""
    if isinstance(fn, SampleRewardFn):
        tasks = [
            reward_threads.Task(
                name, functools.partial(fn.score_one, p, c, **{k: v[i] for k, v in columns.items()})
            )
            for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
        ]
    else:
        batch_columns = {k: list(v) for k, v in columns.items()}
        tasks = [
            reward_threads.Task(
                name, functools.partial(fn, list(prompts), list(completions), **batch_columns)
            )
        ]
    reward_threads.start(tasks, _threads(fn, len(completions)), name)
    return tasks


def _classify(value) -> tuple[str, object]:
    """("ok", score) | ("none", None) | ("nonfinite", value) | ("errors", exception)."""
    if value is None:
        return "none", None
    try:
        score = float(value)
    except (TypeError, ValueError) as exc:
        return "errors", exc
    return ("ok", score) if math.isfinite(score) else ("nonfinite", value)


def _outcome(future: cf.Future, late: set) -> tuple[str, object]:
    """("ok", result) | ("timeouts", None) | ("errors", exception); `late` missed the deadline."""
    if future in late or future.cancelled():
        return "timeouts", None
    exc = future.exception()
    return ("errors", exc) if exc is not None else ("ok", future.result())


def _collect(fn, futures, late: set, batch: int) -> tuple[np.ndarray, Counter, dict[str, object]]:
    """Scores [B] of one function (0 where it failed), per-outcome sample counts, and the first
    offending exception / value per failure kind."""
    scores_B, counts, first = np.zeros(batch, np.float64), Counter(), {}
    if isinstance(fn, SampleRewardFn):
        outcomes = [_outcome(f, late) for f in futures]
    else:
        status, value = _outcome(futures[0], late)
        if status == "ok" and (not hasattr(value, "__len__") or len(value) != batch):
            got = len(value) if hasattr(value, "__len__") else type(value).__name__
            status, value = "errors", ValueError(f"returned {got} scores for a batch of {batch}")
        outcomes = [(status, v) for v in value] if status == "ok" else [(status, value)] * batch
    for i, (status, value) in enumerate(outcomes):
        if status == "ok":
            status, value = _classify(value)
            if status == "ok":
                scores_B[i] = value
        counts[status] += 1
        first.setdefault(status, value)
    return scores_B, counts, first


def failed_functions(metrics: Mapping[str, float], batch: int) -> list[str]:
    """Names of the functions whose `reward/<name>/failed` equals `batch` (> 0): every sample
    timed out, raised, or was None/NaN/inf, so the function gave nothing usable this step."""
    if batch <= 0:
        return []
    prefix, suffix = "reward/", "/failed"
    return [
        key[len(prefix) : -len(suffix)]
        for key, value in metrics.items()
        if key.startswith(prefix) and key.endswith(suffix) and value == batch
    ]


def merge_reward_metrics(parts: Sequence[Mapping[str, float]], scores: Sequence) -> dict:
    """One step's reward metrics from its generation batches (DAPO's dynamic sampling): sample
    counts (`*/failed`, timeouts, errors, none, nonfinite) summed, `reward/hung_threads` the
    last, `reward/mean` / `reward/std` over all the scores, other means averaged over the
    (equal-sized) batches."""
    if len(parts) == 1:
        return dict(parts[0])
    counts = {f"reward/{k}" for k in _FAILURES}
    out = {}
    for key in parts[0]:
        values = [p[key] for p in parts if key in p]
        if key in counts or key.endswith("/failed"):
            out[key] = float(np.sum(values))
        elif key == "reward/hung_threads":
            out[key] = values[-1]
        else:
            out[key] = float(np.mean(values))
    total = np.concatenate([np.asarray(s, np.float64) for s in scores])
    out["reward/mean"], out["reward/std"] = float(total.mean()), float(total.std())
    return out


def _check_aligned(columns: Mapping[str, Sequence], rows: int, what: str = "the batch") -> None:
    bad = {k: len(v) for k, v in columns.items() if len(v) != rows}
    if bad:
        raise ValueError(f"columns not aligned with {what} of {rows} rows: {bad}")


def compute_rewards(
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: Mapping[str, Sequence],
    reward_fns: Sequence[str | RewardFn | SampleRewardFn] = ("builtin",),
    weights: Sequence[float] | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> tuple[np.ndarray, dict[str, float]]:
    """scores_B = sum_i weights[i] * fn_i(batch), each fn_i limited to `timeout_s` (shared).

    Returns float32 scores [B] and metrics: per function `reward/<name>/mean` and
    `reward/<name>/failed` (samples that timed out, raised, or were None/non-finite), overall
    `reward/mean`, `reward/std`, sample counts `reward/{timeouts,errors,none,nonfinite}`,
    `reward/hung_threads` (process-wide threads still running past their deadline, this call's
    included), and GSM8K accuracies. `timeout_s=None` waits without limit. Raises
    `RewardHangError` before starting anything if hung threads are at `MAX_HUNG_THREADS`.
    """
    batch = len(completions)
    if len(prompts) != batch:
        raise ValueError(f"{len(prompts)} prompts for {batch} completions")
    _check_aligned(columns, batch)
    fns = [resolve_reward_fn(f) for f in reward_fns]
    weights = [1.0] * len(fns) if weights is None else [float(w) for w in weights]
    if len(weights) != len(fns):
        raise ValueError(f"{len(weights)} reward weights for {len(fns)} reward functions")
    for fn in fns:
        if isinstance(fn, SampleRewardFn) and fn.validate is not None:
            fn.validate(columns)
    names = _unique_names(fns)
    reward_threads.check_hung(sum(_threads(fn, batch) for fn in fns), timeout_s)

    launched = [
        _launch(name, fn, prompts, completions, columns)
        for name, fn in zip(names, fns, strict=True)
    ]
    futures = [t.future for tasks in launched for t in tasks]
    _, not_done = cf.wait(futures, timeout=timeout_s)
    reward_threads.abandon([t for tasks in launched for t in tasks if t.future in not_done])

    total_B, totals, metrics = np.zeros(batch, np.float64), Counter(), {}
    for name, weight, fn, tasks in zip(names, weights, fns, launched, strict=True):
        scores_B, counts, first = _collect(fn, [t.future for t in tasks], not_done, batch)
        if counts["timeouts"] or counts["errors"] or counts["nonfinite"]:
            log.warning(
                "reward fn %s: %d timeouts, %d errors, %d non-finite of %d samples "
                "(first error: %r, first non-finite: %r)",
                name,
                counts["timeouts"],
                counts["errors"],
                counts["nonfinite"],
                batch,
                first.get("errors"),
                first.get("nonfinite"),
            )
        total_B += weight * scores_B
        totals.update(counts)
        metrics[f"reward/{name}/mean"] = float(scores_B.mean()) if batch else 0.0
        metrics[f"reward/{name}/failed"] = float(sum(counts[k] for k in _FAILURES))
    metrics["reward/mean"] = float(total_B.mean()) if batch else 0.0
    metrics["reward/std"] = float(total_B.std()) if batch else 0.0
    for key in _FAILURES:
        metrics[f"reward/{key}"] = float(totals[key])
    metrics["reward/hung_threads"] = float(hung_threads())
    metrics.update(gsm8k_accuracy_metrics(completions, columns))
    return total_B.astype(np.float32), metrics


@dataclasses.dataclass(frozen=True)
class RewardManager:
    """Reward functions resolved once (custom files imported once), called every step."""

    reward_fns: Sequence[str | RewardFn | SampleRewardFn] = ("builtin",)
    weights: Sequence[float] | None = None
    timeout_s: float | None = DEFAULT_TIMEOUT_S

    def __post_init__(self):
        fns = tuple(resolve_reward_fn(f) for f in self.reward_fns)
        object.__setattr__(self, "reward_fns", fns)
        if self.weights is not None and len(self.weights) != len(fns):
            raise ValueError(f"{len(self.weights)} reward weights for {len(fns)} reward functions")

    @property
    def names(self) -> list[str]:
        return _unique_names(self.reward_fns)

    def validate(self, columns: Mapping[str, Sequence]) -> None:
        """Check the columns of a whole dataset up front (all training and validation rows):
        they must be aligned, and every `SampleRewardFn.validate` must accept them, so e.g. an
        unknown `data_source` stops the run before step 1 rather than at the first batch."""
        if columns:
            first = next(iter(columns))
            _check_aligned(columns, len(columns[first]), f"column {first!r}")
        for fn in self.reward_fns:
            if isinstance(fn, SampleRewardFn) and fn.validate is not None:
                fn.validate(columns)

    def __call__(self, prompts, completions, columns) -> tuple[np.ndarray, dict[str, float]]:
        return compute_rewards(
            prompts, completions, columns, self.reward_fns, self.weights, self.timeout_s
        )
