"""Training metrics: a JSONL file (the source of truth), TensorBoard scalars, console lines, plots.

``MetricsLogger.log(step, metrics)`` appends ``{"step": step, **metrics}`` to
``out_dir/metrics.jsonl`` and flushes, so a killed run keeps every step it finished. A run resumed
at ``start_step=k`` first drops the lines with ``step >= k`` (work that will be redone), and
TensorBoard is told to purge the same steps, so neither record shows a step twice.

The console gets one line per ``log`` call -- plain lines rather than a ``\\r``-redrawn bar, so that
logs redirected to a file stay readable::

    step 12/50 [####................] 24% reward 0.41 acc 0.38 kl 0.002 | 3.1 s/step ETA 1:58

s/step is measured from the logger's creation (or the resume point), so it includes compilation of
the first step and settles as training goes on.

``plot_metrics(jsonl, png)`` draws one subplot per requested key that occurs in the file; it is
called at the end of training and by ``scripts/plot_metrics.py RUN_DIR``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_CONSOLE_KEYS = (
    ("reward/mean", "reward"),
    ("val/accuracy_strict", "acc"),
    ("actor/kl", "kl"),
)
DEFAULT_PLOT_KEYS = ("reward/mean", "val/accuracy_strict", "val/accuracy_flexible", "actor/kl")
_BAR_WIDTH = 20


def _format_duration(seconds: float) -> str:
    """``h:mm:ss`` above an hour, else ``m:ss``."""
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(
    step: int,
    total_steps: int,
    metrics: Mapping[str, float],
    console_keys: Sequence[tuple[str, str]],
    sec_per_step: float | None,
) -> str:
    """The one-line console summary for ``step`` (keys missing from ``metrics`` are skipped)."""
    frac = min(max(step / total_steps, 0.0), 1.0) if total_steps > 0 else 1.0
    filled = int(frac * _BAR_WIDTH)
    parts = [f"step {step}/{total_steps} [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}]"]
    parts.append(f"{int(frac * 100)}%")
    parts += [f"{short} {metrics[key]:.3g}" for key, short in console_keys if key in metrics]
    line = " ".join(parts)
    if sec_per_step is not None:
        eta = sec_per_step * max(total_steps - step, 0)
        line += f" | {sec_per_step:.3g} s/step ETA {_format_duration(eta)}"
    return line


class MetricsLogger:
    """Appends metrics to ``metrics.jsonl``, TensorBoard (``out_dir/tb``) and the console.

    Args:
      out_dir: run directory; created if missing.
      total_steps: last step of training, for the progress bar and ETA.
      use_tensorboard: write TensorBoard event files with tensorboardX.
      start_step: first step this process will log; lines with ``step >= start_step`` already in
        ``metrics.jsonl`` are removed (0 starts the file afresh).
      console_keys: ``(metric key, short name)`` pairs shown on the console line.
      print_fn: where console lines go (``print`` by default; ``None`` for silence).
    """

    def __init__(
        self,
        out_dir: str | Path,
        total_steps: int,
        use_tensorboard: bool = True,
        start_step: int = 0,
        console_keys: Sequence[tuple[str, str]] = DEFAULT_CONSOLE_KEYS,
        print_fn: Callable[[str], None] | None = print,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self.console_keys = tuple(console_keys)
        self._print = print_fn
        self._start_step = start_step
        self._t0 = time.perf_counter()
        self._truncate_from(start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if use_tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: only needed when enabled

            purge = start_step if start_step > 0 else None
            self._writer = SummaryWriter(logdir=str(self.out_dir / "tb"), purge_step=purge)

    def _truncate_from(self, start_step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short when the previous run was killed mid-write
            if record.get("step", math.inf) < start_step:
                kept.append(line + "\n")
        self.path.write_text("".join(kept), encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records ``metrics`` for ``step`` everywhere; values must convert with ``float()``."""
        values = {k: float(v) for k, v in metrics.items()}  # numpy / 0-d jax scalars too
        self._file.write(json.dumps({"step": int(step), **values}) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, global_step=int(step))
            self._writer.flush()
        if self._print is not None:
            done = step - self._start_step
            sec_per_step = (time.perf_counter() - self._t0) / done if done > 0 else None
            self._print(
                progress_line(step, self.total_steps, values, self.console_keys, sec_per_step)
            )

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(jsonl_path: str | Path) -> list[dict[str, float]]:
    """All complete records of a metrics file, in file order."""
    records = []
    for line in Path(jsonl_path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(
    jsonl_path: str | Path,
    out_png: str | Path,
    keys: Sequence[str] = DEFAULT_PLOT_KEYS,
) -> list[str]:
    """Plots each of ``keys`` found in the file against step; returns the keys drawn.

    Keys logged only on some steps (validation) are drawn at those steps. Writes nothing and
    returns ``[]`` when none of the keys occurs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(jsonl_path)
    present = [k for k in keys if any(k in r for r in records)]
    if not present:
        return []
    fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.4 * len(present)), squeeze=False)
    for ax, key in zip(axes[:, 0], present, strict=True):
        steps = [r["step"] for r in records if key in r]
        values = [r[key] for r in records if key in r]
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(Path(jsonl_path).parent.name or str(jsonl_path))
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return present
