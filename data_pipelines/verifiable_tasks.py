"""Synthetic tasks with exactly checkable answers, so the CPU demo has real SFT and RL data.

RL with verifiable rewards (GRPO stage I, LaSeR's verifier reward r_v in {0, 1}) needs prompts whose
answers a program can check; public math sets are far beyond a tiny model. These tasks are short
(a prompt of a line, a solution of two or three) and come in difficulty levels 1..5 that grow the
operands or lists, so a curriculum and prompt filtering (drop always-pass / always-fail prompts)
have something to act on.

- `generate_tasks` is deterministic per seed, and the first k tasks do not depend on n.
- `Task.solution` is a short worked solution ending in ``\\boxed{answer}``: the SFT target.
- `verify` reads the last ``\\boxed{...}`` (or, when there is none, a final ``answer: ...`` line)
  and compares it exactly after normalising whitespace; it never raises, whatever the response.
- `split_tasks` splits by a hash of the task id, which is a hash of the task's content, so one
  problem is always on the same side even when two seeds generate it.
"""

import hashlib
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterable, Sequence

from data_pipelines.errors import DataConfigError

DIFFICULTIES = (1, 2, 3, 4, 5)

# Answers longer than this are wrong for every task here; capping keeps hostile inputs cheap.
MAX_ANSWER_CHARS = 200


@dataclass(frozen=True)
class Task:
    """One verifiable problem. `id` is a hash of (kind, prompt), stable across seeds and runs."""

    id: str
    kind: str
    difficulty: int
    prompt: str
    answer: str
    solution: str


def _boxed(answer: str) -> str:
    return f"The answer is \\boxed{{{answer}}}."


def _join(values: Iterable[int]) -> str:
    return ", ".join(str(v) for v in values)


def _arithmetic(rng: random.Random, d: int) -> tuple[str, str, str]:
    """+ and - use d-digit operands; * grows slower (1x1, 2x1, 2x2, 3x2, 3x3 digits) so its
    product stays a few tokens long. Negative results only from level 3 on."""
    op = rng.choice("+-*")
    if op == "*":
        a = rng.randint(max(2, 10 ** (d // 2)), 10 ** ((d + 2) // 2) - 1)
        b = rng.randint(max(2, 10 ** ((d - 1) // 2)), 10 ** ((d + 1) // 2) - 1)
        c = a * b
    else:
        lo = 10 ** (d - 1) if d > 1 else 0
        a, b = rng.randint(lo, 10**d - 1), rng.randint(lo, 10**d - 1)
        if op == "-" and d <= 2:
            a, b = max(a, b), min(a, b)
        c = a + b if op == "+" else a - b
    expr = f"{a} {op} {b}"
    return f"Compute {expr}.", str(c), f"{expr} = {c}.\n{_boxed(str(c))}"


def _signed(v: int) -> str:
    """'+ 5' or '- 5', so an equation reads '3x - 5 = 10' rather than '3x + -5 = 10'."""
    return f"+ {v}" if v >= 0 else f"- {-v}"


def _algebra(rng: random.Random, d: int) -> tuple[str, str, str]:
    """a*x + b = c with an integer root; a, b and x grow with d, x may be negative from level 3."""
    a = rng.randint(2, 3 + 2 * d)
    x = rng.randint(-4 * d if d >= 3 else 0, 5 * d)
    b = rng.randint(-(5 * d) ** 2 // 4 if d >= 2 else 0, (5 * d) ** 2 // 4)
    c = a * x + b
    prompt = f"Solve for x: {a}x {_signed(b)} = {c}."
    undo = f"Subtract {b} from" if b >= 0 else f"Add {-b} to"
    solution = (f"{undo} both sides: {a}x = {c - b}.\n"
                f"Divide by {a}: x = {x}.\n{_boxed(str(x))}")
    return prompt, str(x), solution


def _sorting(rng: random.Random, d: int) -> tuple[str, str, str]:
    """Sort 3 + d small integers (values up to 10*d), duplicates allowed."""
    values = [rng.randint(0, 10 * d) for _ in range(3 + d)]
    answer = _join(sorted(values))
    prompt = f"Sort in increasing order: {_join(values)}."
    return prompt, answer, f"From smallest to largest: {answer}.\n{_boxed(answer)}"


_LETTERS = "abcde"
_WORDS = ["red", "blue", "cat", "dog", "sun", "tree", "milk", "star"]


def _counting(rng: random.Random, d: int) -> tuple[str, str, str]:
    """Count a letter in a string of 4*d+2 letters, or a word in a list of 2*d+3 words."""
    if rng.random() < 0.5:
        text = "".join(rng.choice(_LETTERS) for _ in range(4 * d + 2))
        target = rng.choice(_LETTERS)
        n = text.count(target)
        prompt = f'How many times does the letter "{target}" appear in "{text}"?'
        spelled = " ".join(text)
        times = "time" if n == 1 else "times"
        solution = f'The letters are {spelled}; "{target}" appears {n} {times}.\n{_boxed(str(n))}'
    else:
        words = [rng.choice(_WORDS[: 3 + d]) for _ in range(2 * d + 3)]
        target = rng.choice(words)
        n = words.count(target)
        prompt = f'How many times does the word "{target}" appear in: {" ".join(words)}?'
        solution = f'Counting "{target}" word by word gives {n}.\n{_boxed(str(n))}'
    return prompt, str(n), solution


def _comparison(rng: random.Random, d: int) -> tuple[str, str, str]:
    """Largest or smallest of 2 + d integers with up to d digits; negatives from level 3."""
    top = 10**d - 1
    values = [rng.randint(-top if d >= 3 else 0, top) for _ in range(2 + d)]
    which, pick = rng.choice([("largest", max), ("smallest", min)])
    answer = str(pick(values))
    prompt = f"What is the {which} number in: {_join(values)}?"
    return prompt, answer, f"Comparing them one by one, the {which} is {answer}.\n{_boxed(answer)}"


def _sequence(rng: random.Random, d: int) -> tuple[str, str, str]:
    """Next term of an arithmetic sequence; the step and the start grow with d."""
    step = rng.randint(1, 3 * d) * rng.choice([1, -1] if d >= 3 else [1])
    start = rng.randint(0, 10 * d)
    terms = [start + i * step for i in range(3 + d // 2)]
    nxt = terms[-1] + step
    prompt = f"What is the next number: {_join(terms)}, ...?"
    solution = (f"Each term changes by {step}, so the next is {terms[-1]} {_signed(step)} = {nxt}."
                f"\n{_boxed(str(nxt))}")
    return prompt, str(nxt), solution


KINDS: dict[str, Callable[[random.Random, int], tuple[str, str, str]]] = {
    "arithmetic": _arithmetic,
    "algebra": _algebra,
    "sorting": _sorting,
    "counting": _counting,
    "comparison": _comparison,
    "sequence": _sequence,
}

# Kinds whose answer is a list, so a comma separates items rather than thousands.
_LIST_KINDS = {"sorting"}


def _task_id(kind: str, prompt: str) -> str:
    digest = hashlib.sha256(f"{kind}\n{prompt}".encode()).hexdigest()
    return f"{kind}-{digest[:16]}"


def generate_tasks(kinds: Sequence[str], n: int, seed: int,
                   difficulties: Sequence[int] = DIFFICULTIES) -> list[Task]:
    """`n` distinct tasks; kinds are taken in turn (balanced), each difficulty drawn at random.

    The same arguments always give the same list, and a longer list extends a shorter one.
    Duplicates are redrawn; a request for more distinct tasks than the kinds and levels allow
    raises DataConfigError rather than looping forever.
    """
    kinds = list(kinds)
    if not kinds:
        raise DataConfigError(f"verifiable_tasks.kinds: empty; choose from {sorted(KINDS)}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise DataConfigError(
            f"verifiable_tasks.kinds: unknown {unknown}; choose from {sorted(KINDS)}")
    difficulties = list(difficulties)
    if not difficulties or any(d not in DIFFICULTIES for d in difficulties):
        raise DataConfigError(f"verifiable_tasks.difficulties: must be a non-empty subset of "
                              f"{DIFFICULTIES}, got {difficulties!r}")
    if not isinstance(n, int) or n < 0:
        raise DataConfigError(f"verifiable_tasks.n: must be an integer >= 0, got {n!r}")
    # A str seed goes through sha512 in `random`: stable across processes and PYTHONHASHSEED.
    rng = random.Random(f"verifiable_tasks:{seed}")
    tasks: list[Task] = []
    seen: set[str] = set()
    for i in range(n):
        kind = kinds[i % len(kinds)]
        for _ in range(1000):
            d = rng.choice(difficulties)
            prompt, answer, solution = KINDS[kind](rng, d)
            task_id = _task_id(kind, prompt)
            if task_id not in seen:
                break
        else:
            raise DataConfigError(
                f"verifiable_tasks.n: could not draw {n} distinct tasks of kind {kind!r} at "
                f"difficulties {difficulties}; lower n or allow higher difficulties")
        seen.add(task_id)
        tasks.append(Task(task_id, kind, d, prompt, answer, solution))
    return tasks


def _last_boxed(text: str) -> tuple[str | None, str]:
    """Content of the last ``\\boxed{...}``, braces balanced; (None, reason) if absent or broken.
    One backwards search plus one forward scan: linear in the response length."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None, "no \\boxed{}"
    depth, begin = 0, start + len("\\boxed{")
    for j in range(begin, len(text)):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            if depth == 0:
                return text[begin:j], "boxed"
            depth -= 1
    return None, "unbalanced braces in the last \\boxed{"


_ANSWER_LINE = re.compile(r"[ \t]*(?:final[ \t]+)?answer[ \t]*[:=][ \t]*(.*)", re.IGNORECASE)


def extract_answer(response: str) -> tuple[str | None, str]:
    """(answer, how it was found) or (None, why not): the last ``\\boxed{}``, else the last
    non-empty line if it reads ``answer: ...``."""
    if "\\boxed{" in response:
        return _last_boxed(response)
    tail = response.rstrip()
    last_line = tail[tail.rfind("\n") + 1:]
    match = _ANSWER_LINE.match(last_line)
    if match:
        return match.group(1), "answer line"
    return None, "no \\boxed{} and no final 'answer:' line"


_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+")


def normalise_answer(answer: str, kind: str = "") -> str:
    """Whitespace, `$`, a trailing period, surrounding brackets and a leading 'x =' do not count;
    for a scalar kind, '1,234' means 1234 and '5.0' means 5."""
    s = re.sub(r"\s+", "", answer).strip("$").rstrip(".")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    if len(s) >= 2 and (s[0], s[-1]) in {("[", "]"), ("(", ")"), ("{", "}")}:
        s = s[1:-1]
    s = re.sub(r"^[a-z]=", "", s)
    if kind not in _LIST_KINDS:
        if _THOUSANDS.fullmatch(s):
            s = s.replace(",", "")
        if re.fullmatch(r"[-+]?\d+(\.\d+)?", s):
            value = Fraction(s)
            s = str(value) if value.denominator != 1 else str(value.numerator)
    return s


def verify(task: Task, response: str) -> tuple[float, str]:
    """(1.0, "correct") for the task's exact answer, else (0.0, why); never raises."""
    try:
        if not isinstance(response, str):
            return 0.0, f"response is a {type(response).__name__}, not a string"
        answer, how = extract_answer(response)
        if answer is None:
            return 0.0, how
        if len(answer) > MAX_ANSWER_CHARS:
            return 0.0, f"answer is {len(answer)} characters long (> {MAX_ANSWER_CHARS})"
        if normalise_answer(answer, task.kind) == normalise_answer(task.answer, task.kind):
            return 1.0, "correct"
        return 0.0, f"wrong answer ({how}): got {answer[:60]!r}, expected {task.answer!r}"
    except Exception as exc:  # a reward function must not crash a rollout
        return 0.0, f"verifier error: {type(exc).__name__}: {str(exc)[:100]}"


def split_tasks(tasks: Sequence[Task], held_out_fraction: float,
                seed: int) -> tuple[list[Task], list[Task]]:
    """(train, held_out): a task is held out iff a hash of (seed, id) falls below the fraction.

    Deciding per id, not per position, keeps the split stable when tasks are added or reordered
    and puts every copy of one problem on the same side.
    """
    if not 0.0 <= held_out_fraction <= 1.0:
        raise DataConfigError(
            f"verifiable_tasks.held_out_fraction: must be in [0, 1], got {held_out_fraction!r}")
    train, held_out = [], []
    for task in tasks:
        digest = hashlib.sha256(f"{seed}:{task.id}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        (held_out if u < held_out_fraction else train).append(task)
    return train, held_out
