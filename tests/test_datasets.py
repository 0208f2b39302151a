"""Tests for lorarl_jax.datasets: GSM8K conversion, the arithmetic task, the train/val split and
the scripts that write them as parquet."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorarl_jax import data, datasets

REPO = Path(__file__).resolve().parents[1]
GSM8K_JSONL = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"

GSM8K_LINES = [
    {"question": "Q one?", "answer": "1+1 = <<1+1=2>>2\n#### 2"},
    {"question": "Q two?", "answer": "big\n#### 1,234"},
    {"question": "Q three?", "answer": "neg\n#### -5"},
    {"question": "Q four?", "answer": "dec\n####  0.5"},
    {"question": "Q five?", "answer": "x\n#### 72"},
]


def _write_jsonl(path: Path, records, extra_lines=()) -> Path:
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_gsm8k_conversion(tmp_path):
    rows = datasets.gsm8k_rows_from_jsonl(_write_jsonl(tmp_path / "g.jsonl", GSM8K_LINES, [""]))
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["2", "1234", "-5", "0.5", "72"]
    first = rows[0]
    assert first["data_source"] == "openai/gsm8k" and first["ability"] == "math"
    assert first["prompt"] == [
        {
            "role": "user",
            "content": 'Q one? Let\'s think step by step and output the final answer after "####".',
        }
    ]
    assert first["reward_model"]["style"] == "rule"
    assert first["extra_info"] == {
        "split": "train",
        "index": 0,
        "question": "Q one?",
        "answer": GSM8K_LINES[0]["answer"],
    }


def test_gsm8k_malformed_line_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", GSM8K_LINES[:2], ['{"question": "x", "answ'])
    with pytest.raises(ValueError, match=r"g.jsonl: line 3: malformed"):
        datasets.gsm8k_rows_from_jsonl(path)
    path = _write_jsonl(tmp_path / "h.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(ValueError, match=r"h.jsonl: line 1: answer has no final"):
        datasets.gsm8k_rows_from_jsonl(path)


@pytest.mark.skipif(not GSM8K_JSONL.exists(), reason="shared GSM8K data not present")
def test_gsm8k_real_lines(tmp_path):
    with open(GSM8K_JSONL) as f:
        head = [next(f) for _ in range(20)]
    rows = datasets.gsm8k_rows_from_jsonl(_write_jsonl(tmp_path / "r.jsonl", map(json.loads, head)))
    assert len(rows) == 20
    for row, line in zip(rows, head, strict=True):
        last = json.loads(line)["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert row["reward_model"]["ground_truth"] == last
        float(last)


def test_split_train_val_deterministic_disjoint():
    rows = datasets.arith_rows(50, seed=3)
    train, val = datasets.split_train_val(rows, val_size=10, seed=0)
    train2, val2 = datasets.split_train_val(rows, val_size=10, seed=0)
    assert (train, val) == (train2, val2)
    t_idx = [r["extra_info"]["index"] for r in train]
    v_idx = [r["extra_info"]["index"] for r in val]
    assert len(v_idx) == 10 and sorted(t_idx + v_idx) == list(range(50)) and t_idx == sorted(t_idx)
    assert {r["extra_info"]["split"] for r in train} == {"train"}
    assert {r["extra_info"]["split"] for r in val} == {"val"}
    assert datasets.split_train_val(rows, 10, seed=1)[1] != val
    assert len(datasets.split_train_val(rows, 10, seed=0, max_train=7)[0]) == 7


def test_arith_rows_deterministic_and_correct():
    rows = datasets.arith_rows(300, seed=0)
    assert rows == datasets.arith_rows(300, seed=0) and rows != datasets.arith_rows(300, seed=1)
    questions = [r["extra_info"]["question"] for r in rows]
    assert len(set(questions)) == 300
    for r in rows:
        assert r["data_source"] == "arith"
        assert r["prompt"][0]["content"].endswith('Give the final answer after "####".')
        q = r["extra_info"]["question"]
        if q.startswith("What is "):
            assert int(r["reward_model"]["ground_truth"]) == eval(q[8:-1])  # "a op b"
    only_add = datasets.arith_rows(20, seed=0, ops=("+",))
    assert all(" - " not in r["extra_info"]["question"] for r in only_add)
    with pytest.raises(ValueError, match="only 576 distinct problems"):
        datasets.arith_rows(600, seed=0, ops=("*",))  # 8 * 8 pairs * (1 + 8 named) templates = 576


def test_scripts_write_parquet(tmp_path):
    gsm = _write_jsonl(tmp_path / "g.jsonl", GSM8K_LINES)
    cmds = [
        [
            str(REPO / "scripts/prepare_gsm8k.py"),
            "--input",
            str(gsm),
            "--out",
            str(tmp_path / "g"),
            "--val-size",
            "2",
        ],
        [
            str(REPO / "scripts/make_arith.py"),
            "--out",
            str(tmp_path / "a"),
            "--n-train",
            "30",
            "--n-val",
            "5",
        ],
    ]
    for cmd in cmds:
        subprocess.run([sys.executable, *cmd], check=True, capture_output=True)
    assert len(data.load_rows(tmp_path / "g/train.parquet")) == 3
    assert len(data.load_rows(tmp_path / "g/val.parquet")) == 2
    arith_train = data.load_rows(tmp_path / "a/train.parquet")
    arith_val = data.load_rows(tmp_path / "a/val.parquet")
    assert (len(arith_train), len(arith_val)) == (30, 5)
    train_q = {r["extra_info"]["question"] for r in arith_train}
    assert not train_q & {r["extra_info"]["question"] for r in arith_val}
