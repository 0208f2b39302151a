"""Reward dispatch, custom reward functions and time-limited, weighted reward evaluation.

Design
- A reward function scores a whole batch, TRL style:
  `fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]`, where
  `columns` are dataset columns aligned with the batch (`ground_truth`, `data_source`,
  `extra_info`, ...). Custom ones are loaded from `"path/to/file.py:function_name"`.
- `SampleRewardFn` wraps a scorer of *one* sample, evaluated sample by sample so that one slow
  or broken sample costs only itself. The builtin reward (`"builtin"`) is one: it dispatches on
  `data_source` like verl's `default_compute_score` (GSM8K / our `arith` task -> strict `#### N`,
  MATH -> `\\boxed{}`); the scorers themselves live in `reward_fns.py`.
- `compute_rewards` starts every function in worker threads, waits once against a shared
  deadline of `timeout_s`, and sums the weighted scores (TRL `reward_funcs` + `reward_weights`).
  A timeout or exception scores 0 for the samples it touches (the whole batch for a batch
  function, one sample for a `SampleRewardFn`); None (or NaN/inf) scores 0. They are counted, in
  samples, as `reward/timeouts`, `reward/errors`, `reward/none`, and never crash the run.
  Configuration mistakes (unknown `data_source`, misaligned columns) do raise, up front.
- Threads cannot be killed. A function that hangs keeps its worker thread after
  `compute_rewards` has returned (executors are shut down with `wait=False` and queued work is
  cancelled, so the call itself returns on time); the interpreter joins such threads at exit.
  C code that holds the GIL (e.g. a catastrophic regex) would also stall the caller, which is
  why the builtin scorers use only linear-time regexes. Functions that need hard isolation
  should run their own subprocess.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import importlib.util
import logging
import math
import pathlib
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from lorarl_jax.rl.reward_fns import format_score, gsm8k_score, math_score

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
_SAMPLE_WORKERS = 8  # threads per SampleRewardFn: how many hung samples we can absorb

GSM8K_SOURCES = ("openai/gsm8k", "gsm8k", "arith")
MATH_SOURCES = (
    "lighteval/MATH",
    "DigitalLearningGmbH/MATH-lighteval",
    "math",
    "HuggingFaceH4/MATH-500",
    "hendrycks/competition_math",
    "EleutherAI/hendrycks_math",
)
KNOWN_SOURCES = GSM8K_SOURCES + MATH_SOURCES
_SCORERS: dict[str, Callable[[str, object], float]] = {
    **{s.lower(): gsm8k_score for s in GSM8K_SOURCES},
    **{s.lower(): math_score for s in MATH_SOURCES},
}

RewardFn = Callable[..., Sequence[float | None]]

# ------------------------------------------------------------------------------------------
# Builtin dispatch (verl default_compute_score)
# ------------------------------------------------------------------------------------------


def default_compute_score(data_source: str, solution_str: str, ground_truth, extra_info=None):
    """Rule reward of one completion, chosen by `data_source` (case-insensitive)."""
    scorer = _SCORERS.get(str(data_source).lower())
    if scorer is None:
        raise ValueError(
            f"no builtin reward for data_source={data_source!r}; known: {list(KNOWN_SOURCES)}"
        )
    return float(scorer(solution_str, ground_truth))


@dataclasses.dataclass(frozen=True)
class SampleRewardFn:
    """A per-sample scorer `score_one(prompt, completion, **row) -> float | None`.

    `validate(columns)` (optional) runs once per batch in the caller's thread and raises on
    configuration errors, which should stop the run rather than read as zero rewards.
    """

    name: str
    score_one: Callable[..., float | None]
    validate: Callable[[Mapping[str, Sequence]], None] | None = None


def _builtin_one(prompt, completion, *, data_source, ground_truth, extra_info=None, **_):
    return default_compute_score(data_source, completion, ground_truth, extra_info)


def _check_builtin_columns(columns: Mapping[str, Sequence]) -> None:
    missing = [k for k in ("data_source", "ground_truth") if k not in columns]
    if missing:
        raise ValueError(f"builtin reward needs columns {missing}; got {sorted(columns)}")
    unknown = sorted({str(s) for s in columns["data_source"] if str(s).lower() not in _SCORERS})
    if unknown:
        raise ValueError(f"no builtin reward for data_source {unknown}; known: {KNOWN_SOURCES}")


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


def load_reward_fn(spec: str) -> RewardFn:
    """Import `function_name` from `"path/to/file.py:function_name"`."""
    path_str, sep, fn_name = spec.rpartition(":")
    if not sep or not path_str or not fn_name:
        raise ValueError(f"reward function spec must be 'path/to/file.py:function_name': {spec!r}")
    path = pathlib.Path(path_str).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"reward function file not found: {path} (spec {spec!r})")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    module_name = f"_lorarl_reward_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"cannot import {path} as a Python module (spec {spec!r})")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # so dataclasses/pickle inside the file resolve
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    fn = getattr(module, fn_name, None)
    if fn is None:
        defined = sorted(k for k, v in vars(module).items() if callable(v) and k[0] != "_")
        raise AttributeError(f"{path} has no function {fn_name!r}; it defines {defined}")
    if not callable(fn):
        raise TypeError(f"{path}:{fn_name} is a {type(fn).__name__}, not a function")
    return fn


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


def _launch(fn, prompts, completions, columns) -> list[cf.Future]:
    """Submit `fn` to its own executor: one future per sample or one for the batch."""
    name = _fn_name(fn)
    if isinstance(fn, SampleRewardFn):
        workers = max(1, min(len(completions), _SAMPLE_WORKERS))
        pool = cf.ThreadPoolExecutor(workers, thread_name_prefix=f"reward-{name}")
        futures = [
            pool.submit(fn.score_one, p, c, **{k: v[i] for k, v in columns.items()})
            for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
        ]
    else:
        pool = cf.ThreadPoolExecutor(1, thread_name_prefix=f"reward-{name}")
        batch_columns = {k: list(v) for k, v in columns.items()}
        futures = [pool.submit(fn, list(prompts), list(completions), **batch_columns)]
    pool.shutdown(wait=False)  # never block on a hung worker (see module docstring)
    return futures


def _to_score(value) -> float | None:
    if value is None:
        return None
    score = float(value)
    return score if math.isfinite(score) else None  # inf would poison the advantages


def _outcome(future: cf.Future, late: set) -> tuple[str, object]:
    """("ok", result) | ("timeouts", None) | ("errors", exception); `late` missed the deadline."""
    if future in late or future.cancelled():
        return "timeouts", None
    exc = future.exception()
    return ("errors", exc) if exc is not None else ("ok", future.result())


def _collect(
    fn, futures, late: set, batch: int
) -> tuple[np.ndarray, Counter, BaseException | None]:
    """Scores [B] of one function (0 where it failed) and per-outcome sample counts."""
    scores_B, counts, first_exc = np.zeros(batch, np.float64), Counter(), None
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
            try:
                score = _to_score(value)
            except (TypeError, ValueError) as exc:
                status, value = "errors", exc
            else:
                status = "ok" if score is not None else "none"
                scores_B[i] = 0.0 if score is None else score
        counts[status] += 1
        if status == "errors" and first_exc is None:
            first_exc = value
    return scores_B, counts, first_exc


def gsm8k_accuracy_metrics(completions: Sequence[str], columns: Mapping[str, Sequence]):
    """`reward/accuracy_strict` (`#### N`) and `reward/accuracy_flexible` (last number) over the
    samples whose `data_source` is GSM8K-like; {} if there are none or no ground truth."""
    sources, truths = columns.get("data_source"), columns.get("ground_truth")
    if sources is None or truths is None:
        return {}
    gsm8k = {s.lower() for s in GSM8K_SOURCES}
    idx = [i for i, s in enumerate(sources) if str(s).lower() in gsm8k]
    if not idx:
        return {}
    return {
        f"reward/accuracy_{method}": float(
            np.mean([gsm8k_score(completions[i], truths[i], method) == 1.0 for i in idx])
        )
        for method in ("strict", "flexible")
    }


def compute_rewards(
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: Mapping[str, Sequence],
    reward_fns: Sequence[str | RewardFn | SampleRewardFn] = ("builtin",),
    weights: Sequence[float] | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> tuple[np.ndarray, dict[str, float]]:
    """scores_B = sum_i weights[i] * fn_i(batch), each fn_i limited to `timeout_s` (shared).

    Returns float32 scores [B] and metrics: `reward/<name>/mean` per function, `reward/mean`,
    `reward/std`, sample counts `reward/{timeouts,errors,none}`, and GSM8K accuracies.
    `timeout_s=None` waits without limit.
    """
    batch = len(completions)
    if len(prompts) != batch:
        raise ValueError(f"{len(prompts)} prompts for {batch} completions")
    bad = {k: len(v) for k, v in columns.items() if len(v) != batch}
    if bad:
        raise ValueError(f"columns not aligned with the batch of {batch}: {bad}")
    fns = [resolve_reward_fn(f) for f in reward_fns]
    weights = [1.0] * len(fns) if weights is None else [float(w) for w in weights]
    if len(weights) != len(fns):
        raise ValueError(f"{len(weights)} reward weights for {len(fns)} reward functions")
    for fn in fns:
        if isinstance(fn, SampleRewardFn) and fn.validate is not None:
            fn.validate(columns)

    launched = [_launch(fn, prompts, completions, columns) for fn in fns]
    _, not_done = cf.wait([f for fs in launched for f in fs], timeout=timeout_s)
    for future in not_done:
        future.cancel()  # queued samples never start; running ones are abandoned

    total_B, totals, metrics = np.zeros(batch, np.float64), Counter(), {}
    for name, weight, fn, futures in zip(_unique_names(fns), weights, fns, launched, strict=True):
        scores_B, counts, first_exc = _collect(fn, futures, not_done, batch)
        if counts["timeouts"] or counts["errors"]:
            log.warning(
                "reward fn %s: %d timeouts, %d errors of %d samples (first error: %r)",
                name,
                counts["timeouts"],
                counts["errors"],
                batch,
                first_exc,
            )
        total_B += weight * scores_B
        totals.update(counts)
        metrics[f"reward/{name}/mean"] = float(scores_B.mean()) if batch else 0.0
    metrics["reward/mean"] = float(total_B.mean()) if batch else 0.0
    metrics["reward/std"] = float(total_B.std()) if batch else 0.0
    for key in ("timeouts", "errors", "none"):
        metrics[f"reward/{key}"] = float(totals[key])
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

    def __call__(self, prompts, completions, columns) -> tuple[np.ndarray, dict[str, float]]:
        return compute_rewards(
            prompts, completions, columns, self.reward_fns, self.weights, self.timeout_s
        )
