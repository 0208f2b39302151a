r"""Rule-based scorers of one completion: GSM8K `#### N`, MATH `\boxed{...}`, and format.

Design: each scorer is a pure function on plain strings, `(solution_str, ground_truth) -> float`,
following verl's `verl/utils/reward_score/gsm8k.py` and `math.py` (the Hendrycks-MATH
`strip_string` / `is_equiv` logic) so that rewards and accuracies carry over from verl runs.
`default_compute_score` dispatches on `data_source` as verl's does (below); batching, custom
functions and time limits live in `rewards.py`.

Where we deliberately differ from verl (all in the lenient direction, never marking a wrong
answer right):
- GSM8K answers are compared as numbers after normalisation ("1,000" == "1000", "$5" == "5",
  "5.00" == "5", "72." == "72"); verl compares the raw strings. A ground truth that still holds
  the raw GSM8K solution ("... #### 72") is reduced to the number after its last `####`.
- MATH answers that both reduce to a plain number or an integer fraction are compared exactly
  as rationals, so "0.5" == ".5" == "1/2" == "\frac{1}{2}" (verl special-cases only "0.5").

Only the last 300 characters are searched for a GSM8K answer (verl's `_SOLUTION_CLIP_CHARS`):
the answer sits at the end, and it keeps regex time bounded on long completions. All regexes
here are linear-time, so they cannot stall the reward worker threads.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction

import numpy as np

SOLUTION_CLIP_CHARS = 300

# A number as models write it: optional sign / dollar, digits with thousands commas, decimals.
_NUMBER = r"(?:[-$]{0,2}(?:\d[\d,]*(?:\.\d+)?|\.\d+))"
_STRICT_RE = re.compile(r"####[ \t]*(" + _NUMBER + ")")
_FLEXIBLE_RE = re.compile(_NUMBER)

# Default format check: the completion ends with a `#### <number>` line.
GSM8K_FORMAT_PATTERN = r"(?:^|\n)[ \t]*####[ \t]*" + _NUMBER + r"[ \t]*\.?\s*\Z"

# ------------------------------------------------------------------------------------------
# GSM8K
# ------------------------------------------------------------------------------------------


def normalize_number(text: str) -> str | None:
    """Canonical decimal string of `text` ("$1,000.50" -> "1000.5", "5.00" -> "5"), or None."""
    s = str(text).replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(s)
    except (InvalidOperation, ValueError):
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_gsm8k_answer(text: str, method: str = "strict") -> str | None:
    """Normalised answer from the last 300 characters of `text`, or None if there is none.

    strict: the number after the last `#### ` (the format GSM8K prompts ask for);
    flexible: the last number anywhere in the clipped text.
    """
    if method not in ("strict", "flexible"):
        raise ValueError(f"method must be 'strict' or 'flexible', got {method!r}")
    tail = text[-SOLUTION_CLIP_CHARS:]
    regex = _STRICT_RE if method == "strict" else _FLEXIBLE_RE
    for match in reversed(regex.findall(tail)):
        answer = normalize_number(match)
        if answer is not None:
            return answer
    return None


def _normalize_gsm8k_truth(ground_truth) -> str:
    s = str(ground_truth)
    if "####" in s:
        s = s.rsplit("####", 1)[1]
    s = s.strip()
    number = normalize_number(s)
    return s if number is None else number


def gsm8k_score(
    solution_str: str,
    ground_truth,
    method: str = "strict",
    format_score: float = 0.0,
    score: float = 1.0,
) -> float:
    """`score` if the extracted answer equals the ground truth (as numbers), `format_score` if
    an answer was extracted but is wrong, 0 if no answer was found."""
    answer = extract_gsm8k_answer(solution_str, method)
    if answer is None:
        return 0.0
    return float(score) if answer == _normalize_gsm8k_truth(ground_truth) else float(format_score)


# ------------------------------------------------------------------------------------------
# MATH (\boxed{...})
# ------------------------------------------------------------------------------------------

_TRAILING_UNIT_RE = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{[^{}]*\}\s*$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL_RE = re.compile(r"-?\d+(?:\.\d+)?")
_FRAC_RE = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}")
_SLASH_RE = re.compile(r"(-?\d+)/(-?\d+)")


def extract_boxed(text: str) -> str | None:
    r"""Content of the last `\boxed{...}` or `\fbox{...}` (balanced braces), or None.

    Also accepts verl's `\boxed 5` form (content up to the next space or `$`). A truncated,
    unbalanced box yields None.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    rest = rest[len("\\boxed") :] if rest.startswith("\\boxed") else rest[len("\\fbox") :]
    if not rest.lstrip(" ").startswith("{"):
        match = re.match(r"\s+([^\s$]+)", rest)
        return match.group(1) if match else None
    rest = rest.lstrip(" ")
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None


def _fix_fracs(s: str) -> str:
    r"""`\frac12` -> `\frac{1}{2}`, `\frac1{72}` -> `\frac{1}{72}`, `\frac{1}2` -> `\frac{1}{2}`."""
    s = re.sub(r"\\frac(\w)(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\w)\{", r"\\frac{\1}{", s)
    return re.sub(r"\\frac\{([^{}]*)\}(\w)", r"\\frac{\1}{\2}", s)


def _remove_units(s: str) -> str:
    r"""Drop a trailing `\text{ cm}`-style unit (or all after `\text{ `) if a value remains."""
    stripped = _TRAILING_UNIT_RE.sub("", s).strip()
    if stripped:
        s = stripped
    if "\\text{ " in s and s.split("\\text{ ")[0].strip():
        s = s.split("\\text{ ")[0].strip()
    return s


def strip_math_string(string: str) -> str:
    """Normalise a MATH answer for string comparison (verl/Hendrycks `strip_string`)."""
    s = str(string).strip().replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = _remove_units(s)
    s = _TEXT_RE.sub(r"\1", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("\\{", "{").replace("\\}", "}")
    s = s.strip().rstrip(".").strip()
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    elif s.startswith("-."):
        s = "-0" + s[1:]
    parts = s.split("=")
    if len(parts) == 2 and len(parts[0].strip()) <= 2:  # "x = 5", "k=5"
        s = parts[1]
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = _fix_fracs(s.replace(" ", ""))
    match = _SLASH_RE.fullmatch(s)
    if match:
        s = f"\\frac{{{int(match.group(1))}}}{{{int(match.group(2))}}}"
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    return s


def _as_fraction(s: str) -> Fraction | None:
    """Exact value of a normalised plain number or integer `\\frac`, else None."""
    try:
        if _DECIMAL_RE.fullmatch(s):
            return Fraction(s)
        match = _FRAC_RE.fullmatch(s)
        if match and int(match.group(3)) != 0:
            value = Fraction(int(match.group(2)), int(match.group(3)))
            return -value if match.group(1) else value
    except (ValueError, ZeroDivisionError):
        pass
    return None


def is_equiv(answer: str | None, ground_truth: str | None) -> bool:
    """True if both normalise to the same string or to the same exact rational number."""
    if answer is None or ground_truth is None:
        return False
    try:
        a, b = strip_math_string(answer), strip_math_string(ground_truth)
    except Exception:  # noqa: BLE001 - normalisation is best effort, as in verl
        return answer == ground_truth
    if a == b:
        return True
    fa = _as_fraction(a)
    return fa is not None and fa == _as_fraction(b)


def math_score(solution_str: str, ground_truth) -> float:
    r"""1.0 if the last `\boxed{}` in the solution is equivalent to the ground truth, else 0.0.

    A ground truth that is itself a full solution is reduced to its own last box.
    """
    answer = extract_boxed(solution_str)
    if answer is None:
        return 0.0
    truth = str(ground_truth)
    boxed_truth = extract_boxed(truth)
    return 1.0 if is_equiv(answer, truth if boxed_truth is None else boxed_truth) else 0.0


# ------------------------------------------------------------------------------------------
# Format
# ------------------------------------------------------------------------------------------


def format_score(
    solution_str: str, pattern: str | re.Pattern = GSM8K_FORMAT_PATTERN, score: float = 1.0
) -> float:
    """`score` if `re.search(pattern, solution_str)` matches, else 0.0.

    The default pattern requires the completion to end with a `#### <number>` line. Use inline
    flags (`(?m)`, `(?s)`) in a custom pattern to change line semantics.
    """
    return float(score) if re.search(pattern, solution_str) else 0.0


# ------------------------------------------------------------------------------------------
# Dispatch by data_source (verl default_compute_score) and GSM8K accuracies
# ------------------------------------------------------------------------------------------

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


def default_compute_score(data_source: str, solution_str: str, ground_truth, extra_info=None):
    """Rule reward of one completion, chosen by `data_source` (case-insensitive)."""
    scorer = _SCORERS.get(str(data_source).lower())
    if scorer is None:
        raise ValueError(
            f"no builtin reward for data_source={data_source!r}; known: {list(KNOWN_SOURCES)}"
        )
    return float(scorer(solution_str, ground_truth))


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
