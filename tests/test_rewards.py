"""Rule rewards (GSM8K, MATH, format), dispatch, custom loader, and time-limited evaluation."""

from __future__ import annotations

import functools
import json
import logging
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from lorarl_jax.rl import reward_threads
from lorarl_jax.rl.reward_fns import (
    extract_boxed,
    extract_gsm8k_answer,
    format_score,
    gsm8k_score,
    is_equiv,
    math_score,
    normalize_number,
    strip_math_string,
)
from lorarl_jax.rl.rewards import (
    BUILTIN_REWARD,
    KNOWN_SOURCES,
    RewardHangError,
    RewardManager,
    SampleRewardFn,
    compute_rewards,
    default_compute_score,
    failed_functions,
    hung_threads,
    load_reward_fn,
)

GOOD = "Natalia sold 48/2 = 24 clips in May.\nShe sold 48 + 24 = 72 clips.\n#### 72"

# ------------------------------------------------------------------------------------------
# GSM8K
# ------------------------------------------------------------------------------------------


def test_gsm8k_strict_correct_incorrect_missing():
    assert gsm8k_score(GOOD, "72") == 1.0
    assert gsm8k_score(GOOD.replace("#### 72", "#### 71"), "72") == 0.0
    assert gsm8k_score(GOOD.replace("#### 72", "#### 71"), "72", format_score=0.1) == 0.1
    no_marker = "She sold 72 clips."
    assert extract_gsm8k_answer(no_marker, "strict") is None
    assert gsm8k_score(no_marker, "72", format_score=0.1) == 0.0
    assert gsm8k_score("", "72") == 0.0
    # the last `####` wins
    assert gsm8k_score("#### 5\nwait, redo.\n#### 72", "72") == 1.0


def test_gsm8k_flexible_last_number():
    text = "She sold 48 + 24 = 72 clips in total."
    assert extract_gsm8k_answer(text, "flexible") == "72"
    assert gsm8k_score(text, "72", method="flexible") == 1.0
    assert gsm8k_score("The answer is 70 or so.", "72", method="flexible", format_score=0.1) == 0.1
    assert gsm8k_score("I don't know.", "72", method="flexible", format_score=0.1) == 0.0
    assert extract_gsm8k_answer("Total: $1,234.50 dollars.", "flexible") == "1234.5"
    with pytest.raises(ValueError, match="method"):
        extract_gsm8k_answer(GOOD, "loose")


@pytest.mark.parametrize(
    "answer, truth",
    [
        ("#### 1,000", "1000"),
        ("#### $5", "5"),
        ("#### 5.00", "5"),
        ("#### -3", "-3"),
        ("#### -$12.5", "-12.50"),
        ("#### 0.25", ".25"),
        ("#### 72.", "72"),
        ("####72", "72"),
        ("#### 18", "Janet makes 9 * 2 = 18 dollars.\n#### 18"),  # raw GSM8K answer as truth
    ],
)
def test_gsm8k_strict_number_formats(answer, truth):
    assert gsm8k_score("Some work.\n" + answer, truth) == 1.0


def test_gsm8k_numeric_not_prefix_equal():
    assert gsm8k_score("#### 7", "72") == 0.0
    assert gsm8k_score("#### -72", "72") == 0.0
    assert gsm8k_score("#### 72.5", "72") == 0.0


def test_normalize_number():
    assert normalize_number("1,000") == "1000"
    assert normalize_number("$5") == "5"
    assert normalize_number("5.00") == "5"
    assert normalize_number("-0.50") == "-0.5"
    assert normalize_number("-0") == "0"
    assert normalize_number(".") is None
    assert normalize_number("--5") is None


def test_gsm8k_only_last_300_chars_are_searched():
    padding = "x" * 300
    early = "#### 72\n" + padding  # marker falls outside the clipped tail
    assert len(early[-300:]) == 300 and "####" not in early[-300:]
    assert extract_gsm8k_answer(early, "strict") is None
    assert gsm8k_score(early, "72") == 0.0
    assert gsm8k_score(padding + "\n#### 72", "72") == 1.0
    # flexible likewise only sees the tail: 5 is the last number in it
    assert extract_gsm8k_answer("72 " + "y" * 300 + " 5", "flexible") == "5"
    assert extract_gsm8k_answer("72 " + "y" * 300, "flexible") is None


# ------------------------------------------------------------------------------------------
# MATH
# ------------------------------------------------------------------------------------------


def test_extract_boxed_balanced_braces():
    assert extract_boxed(r"so $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{1} then \boxed{\sqrt{2}}") == r"\sqrt{2}"
    assert extract_boxed(r"\fbox{7}") == "7"
    assert extract_boxed(r"the answer is $\boxed 5$") == "5"
    assert extract_boxed(r"truncated \boxed{\frac{1}{2}") is None
    assert extract_boxed("no box here") is None


@pytest.mark.parametrize(
    "pred, truth",
    [
        (r"\boxed{\frac{1}{2}}", r"\dfrac{1}{2}"),
        (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{0.5}", ".5"),
        (r"\boxed{.5}", "0.5"),
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{1/2}", r"\frac{1}{2}"),
        (r"\boxed{\frac12}", r"\frac{1}{2}"),
        (r"\boxed{-\frac{3}{4}}", "-0.75"),
        (r"\boxed{x = 5}", "5"),
        (r"\boxed{5\text{ cm}}", "5"),
        (r"\boxed{90^\circ}", "90"),
        (r"\boxed{\$18.90}", "18.90"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{(3,\!\tfrac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{10,\!000}", "10000"),
        (r"\boxed{2\sqrt2}", r"2\sqrt{2}"),
        (r"\boxed{42.}", "42"),
        (r"\boxed{\text{(C)}}", r"\text{(C)}"),
    ],
)
def test_math_score_equivalent(pred, truth):
    assert math_score("Work... so the answer is $" + pred + "$.", truth) == 1.0


@pytest.mark.parametrize(
    "pred, truth",
    [
        (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}"),
        (r"\boxed{0.333}", r"\frac{1}{3}"),
        (r"\boxed{(3, 2)}", "(2, 3)"),
        ("no box, answer 5", "5"),
        (r"\boxed{}", "5"),
    ],
)
def test_math_score_wrong_or_missing(pred, truth):
    assert math_score(pred, truth) == 0.0


def test_strip_math_string_and_is_equiv():
    assert strip_math_string(r"\dfrac{1}{2}") == r"\frac{1}{2}"
    assert strip_math_string("3/4") == r"\frac{3}{4}"
    assert strip_math_string(r"\left\{1,2\right\}") == "{1,2}"
    assert not is_equiv(None, "1")
    assert math_score(r"\boxed{4}", r"We get $\boxed{4}$.") == 1.0  # truth with its own box


# ------------------------------------------------------------------------------------------
# Format and dispatch
# ------------------------------------------------------------------------------------------


def test_format_score():
    assert format_score(GOOD) == 1.0
    assert format_score(GOOD + "\n") == 1.0
    assert format_score("#### 1,000.5") == 1.0
    assert format_score(GOOD + "\nThanks!") == 0.0  # not the final line
    assert format_score("The answer is #### 72") == 0.0  # not on its own line
    assert format_score("72") == 0.0
    assert format_score(r"so \boxed{3}", pattern=r"\\boxed\{.+\}") == 1.0
    assert format_score("<think>a</think>b", pattern=r"(?s)^<think>.*</think>", score=0.5) == 0.5


def test_dispatch_by_data_source():
    for source in ("openai/gsm8k", "gsm8k", "arith"):
        assert default_compute_score(source, GOOD, "72") == 1.0
        assert default_compute_score(source, "She sold 72 clips.", "72") == 0.0  # strict
    for source in ("lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "math"):
        assert default_compute_score(source, r"\boxed{\dfrac12}", r"\frac{1}{2}") == 1.0
    assert default_compute_score("HuggingFaceH4/MATH-500", r"\boxed{3}", "4") == 0.0
    with pytest.raises(ValueError, match="my/dataset") as err:
        default_compute_score("my/dataset", GOOD, "72")
    assert "openai/gsm8k" in str(err.value) and "arith" in str(err.value)
    assert set(KNOWN_SOURCES) >= {"openai/gsm8k", "lighteval/MATH", "arith"}


# ------------------------------------------------------------------------------------------
# Custom reward function loader
# ------------------------------------------------------------------------------------------

CUSTOM = """
def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]

def sees_columns(prompts, completions, ground_truth, **columns):
    return [float(c.endswith(g)) for c, g in zip(completions, ground_truth)]

NOT_A_FUNCTION = 3
"""


def test_load_reward_fn(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(CUSTOM)
    fn = load_reward_fn(f"{path}:length_reward")
    assert fn(["p"], ["abc"]) == [3.0]
    scores, metrics = compute_rewards(
        ["p", "q"], ["ans 7", "ans 8"], {"ground_truth": ["7", "7"]}, [f"{path}:sees_columns"]
    )
    np.testing.assert_array_equal(scores, [1.0, 0.0])
    assert metrics["reward/sees_columns/mean"] == 0.5


def _one_line_error(exc_type, spec: str) -> str:
    with pytest.raises(exc_type) as err:
        load_reward_fn(spec)
    msg = str(err.value)
    assert "\n" not in msg and "data.reward_fns" in msg, msg
    return msg


def test_load_reward_fn_errors(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(CUSTOM)
    msg = _one_line_error(FileNotFoundError, f"{tmp_path}/nope.py:length_reward")
    assert f"{tmp_path}/nope.py" in msg
    msg = _one_line_error(ValueError, f"{path}:missing")
    assert f"{path} has no function 'missing'" in msg
    assert "['length_reward', 'sees_columns']" in msg  # what it defines; not the int
    msg = _one_line_error(ValueError, f"{path}:NOT_A_FUNCTION")
    assert str(path) in msg and "'NOT_A_FUNCTION' is a int, not a function" in msg
    msg = _one_line_error(ValueError, str(path))
    assert "path/to/file.py:function_name" in msg


def test_load_reward_fn_import_errors_are_one_line(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("x = 1\n\ndef fn(prompts, completions:\n    return []\n")
    msg = _one_line_error(ValueError, f"{path}:fn")
    assert msg.startswith(f"reward file {path}: SyntaxError at line 3: "), msg
    assert msg.endswith(f"(data.reward_fns '{path}:fn')")
    path.write_text("x = 1\nimport not_a_module_lorarl_xyz\n")
    msg = _one_line_error(ValueError, f"{path}:fn")
    assert f"{path}: ModuleNotFoundError at line 2: " in msg and "not_a_module_lorarl_xyz" in msg
    path.write_text("def helper():\n    raise RuntimeError('bad\\nconfig')\n\nhelper()\n")
    msg = _one_line_error(ValueError, f"{path}:fn")
    assert f"{path}: RuntimeError at line 2: bad config" in msg
    assert not [m for m in sys.modules if m.startswith("_lorarl_reward_broken_")]


# ------------------------------------------------------------------------------------------
# compute_rewards: weights, None, errors, timeouts, accuracies
# ------------------------------------------------------------------------------------------

PROMPTS = ["q1", "q2", "q3", "q4"]
COMPLETIONS = ["So 72.\n#### 72", "It is 72.", "#### 5", "no idea"]
COLUMNS = {"data_source": ["openai/gsm8k"] * 4, "ground_truth": ["72", "72", "72", "72"]}


def constant(value, prompts, completions, **columns):
    return [value] * len(completions)


def test_builtin_weighted_combination():
    def half(prompts, completions, **columns):
        return [0.5, 0.25, 0.0, 1.0]

    scores, metrics = compute_rewards(
        PROMPTS, COMPLETIONS, COLUMNS, ["builtin", half, "format"], weights=[2.0, 1.0, 0.5]
    )
    # builtin (strict) = [1, 0, 0, 0]; format = [1, 0, 1, 0]
    np.testing.assert_allclose(scores, [2.0 + 0.5 + 0.5, 0.25, 0.0 + 0.5, 1.0])
    assert scores.dtype == np.float32 and scores.shape == (4,)
    assert metrics["reward/builtin/mean"] == 0.25
    assert metrics["reward/half/mean"] == pytest.approx(0.4375)
    assert metrics["reward/format_reward/mean"] == 0.5
    assert metrics["reward/mean"] == pytest.approx(np.mean([3.0, 0.25, 0.5, 1.0]))
    assert metrics["reward/accuracy_strict"] == 0.25
    assert metrics["reward/accuracy_flexible"] == 0.5  # "72", "72", "5", none
    for key in ("timeouts", "errors", "none", "nonfinite", "builtin/failed", "half/failed"):
        assert metrics[f"reward/{key}"] == 0


def test_none_and_nonfinite_score_zero_and_are_counted_apart(caplog):
    def some_none(prompts, completions, **columns):
        return [1.0, None, float("nan"), float("-inf")]

    with caplog.at_level(logging.WARNING, logger="lorarl_jax.rl.rewards"):
        scores, metrics = compute_rewards(PROMPTS, COMPLETIONS, COLUMNS, [some_none])
    np.testing.assert_array_equal(scores, [1.0, 0.0, 0.0, 0.0])
    assert metrics["reward/none"] == 1 and metrics["reward/nonfinite"] == 2
    assert metrics["reward/errors"] == 0 and metrics["reward/some_none/failed"] == 3
    assert "some_none" in caplog.text and "2 non-finite" in caplog.text and "nan" in caplog.text


def test_failed_per_function_and_failed_functions():
    def boom(prompts, completions, **columns):
        raise RuntimeError("reward server down")

    def all_nan(prompts, completions, **columns):
        return [float("nan")] * len(completions)

    def all_none(prompts, completions, **columns):
        return [None] * len(completions)

    def picky(prompt, completion, **row):
        if completion == "no idea":
            raise ValueError("cannot parse")
        return float("inf") if prompt == "q1" else 1.0

    fns = ["builtin", boom, all_nan, all_none, SampleRewardFn("picky", picky)]
    scores, metrics = compute_rewards(PROMPTS, COMPLETIONS, COLUMNS, fns)
    np.testing.assert_array_equal(scores, [1.0, 1.0, 1.0, 0.0])  # builtin + picky
    assert metrics["reward/builtin/failed"] == 0 and metrics["reward/picky/failed"] == 2
    assert metrics["reward/boom/failed"] == metrics["reward/all_nan/failed"] == 4
    assert metrics["reward/all_none/failed"] == 4
    assert metrics["reward/errors"] == 5 and metrics["reward/nonfinite"] == 5
    assert metrics["reward/none"] == 4
    assert failed_functions(metrics, 4) == ["boom", "all_nan", "all_none"]
    assert failed_functions(metrics, 0) == []
    _, metrics = compute_rewards([], [], {}, [boom])
    assert metrics["reward/boom/failed"] == 0 and failed_functions(metrics, 0) == []


def test_exception_scores_zero_and_is_counted():
    def boom(prompts, completions, **columns):
        raise RuntimeError("reward server down")

    def wrong_length(prompts, completions, **columns):
        return [1.0]

    scores, metrics = compute_rewards(
        PROMPTS, COMPLETIONS, COLUMNS, [boom, functools.partial(constant, 1.0), wrong_length]
    )
    np.testing.assert_array_equal(scores, [1.0] * 4)  # only the healthy function counts
    assert metrics["reward/errors"] == 8 and metrics["reward/boom/mean"] == 0.0
    assert metrics["reward/constant/mean"] == 1.0


def test_per_sample_error_costs_only_that_sample():
    def picky(prompt, completion, **row):
        if completion == "no idea":
            raise ValueError("cannot parse")
        return 1.0

    scores, metrics = compute_rewards(PROMPTS, COMPLETIONS, COLUMNS, [SampleRewardFn("p", picky)])
    np.testing.assert_array_equal(scores, [1.0, 1.0, 1.0, 0.0])
    assert metrics["reward/errors"] == 1


def test_batch_timeout_returns_in_time():
    def slow(prompts, completions, **columns):
        time.sleep(5)
        return [1.0] * len(completions)

    start = time.monotonic()
    scores, metrics = compute_rewards(
        PROMPTS, COMPLETIONS, COLUMNS, ["builtin", slow], timeout_s=0.5
    )
    assert time.monotonic() - start < 2.0
    np.testing.assert_array_equal(scores, [1.0, 0.0, 0.0, 0.0])  # builtin still scored
    assert metrics["reward/timeouts"] == 4 and metrics["reward/slow/mean"] == 0.0
    assert metrics["reward/slow/failed"] == 4 and failed_functions(metrics, 4) == ["slow"]


def test_per_sample_timeout_costs_only_that_sample():
    def hangs_on_q2(prompt, completion, **row):
        if prompt == "q2":
            time.sleep(5)
        return 1.0

    start = time.monotonic()
    scores, metrics = compute_rewards(
        PROMPTS, COMPLETIONS, COLUMNS, [SampleRewardFn("h", hangs_on_q2)], timeout_s=0.5
    )
    assert time.monotonic() - start < 2.0
    np.testing.assert_array_equal(scores, [1.0, 0.0, 1.0, 1.0])
    assert metrics["reward/timeouts"] == 1


HUNG_SCRIPT = """
import json, time
from lorarl_jax.rl.rewards import compute_rewards

def forever(prompts, completions, **columns):
    while True:
        time.sleep(0.1)

_, metrics = compute_rewards(["p", "q"], ["a", "b"], {}, [forever], timeout_s=0.5)
print(json.dumps(metrics))
"""


def test_hung_reward_does_not_block_interpreter_exit():
    # ThreadPoolExecutor workers are joined at exit: a reward that never returns hung the process
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", HUNG_SCRIPT],
        cwd=pathlib.Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - start < 30
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["reward/timeouts"] == 2 and metrics["reward/forever/failed"] == 2
    assert metrics["reward/hung_threads"] == 1


def _wait_for_hung(n: int, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while hung_threads() != n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hung_threads() == n


def test_hung_threads_are_capped_and_late_finishers_free_them(monkeypatch):
    _wait_for_hung(0)  # the timeout tests above leave threads sleeping for up to 5 s
    monkeypatch.setattr(reward_threads, "MAX_HUNG_THREADS", 3)
    release = threading.Event()

    def stuck(prompts, completions, **columns):
        release.wait()
        return [1.0] * len(completions)

    def stuck_on_q2(prompt, completion, **row):
        if prompt == "q2":
            release.wait()
        return 1.0

    try:
        # one hung thread per hung sample: the other samples still score and their threads end
        scores, metrics = compute_rewards(
            PROMPTS, COMPLETIONS, COLUMNS, [SampleRewardFn("s", stuck_on_q2)], timeout_s=0.05
        )
        np.testing.assert_array_equal(scores, [1.0, 0.0, 1.0, 1.0])
        assert metrics["reward/timeouts"] == 1 and metrics["reward/hung_threads"] == 1
        for hung in (2, 3):
            _, metrics = compute_rewards(PROMPTS, COMPLETIONS, COLUMNS, [stuck], timeout_s=0.05)
            assert metrics["reward/timeouts"] == 4 and metrics["reward/hung_threads"] == hung
        with pytest.raises(RewardHangError) as err:  # 3 hung + 1 more would exceed 3
            compute_rewards(PROMPTS, COMPLETIONS, COLUMNS, [stuck], timeout_s=0.05)
        assert isinstance(err.value, ValueError)
        assert str(err.value) == (
            "reward fn 'stuck' has 2 calls still running past data.reward_timeout_s=0.05 s: it "
            "never returns; fix it or raise the timeout (3 hung reward threads in all, limit 3)"
        )
        assert hung_threads() == 3  # the refused call started nothing
    finally:
        release.set()
    _wait_for_hung(0)  # late finishers un-count themselves
    scores, metrics = compute_rewards(PROMPTS, COMPLETIONS, COLUMNS, [stuck], timeout_s=5)
    assert scores.tolist() == [1.0] * 4 and metrics["reward/hung_threads"] == 0


def test_config_errors_raise_up_front():
    with pytest.raises(ValueError, match="my/dataset"):
        compute_rewards(["q"], ["#### 1"], {"data_source": ["my/dataset"], "ground_truth": ["1"]})
    with pytest.raises(ValueError, match="ground_truth"):
        compute_rewards(["q"], ["#### 1"], {"data_source": ["gsm8k"]})
    with pytest.raises(ValueError, match="aligned"):
        compute_rewards(["q"], ["#### 1"], {"data_source": ["gsm8k", "gsm8k"]})
    with pytest.raises(ValueError, match="weights"):
        compute_rewards(PROMPTS, COMPLETIONS, COLUMNS, ["builtin"], weights=[1.0, 2.0])


def test_math_accuracy_absent_and_empty_batch():
    columns = {"data_source": ["lighteval/MATH"], "ground_truth": [r"\frac{1}{2}"]}
    scores, metrics = compute_rewards(["q"], [r"\boxed{0.5}"], columns)
    assert scores.tolist() == [1.0] and "reward/accuracy_strict" not in metrics
    scores, metrics = compute_rewards([], [], {"data_source": [], "ground_truth": []})
    assert scores.shape == (0,) and metrics["reward/mean"] == 0.0


def test_reward_manager(tmp_path):
    path = tmp_path / "r.py"
    path.write_text(CUSTOM)
    manager = RewardManager(("builtin", f"{path}:length_reward"), weights=(1.0, 0.0))
    assert manager.reward_fns[0] is BUILTIN_REWARD and manager.names == ["builtin", "length_reward"]
    scores, metrics = manager(PROMPTS, COMPLETIONS, COLUMNS)
    np.testing.assert_array_equal(scores, [1.0, 0.0, 0.0, 0.0])
    assert metrics["reward/length_reward/mean"] == np.mean([len(c) for c in COMPLETIONS])
    with pytest.raises(ValueError, match="weights"):
        RewardManager(("builtin",), weights=(1.0, 2.0))


def test_reward_manager_validate_whole_dataset():
    manager = RewardManager(("builtin", "format"))
    sources = ["gsm8k"] * 5 + ["my/dataset"] * 3 + ["lighteval/MATH", "other/set"]
    with pytest.raises(ValueError) as err:
        manager.validate({"data_source": sources, "ground_truth": ["1"] * 10})
    msg = str(err.value)
    assert "'my/dataset' (3 of 10 rows), 'other/set' (1 of 10 rows)" in msg
    assert "gsm8k'" not in msg.split(";")[0] and "openai/gsm8k" in msg  # known ones listed after
    with pytest.raises(ValueError, match="ground_truth"):
        manager.validate({"data_source": ["gsm8k"]})
    with pytest.raises(ValueError, match="aligned"):
        manager.validate({"data_source": ["gsm8k"] * 2, "ground_truth": ["1"]})
    manager.validate({"data_source": ["gsm8k", "ARITH", "lighteval/MATH"], "ground_truth": "123"})
    RewardManager(("format",)).validate({})  # no per-sample validators: nothing to check


def test_flexible_reward_scores_last_number_correctness():
    from lorarl_jax.rl.rewards import compute_rewards

    comps = ["7 + 5 = 12", "the answer is 13", "no number here", "#### 12"]
    scores, m = compute_rewards(
        ["p"] * 4,
        comps,
        {"ground_truth": ["12"] * 4, "data_source": ["arith"] * 4},
        reward_fns=("builtin", "flexible"),
        weights=(1.0, 0.5),
    )
    # strict: only "#### 12" (1.0); flexible: rows 0 and 3 end with 12 (0.5 each)
    assert scores.tolist() == [0.5, 0.0, 0.0, 1.5]
