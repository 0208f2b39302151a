"""Tests for lorarl_jax.metrics: JSONL records, TensorBoard events, console line, resume, plots."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
from tensorboardX.proto import event_pb2

from lorarl_jax import metrics

REPO = Path(__file__).resolve().parents[1]


def _read_events(tb_dir: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the TFRecord event files under ``tb_dir``."""
    scalars = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        buf = path.read_bytes()
        pos = 0
        while pos < len(buf):
            (length,) = struct.unpack("<Q", buf[pos : pos + 8])
            record = buf[pos + 12 : pos + 12 + length]  # skip length + its crc
            pos += 12 + length + 4  # skip data crc
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                scalars.append((value.tag, event.step, value.simple_value))
    return scalars


def _log_steps(out_dir, steps, start_step=0, lines=None):
    printed = [] if lines is None else lines
    with metrics.MetricsLogger(
        out_dir, total_steps=10, start_step=start_step, print_fn=printed.append
    ) as logger:
        for step in steps:
            logger.log(step, {"reward/mean": step / 10, "actor/kl": np.float32(0.5)})
    return printed


def test_jsonl_exact_and_console(tmp_path):
    printed = _log_steps(tmp_path, [1, 2, 3])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines == [
        '{"step": 1, "reward/mean": 0.1, "actor/kl": 0.5}',
        '{"step": 2, "reward/mean": 0.2, "actor/kl": 0.5}',
        '{"step": 3, "reward/mean": 0.3, "actor/kl": 0.5}',
    ]
    assert len(printed) == 3
    assert printed[2].startswith("step 3/10 [######..............] 30% reward 0.3 kl 0.5 | ")
    assert " s/step ETA " in printed[2]


def test_progress_line_golden():
    line = metrics.progress_line(
        12,
        50,
        {"reward/mean": 0.4123, "val/accuracy_strict": 0.38, "actor/kl": 0.0021, "other": 1.0},
        metrics.DEFAULT_CONSOLE_KEYS,
        sec_per_step=3.1,
    )
    assert line == (
        "step 12/50 [####................] 24% reward 0.412 acc 0.38 kl 0.0021"
        " | 3.1 s/step ETA 1:58"
    )
    assert metrics.progress_line(0, 4, {}, (), None) == "step 0/4 [....................] 0%"
    assert metrics.progress_line(1, 2, {}, (), 7300.0).endswith("ETA 2:01:40")


def test_tensorboard_scalars(tmp_path):
    _log_steps(tmp_path, [1, 2])
    scalars = _read_events(tmp_path / "tb")
    assert ("reward/mean", 2, np.float32(0.2)) in scalars
    assert sorted(s for s in scalars if s[0] == "actor/kl") == [
        ("actor/kl", 1, 0.5),
        ("actor/kl", 2, 0.5),
    ]


def test_resume_drops_steps_at_and_after_restart(tmp_path):
    _log_steps(tmp_path, [1, 2, 3, 4, 5])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "rew')  # a line cut short by a kill
    printed = _log_steps(tmp_path, [3, 4], start_step=3)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
    assert printed[0].startswith("step 3/10") and "s/step" in printed[1]
    _log_steps(tmp_path, [0])  # start_step=0 starts afresh
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [0]


def test_plot_writes_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(
                {
                    "step": s,
                    "reward/mean": s / 10,
                    **({"val/accuracy_strict": 0.5} if s % 2 else {}),
                }
            )
            for s in range(1, 7)
        )
    )
    drawn = metrics.plot_metrics(path, tmp_path / "plots" / "m.png")
    assert drawn == ["reward/mean", "val/accuracy_strict"]
    png = (tmp_path / "plots" / "m.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert metrics.plot_metrics(path, tmp_path / "none.png", keys=("nope",)) == []
    assert not (tmp_path / "none.png").exists()


def test_plot_script(tmp_path):
    _log_steps(tmp_path, [1, 2, 3])
    subprocess.run(
        [sys.executable, str(REPO / "scripts/plot_metrics.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"
