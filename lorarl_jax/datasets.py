"""Dataset builders: rows in verl's parquet schema (see ``data.py``), ready for ``write_rows``.

- ``gsm8k_rows_from_jsonl(path)``: GSM8K jsonl lines ``{question, answer}`` -> rows with
  data_source "openai/gsm8k", the question followed by ``GSM8K_INSTRUCTION`` as the single user
  message, and the number after the final ``####`` (commas removed) as ``ground_truth``;
  ``extra_info`` keeps the question, the full answer and the line order as ``index``.
- ``arith_rows(n, seed, ...)``: ``n`` distinct synthetic arithmetic problems ("What is 23 + 48?"
  and short word problems) with data_source "arith", so the demo can train without downloaded
  data.
- ``split_train_val(rows, val_size, seed)``: a seeded train/val split of either.

Every builder is deterministic: the same inputs and seed give the same rows, in the same order.
``scripts/prepare_gsm8k.py`` and ``scripts/make_arith.py`` are thin command lines over them.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
ARITH_INSTRUCTION = 'Give the final answer after "####".'


def _make_row(data_source: str, content: str, ground_truth: str, ability: str, extra: dict) -> dict:
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": content}],
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": extra,
    }


def split_train_val(
    rows: Sequence[dict[str, Any]], val_size: int, seed: int, max_train: int | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Seeded random split; both parts keep source order and get ``extra_info.split`` set."""
    if not 0 <= val_size <= len(rows):
        raise ValueError(f"val_size={val_size} must be in [0, {len(rows)}]")
    perm = np.random.default_rng(seed).permutation(len(rows))
    val_idx = sorted(perm[:val_size].tolist())
    train_idx = sorted(perm[val_size:].tolist())[:max_train]

    def tag(idx: list[int], split: str) -> list[dict[str, Any]]:
        return [{**rows[i], "extra_info": {**rows[i]["extra_info"], "split": split}} for i in idx]

    return tag(train_idx, "train"), tag(val_idx, "val")


# --------------------------------------------------------------------------- GSM8K


def gsm8k_ground_truth(answer: str) -> str | None:
    """The number after the final ``####`` with commas removed (verl's ``extract_solution``)."""
    match = re.search(r"####\s*(-?[0-9.,]+)", answer)
    return None if match is None else match.group(1).replace(",", "")


def gsm8k_rows_from_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Converts GSM8K jsonl lines ``{question, answer}`` to verl rows (``index`` = line order)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                question, answer = record["question"], record["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: line {lineno}: malformed GSM8K record ({e})") from None
            ground_truth = gsm8k_ground_truth(answer)
            if ground_truth is None:
                raise ValueError(f"{path}: line {lineno}: answer has no final '#### N'")
            extra = {"split": "train", "index": len(rows), "question": question, "answer": answer}
            content = f"{question} {GSM8K_INSTRUCTION}"
            rows.append(_make_row("openai/gsm8k", content, ground_truth, "math", extra))
    return rows


# --------------------------------------------------------------------------- arithmetic


_ARITH_TEMPLATES = {
    "+": (
        "What is {a} + {b}?",
        "{name} has {a} marbles and finds {b} more. How many marbles does {name} have now?",
    ),
    "-": (
        "What is {a} - {b}?",
        "{name} had {a} stickers and gave away {b}. How many stickers are left?",
    ),
    "*": (
        "What is {a} * {b}?",
        "{name} buys {a} bags with {b} apples in each. How many apples is that in total?",
    ),
}
_NAMES = ("Ann", "Ben", "Carla", "Dev", "Emi", "Farid", "Gus", "Hana")


def arith_rows(
    n: int,
    seed: int,
    ops: Sequence[str] = ("+", "-", "*"),
    max_operand: int = 99,
    instruction: str = ARITH_INSTRUCTION,
) -> list[dict[str, Any]]:
    """``n`` distinct small arithmetic problems (data_source "arith"), deterministic in ``seed``.

    ``+``/``-`` use operands in [1, max_operand] (``a >= b`` so answers are non-negative);
    ``*`` uses single digits in [2, 9]. Questions are sampled without repeats, so ``n`` is capped
    by the problem space.
    """
    if not ops or any(op not in _ARITH_TEMPLATES for op in ops):
        raise ValueError(f"ops must be a non-empty subset of {tuple(_ARITH_TEMPLATES)}, got {ops}")
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    for _ in range(100 * n + 1000):
        if len(rows) == n:
            break
        op = rng.choice(list(ops))
        lo, hi = (2, 9) if op == "*" else (1, max_operand)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if op == "-" and a < b:
            a, b = b, a
        template = rng.choice(_ARITH_TEMPLATES[op])
        question = template.format(a=a, b=b, name=rng.choice(_NAMES))
        if question in seen:
            continue
        seen.add(question)
        answer = str({"+": a + b, "-": a - b, "*": a * b}[op])
        extra = {"split": "train", "index": len(rows), "question": question, "answer": answer}
        rows.append(_make_row("arith", f"{question} {instruction}", answer, "math", extra))
    if len(rows) < n:
        raise ValueError(
            f"only {len(rows)} distinct problems exist for ops={tuple(ops)}, asked {n}"
        )
    return rows
