"""Loaders for the math evaluation sets LaSeR reports on (MATH500, AIME24/25, AMC23, OlympiadBench).

The sets are JSON-lines files ``<name>.jsonl`` with at least ``problem`` and ``answer`` per line
(math500 also has solution, subject, level, unique_id). Where they live is a deployment detail, so
the directory is, in order: the ``eval_dir`` argument, the env var ``TURBOLASER_EVAL_DIR``, or
``<repo>/../shared/data/eval``. A missing set or a malformed line raises DataConfigError naming
the set, the path and the line, because a silently shortened eval set gives wrong accuracies.

Answers are LaTeX strings, so equality needs care: `answers_equivalent` uses `math_verify`
(symbolic comparison) when it is importable and a normalised-string comparison otherwise;
`ANSWER_BACKEND` says which one this process uses.
"""

import os
import re
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from data_pipelines.errors import DataConfigError
from data_pipelines.jsonl_records import check_unique, json_objects

EVAL_SETS = ("math500", "aime24", "aime25", "amc23", "olympiadbench")
EVAL_DIR_ENV = "TURBOLASER_EVAL_DIR"
DEFAULT_EVAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval"

# Seconds math_verify may spend parsing one answer and comparing two; sympy can hang on
# adversarial LaTeX. Enforced by math_verify's own SIGALRM timer, so only in the main thread.
MATH_VERIFY_TIMEOUT_S = 5

try:  # optional: the CPU demo and CI run without it
    import math_verify as _math_verify
except Exception:  # ImportError, or a broken install: fall back rather than fail at import
    _math_verify = None

ANSWER_BACKEND = "math_verify" if _math_verify is not None else "normalised-string"


@dataclass(frozen=True)
class EvalItem:
    """One problem. `id` is "<set>-<id in the file>" (or the line number when the file has none);
    `meta` keeps every other field of the line (solution, subject, level, ...)."""

    id: str
    problem: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def resolve_eval_dir(eval_dir: str | os.PathLike | None = None) -> Path:
    """The argument, else $TURBOLASER_EVAL_DIR, else the shared data folder beside the repo."""
    if eval_dir is not None:
        return Path(eval_dir)
    env = os.environ.get(EVAL_DIR_ENV)
    return Path(env) if env else DEFAULT_EVAL_DIR


def _available(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.jsonl")) if directory.is_dir() else []


def load_eval_set(name: str, eval_dir: str | os.PathLike | None = None,
                  limit: int | None = None) -> list[EvalItem]:
    """The first `limit` items (all if None) of ``<eval_dir>/<name>.jsonl``, in file order.

    Any ``<name>.jsonl`` in the folder loads, so a new set needs a file, not a code change;
    `EVAL_SETS` lists the ones the project reports on.
    """
    directory = resolve_eval_dir(eval_dir)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise DataConfigError(
            f"eval.sets: {name!r} is not a set name; use one of {list(EVAL_SETS)}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise DataConfigError(f"eval.limit: must be an integer >= 0 or None, got {limit!r}")
    path = directory / f"{name}.jsonl"
    if not path.is_file():
        raise DataConfigError(
            f"eval.sets: no file for eval set {name!r} at {path}; files in {directory}: "
            f"{_available(directory) or 'none (folder missing or empty)'}. Set eval_dir or "
            f"${EVAL_DIR_ENV} to the folder that holds <name>.jsonl")
    items: list[EvalItem] = []
    seen: dict[str, int] = {}
    for lineno, where, row in json_objects(path, f"eval set {name!r}, {path}", limit):
        missing = [k for k in ("problem", "answer") if k not in row or row[k] is None]
        if missing:
            raise DataConfigError(f"{where}: missing field(s) {missing}; every line needs "
                                  f"'problem' and 'answer'")
        if not isinstance(row["problem"], str) or not row["problem"].strip():
            raise DataConfigError(f"{where}: 'problem' must be a non-empty string")
        if isinstance(row["answer"], (dict, list, bool)):
            raise DataConfigError(f"{where}: 'answer' must be a string or a number, got "
                                  f"{type(row['answer']).__name__}")
        raw_id = row.get("id", row.get("unique_id"))
        item_id = f"{name}-{raw_id if raw_id is not None else lineno}"
        check_unique(seen, item_id, where, lineno)
        meta = {k: v for k, v in row.items() if k not in ("problem", "answer")}
        items.append(EvalItem(item_id, row["problem"], str(row["answer"]).strip(), meta))
    return items


# LaTeX that changes how an answer looks, not what it is.
# Order matters: "\\$" before "$", "\\%" before "%".
_DROP = ["\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\displaystyle", "\\$", "$",
         "^\\circ", "^{\\circ}", "\\%", "%"]
_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|boxed|mbox)\{([^{}]*)\}")
_FRAC = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$|^(-?)\\frac(\d)(\d)$")


def normalise_latex(answer: str) -> str:
    """A canonical string for simple answers: no spaces or sizing macros, \\dfrac -> \\frac,
    \\text{} unwrapped, numbers (integers, decimals, 1,234, integer fractions) as reduced
    fractions. Deliberately modest: anything symbolic is compared as written."""
    s = str(answer).strip()
    for token in _DROP:
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for _ in range(3):  # nested wrappers, bounded
        s = _WRAPPERS.sub(r"\1", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^[a-zA-Z]=", "", s)  # "x=5" -> "5"
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    value = _as_number(s)
    return str(value) if value is not None else s


def _as_number(s: str) -> Fraction | None:
    if re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)", s):
        return Fraction(s)
    m = _FRAC.fullmatch(s)
    if m:
        sign, num, den = (m.group(1), m.group(2), m.group(3)) if m.group(2) else m.group(4, 5, 6)
        if int(den) != 0:
            value = Fraction(int(num), int(den))
            return -value if sign else value
    return None


def _math_verify_equivalent(a: str, b: str) -> bool:
    """Symbolic check with math_verify; its SIGALRM timeouts work only in the main thread, so
    elsewhere they are turned off (None) rather than raising."""
    in_main = threading.current_thread() is threading.main_thread()
    timeout = MATH_VERIFY_TIMEOUT_S if in_main else None
    gold = _math_verify.parse(f"${a}$", parsing_timeout=timeout)
    pred = _math_verify.parse(f"${b}$", parsing_timeout=timeout)
    if not gold or not pred:
        return False
    return bool(_math_verify.verify(gold, pred, timeout_seconds=timeout))


def answers_equivalent(a: str, b: str) -> bool:
    """True if two answers are the same; never raises (an error or a timeout means False).

    Normalised strings are compared first (cheap, and it catches "\\dfrac{1}{2}" vs "0.5");
    math_verify, when installed, then decides the rest symbolically.
    """
    try:
        if normalise_latex(a) == normalise_latex(b):
            return True
        if _math_verify is not None:
            return _math_verify_equivalent(str(a), str(b))
        return False
    except Exception:
        return False
