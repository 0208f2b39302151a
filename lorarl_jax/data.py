"""Prompt data: verl-style parquet rows -> chat-templated token ids -> grain batches.

The flow has three steps, each a plain function so it can be tested on its own:

1. ``load_rows(path)`` reads a parquet file in verl's schema and validates every row once, so a bad
   row fails at start-up with ``file: row i: problem`` instead of deep inside a rollout::

       data_source: str                  e.g. "openai/gsm8k"
       prompt: list[{role, content}]     chat messages
       ability: str                      optional, defaults to ""
       reward_model: {style, ground_truth}
       extra_info: dict                  optional, defaults to {}

2. ``encode_prompts(rows, tokenizer, max_prompt_length)`` renders the chat template to text and
   encodes it with ``add_special_tokens=False`` -- what ``apply_chat_template(tokenize=True)`` does
   -- so a template that already writes ``bos_token`` does not get a second BOS. Over-long
   prompts are filtered (and counted), left-truncated, or rejected.

3. ``prompt_dataset(examples, ...)`` is a grain pipeline: shard per process (strided, equal sizes)
   -> seeded global shuffle (reshuffled each epoch) -> repeat -> batch with left padding. Left
   padding puts every prompt's last token at column P-1, where generation starts. P is
   ``max_prompt_length``, or the batch's longest prompt rounded up to ``pad_multiple`` so only a few
   prompt shapes are ever compiled. ``iter(ds)`` is a grain ``DatasetIterator`` whose
   ``get_state()`` is a small JSON-serialisable dict; ``set_state`` on a fresh iterator resumes with
   exactly the batches the interrupted one would have produced. Batches may straddle an epoch
   boundary; with a finite ``num_epochs`` only the final remainder is dropped.

Dataset builders (GSM8K conversion, a synthetic arithmetic task, the train/val split) produce rows
in the same schema and live in ``datasets.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_REQUIRED_COLUMNS = ("data_source", "prompt", "reward_model")


# --------------------------------------------------------------------------- parquet rows


def _row_problem(row: dict[str, Any]) -> str | None:
    """Returns a description of what is wrong with ``row``, or None if it is well formed."""
    for col in _REQUIRED_COLUMNS:
        if row.get(col) is None:
            return f"missing column {col!r}"
    if not isinstance(row["data_source"], str):
        return f"data_source must be a string, got {type(row['data_source']).__name__}"
    prompt = row["prompt"]
    if not isinstance(prompt, list) or not prompt:
        return "prompt must be a non-empty list of {'role', 'content'} messages"
    for j, msg in enumerate(prompt):
        if not isinstance(msg, dict) or not all(
            isinstance(msg.get(k), str) for k in ("role", "content")
        ):
            return f"prompt[{j}] must be a dict with string 'role' and 'content', got {msg!r:.80}"
    reward_model = row["reward_model"]
    if not isinstance(reward_model, dict) or reward_model.get("ground_truth") is None:
        return "reward_model.ground_truth is missing"
    if row.get("extra_info") is not None and not isinstance(row["extra_info"], dict):
        return "extra_info must be a dict"
    return None


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Reads a verl-schema parquet file; a bad row raises ``ValueError('file: row i: problem')``."""
    rows = pq.read_table(path).to_pylist()
    out = []
    for i, row in enumerate(rows):
        problem = _row_problem(row)
        if problem is not None:
            raise ValueError(f"{path}: row {i}: {problem}")
        out.append(
            {
                "data_source": row["data_source"],
                "prompt": [{"role": m["role"], "content": m["content"]} for m in row["prompt"]],
                "ability": row.get("ability") or "",
                "reward_model": {
                    "style": row["reward_model"].get("style") or "rule",
                    "ground_truth": str(row["reward_model"]["ground_truth"]),
                },
                "extra_info": dict(row.get("extra_info") or {}),
            }
        )
    return out


def write_rows(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Writes rows in verl's schema to ``path`` (parent directories are created)."""
    for i, row in enumerate(rows):
        problem = _row_problem(row)
        if problem is not None:
            raise ValueError(f"{path}: row {i}: {problem}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(list(rows)), path)


# --------------------------------------------------------------------------- tokenisation


def encode_prompts(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    max_prompt_length: int,
    overlong: str = "filter",
) -> tuple[list[dict[str, Any]], int]:
    """Applies the chat template and tokenises; returns ``(examples, num_overlong)``.

    Each example has ``input_ids`` (list[int]), ``raw_prompt`` (the templated text),
    ``ground_truth``, ``data_source`` and ``extra_info``. ``overlong`` is "filter" (drop and
    count), "truncate" (keep the last ``max_prompt_length`` tokens, count) or "error" (raise naming
    the row). A tokenizer without a chat template gets the message contents joined by blank lines,
    encoded with the tokenizer's own special tokens (a base model's BOS).
    """
    if overlong not in ("filter", "truncate", "error"):
        raise ValueError(f"overlong must be 'filter', 'truncate' or 'error', got {overlong!r}")
    if getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
            for r in rows
        ]
        add_special = False  # the template already wrote any BOS it wants
    else:
        texts = ["\n\n".join(m["content"] for m in r["prompt"]) for r in rows]
        add_special = True
    ids_list = tokenizer(texts, add_special_tokens=add_special)["input_ids"] if texts else []
    examples, num_overlong = [], 0
    for i, (row, text, ids) in enumerate(zip(rows, texts, ids_list, strict=True)):
        if len(ids) > max_prompt_length:
            num_overlong += 1
            if overlong == "error":
                raise ValueError(
                    f"row {i}: prompt has {len(ids)} tokens > max_prompt_length={max_prompt_length}"
                )
            if overlong == "filter":
                continue
            ids = ids[-max_prompt_length:]
        examples.append(
            {
                "input_ids": list(ids),
                "raw_prompt": text,
                "ground_truth": row["reward_model"]["ground_truth"],
                "data_source": row["data_source"],
                "extra_info": row.get("extra_info") or {},
            }
        )
    return examples, num_overlong


# --------------------------------------------------------------------------- grain pipeline


def collate_left_padded(
    examples: Sequence[dict[str, Any]],
    pad_id: int,
    max_prompt_length: int,
    pad_multiple: int | None,
) -> dict[str, Any]:
    """Stacks examples into ``input_ids``/``attention_mask`` int32 [B, P], padded on the left."""
    longest = max(len(e["input_ids"]) for e in examples)
    if pad_multiple:
        P = min(max_prompt_length, math.ceil(longest / pad_multiple) * pad_multiple)
    else:
        P = max_prompt_length
    input_ids_BxP = np.full((len(examples), P), pad_id, dtype=np.int32)
    attention_mask_BxP = np.zeros((len(examples), P), dtype=np.int32)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids_BxP[b, P - n :] = e["input_ids"]
        attention_mask_BxP[b, P - n :] = 1
    return {
        "input_ids": input_ids_BxP,
        "attention_mask": attention_mask_BxP,
        "ground_truth": [e["ground_truth"] for e in examples],
        "data_source": [e["data_source"] for e in examples],
        "raw_prompt": [e["raw_prompt"] for e in examples],
        "extra_info": [e["extra_info"] for e in examples],
    }


def prompt_dataset(
    examples: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    max_prompt_length: int,
    pad_id: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
    pad_multiple: int | None = None,
) -> grain.IterDataset:
    """A grain dataset of left-padded prompt batches; ``iter()`` it for a checkpointable iterator.

    ``batch_size`` is per process. Each process takes a strided shard of equal size (the last
    ``len % process_count`` examples are dropped so every process sees the same number of
    batches). ``num_epochs=None`` repeats forever.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    per_process = len(examples) // process_count
    if per_process == 0:
        raise ValueError(
            f"{len(examples)} examples cannot be sharded over {process_count} processes"
        )
    ds = grain.MapDataset.source(list(examples))
    ds = ds[process_index : per_process * process_count : process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.batch(
        batch_size,
        drop_remainder=drop_remainder,
        batch_fn=lambda batch: collate_left_padded(batch, pad_id, max_prompt_length, pad_multiple),
    )
    # Examples are already in memory; grain recommends no reader threads (they only fight the GIL).
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=0))


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to EOS (many chat models define no pad token)."""
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    return int(pad_id)
