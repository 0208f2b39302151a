"""Tests for lorarl_jax.data: schema validation, tokenisation, grain pipeline."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lorarl_jax import data

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer whose post-processor adds BOS, like Llama's, built offline."""
    corpus = ["What is 2 + 3 ? Give the final answer after ####", "one two three four five six"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    bos_id = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos_id)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _row(content: str, gt: str = "5", index: int = 0) -> dict:
    return {
        "data_source": "test",
        "prompt": [{"role": "user", "content": content}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": gt},
        "extra_info": {"split": "train", "index": index},
    }


def _examples(n: int) -> list[dict]:
    """Synthetic encoded examples with lengths 1..4 and ground_truth = str(index)."""
    return [
        {
            "input_ids": list(range(10, 11 + i % 4)),
            "raw_prompt": f"p{i}",
            "ground_truth": str(i),
            "data_source": "test",
            "extra_info": {"index": i},
        }
        for i in range(n)
    ]


def _ids(batches) -> list[list[str]]:
    return [b["ground_truth"] for b in batches]


# --------------------------------------------------------------------------- parquet rows


def test_write_load_roundtrip(tmp_path):
    rows = [_row("What is 2 + 3 ?", "5", 0), _row("one two", "-7", 1)]
    data.write_rows(rows, tmp_path / "d" / "train.parquet")
    assert data.load_rows(tmp_path / "d" / "train.parquet") == rows


def test_load_defaults_optional_columns(tmp_path):
    path = tmp_path / "x.parquet"
    row = _row("hi")
    del row["ability"], row["extra_info"]
    pq.write_table(pa.Table.from_pylist([row]), path)
    assert data.load_rows(path)[0]["ability"] == "" and data.load_rows(path)[0]["extra_info"] == {}


@pytest.mark.parametrize(
    "bad_row, bad_index, problem",
    [
        ({"prompt": []}, 1, "prompt must be a non-empty list"),
        ({"prompt": [{"role": "user"}]}, 2, "prompt[0] must be a dict"),
        ({"reward_model": {"style": "rule", "ground_truth": None}}, 1, "ground_truth is missing"),
        ({"data_source": None}, 2, "missing column 'data_source'"),
    ],
)
def test_load_rows_names_file_row_and_problem(tmp_path, bad_row, bad_index, problem):
    rows = [_row("a"), _row("b"), _row("c")]
    rows[bad_index] = {**rows[bad_index], **bad_row}
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ValueError) as err:
        data.load_rows(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: row {bad_index}: ") and problem in msg and "\n" not in msg


def test_load_rows_missing_column(tmp_path):
    path = tmp_path / "nocol.parquet"
    rows = [{k: v for k, v in _row("a").items() if k != "reward_model"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ValueError, match=r"nocol.parquet: row 0: missing column 'reward_model'"):
        data.load_rows(path)


# --------------------------------------------------------------------------- tokenisation


def test_encode_single_bos_matches_hf_chat_template(tokenizer):
    rows = [_row("What is 2 + 3 ?"), _row("one two three")]
    examples, n_overlong = data.encode_prompts(rows, tokenizer, max_prompt_length=32)
    assert n_overlong == 0 and len(examples) == 2
    for row, ex in zip(rows, examples, strict=True):
        hf = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)
        hf_ids = hf["input_ids"] if isinstance(hf, dict) or hasattr(hf, "keys") else hf
        assert ex["input_ids"] == list(hf_ids)
        assert ex["input_ids"].count(tokenizer.bos_token_id) == 1
        assert ex["input_ids"][0] == tokenizer.bos_token_id
        assert ex["input_ids"][-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
        assert (
            ex["raw_prompt"]
            == "<bos><|user|> " + row["prompt"][0]["content"] + "<eos><|assistant|>"
        )
        assert ex["ground_truth"] == "5" and ex["data_source"] == "test"


def test_encode_without_chat_template_adds_bos_once(tokenizer):
    plain = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, bos_token="<bos>", eos_token="<eos>"
    )
    (ex,), _ = data.encode_prompts([_row("one two")], plain, max_prompt_length=8)
    assert plain.convert_ids_to_tokens(ex["input_ids"]) == ["<bos>", "one", "two"]


def test_encode_overlong_modes(tokenizer):
    # Template overhead: <bos> <|user|> ... <eos> <|assistant|> = 4 tokens.
    rows = [_row(" ".join(["one"] * n)) for n in (2, 9, 4, 12)]
    kept, n = data.encode_prompts(rows, tokenizer, max_prompt_length=8, overlong="filter")
    assert n == 2 and [len(e["input_ids"]) for e in kept] == [6, 8]
    cut, n = data.encode_prompts(rows, tokenizer, max_prompt_length=8, overlong="truncate")
    full, _ = data.encode_prompts(rows, tokenizer, max_prompt_length=64)
    assert n == 2 and [len(e["input_ids"]) for e in cut] == [6, 8, 8, 8]
    assert cut[1]["input_ids"] == full[1]["input_ids"][-8:]
    with pytest.raises(ValueError, match=r"row 1: prompt has 13 tokens > max_prompt_length=8"):
        data.encode_prompts(rows, tokenizer, max_prompt_length=8, overlong="error")


# --------------------------------------------------------------------------- grain pipeline


def test_left_padding_and_mask():
    ds = data.prompt_dataset(
        _examples(4), batch_size=4, max_prompt_length=6, pad_id=0, shuffle=False, num_epochs=1
    )
    (batch,) = list(ds)
    assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32
    np.testing.assert_array_equal(
        batch["input_ids"],
        [[0, 0, 0, 0, 0, 10], [0, 0, 0, 0, 10, 11], [0, 0, 0, 10, 11, 12], [0, 0, 10, 11, 12, 13]],
    )
    np.testing.assert_array_equal(batch["attention_mask"], (batch["input_ids"] != 0).astype(int))
    assert batch["ground_truth"] == ["0", "1", "2", "3"]
    assert batch["raw_prompt"] == ["p0", "p1", "p2", "p3"]
    assert batch["extra_info"] == [{"index": i} for i in range(4)]
    assert batch["data_source"] == ["test"] * 4


def test_bucketed_padding():
    kwargs = dict(max_prompt_length=5, pad_id=0, shuffle=False, num_epochs=1, pad_multiple=3)
    shapes = [
        b["input_ids"].shape for b in data.prompt_dataset(_examples(4), batch_size=2, **kwargs)
    ]
    assert shapes == [(2, 3), (2, 5)]  # longest 2 -> 3; longest 4 -> 6, capped at 5


def test_shuffle_is_seeded():
    def order(seed, shuffle=True):
        ds = data.prompt_dataset(
            _examples(20),
            batch_size=5,
            max_prompt_length=4,
            pad_id=0,
            seed=seed,
            shuffle=shuffle,
            num_epochs=1,
        )
        return sum(_ids(ds), [])

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0), key=int) == [str(i) for i in range(20)]
    assert order(0, shuffle=False) == [str(i) for i in range(20)]


def test_epochs_cover_each_example_and_reshuffle():
    ds = data.prompt_dataset(
        _examples(10), batch_size=4, max_prompt_length=4, pad_id=0, seed=0, num_epochs=2
    )
    seen = sum(_ids(ds), [])
    assert len(seen) == 20  # 20 examples -> 5 full batches, nothing dropped
    assert sorted(seen[:10]) == sorted(seen[10:]) == sorted(str(i) for i in range(10))
    assert seen[:10] != seen[10:]
    dropped = data.prompt_dataset(
        _examples(10), batch_size=4, max_prompt_length=4, pad_id=0, seed=0, num_epochs=1
    )
    assert [len(b) for b in _ids(dropped)] == [4, 4]  # remainder of 2 dropped


def test_process_shards_disjoint_and_covering():
    def shard(i):
        ds = data.prompt_dataset(
            _examples(12),
            batch_size=2,
            max_prompt_length=4,
            pad_id=0,
            seed=0,
            num_epochs=1,
            process_index=i,
            process_count=2,
        )
        return sum(_ids(ds), [])

    a, b = shard(0), shard(1)
    assert len(a) == len(b) == 6 and not set(a) & set(b)
    assert sorted(a + b, key=int) == [str(i) for i in range(12)]
    with pytest.raises(ValueError, match="process_index"):
        data.prompt_dataset(
            _examples(4),
            batch_size=1,
            max_prompt_length=4,
            pad_id=0,
            process_index=2,
            process_count=2,
        )


def test_iterator_state_resume_is_exact():
    def make():
        return data.prompt_dataset(
            _examples(10), batch_size=3, max_prompt_length=4, pad_id=0, seed=7, pad_multiple=2
        )  # infinite: resumes across epoch boundaries too

    full = iter(make())
    for _ in range(4):
        next(full)
    state = json.loads(json.dumps(full.get_state()))  # must survive a JSON checkpoint
    expected = [next(full) for _ in range(6)]

    resumed = iter(make())
    resumed.set_state(state)
    got = [next(resumed) for _ in range(6)]
    for e, g in zip(expected, got, strict=True):
        assert e.keys() == g.keys()
        np.testing.assert_array_equal(e["input_ids"], g["input_ids"])
        np.testing.assert_array_equal(e["attention_mask"], g["attention_mask"])
        assert e["ground_truth"] == g["ground_truth"] and e["extra_info"] == g["extra_info"]


def test_end_to_end_from_parquet(tmp_path, tokenizer):
    data.write_rows([_row("one " * (i % 3 + 1), str(i), i) for i in range(8)], tmp_path / "t.pq")
    examples, _ = data.encode_prompts(data.load_rows(tmp_path / "t.pq"), tokenizer, 16)
    pad_id = data.pad_id_of(tokenizer)
    batch = next(
        iter(
            data.prompt_dataset(examples, batch_size=4, max_prompt_length=16, pad_id=pad_id, seed=0)
        )
    )
    assert batch["input_ids"].shape == (4, 16)
    assert (batch["input_ids"][:, -1] == tokenizer.convert_tokens_to_ids("<|assistant|>")).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == pad_id).all()
