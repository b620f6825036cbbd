"""Code prompts with hidden tests, and the sandboxed check that turns a response into a reward.

GRPO stage I mixes code with math and logic (Hunyuan-TurboS: 2 : 2 : 1); a code reward is
"the extracted program passes the task's tests". Two sources:

- `generate_code_tasks`: synthetic "write ``solve(...)``" tasks small enough for a tiny model, in
  difficulty levels 1..5 whose required logic grows (a filtered sum at 1, k-th largest distinct
  value at 4, the longest monotone run at 5). Each has a reference solution; its tests are
  ``assert`` lines whose expected values come from running that reference, so they cannot disagree;
  the first case is shown in the prompt as an example, the others stay hidden.
  Same contract as `verifiable_tasks.generate_tasks`: deterministic per seed, a longer list extends
  a shorter one, ids are hashes of the content.
- `load_code_tasks`: a local JSON-lines set (``prompt``, ``tests``, ``entry_point``, optional
  ``id`` and ``difficulty``), for MBPP/HumanEval-style data.

`verify_code` never raises. Reward hacking it guards against: exiting early (success is a line
carrying a random token the driver reads from stdin before the program runs, not the exit code),
rewriting the test file (read before the program runs), monkey-patching builtins or test helpers
(tests run in their own namespace with a copy of builtins) and returning an object whose ``__eq__``
always says True (the entry point's results must be plain built-in values). Known limit: a program
that walks interpreter frames (``sys._getframe(n).f_locals``) can find the token.
"""

import hashlib
import os
import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from data_pipelines.code_sandbox import SandboxLimits, run_python
from data_pipelines.errors import DataConfigError
from data_pipelines.jsonl_records import check_unique, json_objects

DIFFICULTIES = (1, 2, 3, 4, 5)

# Longer responses are not worth parsing; keeps hostile inputs cheap.
MAX_RESPONSE_CHARS = 100_000


@dataclass(frozen=True)
class CodeTask:
    """One coding problem. `tests` is Python code of ``assert`` statements calling `entry_point`;
    `solution` is the reference code (empty for a loaded set). `difficulty` is None when unknown."""

    id: str
    kind: str
    difficulty: int | None
    prompt: str
    entry_point: str
    tests: str
    solution: str = ""


@dataclass(frozen=True)
class _Template:
    """A task family at one level: the spec and reference code are formatted with a parameter."""

    kind: str
    level: int
    params: tuple
    signature: str
    spec: str
    solution: str
    inputs: Callable[[random.Random, int, Any], tuple]


def _ints(rng: random.Random, d: int, lo: int | None = None) -> list[int]:
    lo = -10 * d if lo is None else lo
    return [rng.randint(lo, 10 * d) for _ in range(rng.randint(0, 3 + 2 * d))]


_WORDS = ["apple", "river", "Stone", "cloud", "tiger", "moon", "Lamp", "sea", "paper", "bird"]


def _sentence(rng: random.Random, d: int, _p=None) -> tuple:
    return (" ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 2 + d))),)


def _letters(rng: random.Random, d: int, _p=None) -> tuple:
    return ("".join(rng.choice("abeiouxyzAEIOUB 1,") for _ in range(rng.randint(0, 5 + 3 * d))),)


def _palindrome_text(rng: random.Random, d: int, _p=None) -> tuple:
    half = "".join(rng.choice("abcAB1 ,") for _ in range(rng.randint(0, 2 + d)))
    text = half + rng.choice(["", "x", "1"]) + half[::-1]
    if rng.random() < 0.4 and text:  # break it sometimes
        i = rng.randrange(len(text))
        text = text[:i] + rng.choice("qz9") + text[i + 1:]
    return (text,)


def _brackets(rng: random.Random, d: int, pairs: str) -> tuple:
    chars = pairs + "ab"
    return ("".join(rng.choice(chars) for _ in range(rng.randint(0, 4 + 2 * d))),)


_BALANCED = {"()": "parentheses ()", "()[]": "brackets () and []",
             "()[]{}": "brackets (), [] and {}"}

_TEMPLATES = [
    _Template("sum_multiples", 1, tuple(range(2, 10)), "solve(xs)",
              "returns the sum of the integers in the list xs that are divisible by {p}.",
              "def solve(xs):\n    return sum(x for x in xs if x % {p} == 0)\n",
              lambda rng, d, p: (_ints(rng, d),)),
    _Template("count_char", 1, tuple("aeiouxyz"), "solve(s)",
              "returns how many times the lowercase letter '{p}' occurs in the string s.",
              "def solve(s):\n    return s.count({p!r})\n", _letters),
    _Template("reverse_words", 2, ("", "upper", "lower", "title"), "solve(s)",
              "returns the words of the string s (separated by single spaces) in reverse order, "
              "joined by single spaces{p_text}.",
              "def solve(s):\n    return ' '.join(w{p_call} for w in reversed(s.split(' ')))\n",
              _sentence),
    _Template("count_vowels", 2, ("aeiou", "aeiouy"), "solve(s)",
              "returns how many characters of the string s are vowels ({p_text}, either case).",
              "def solve(s):\n    return sum(1 for c in s.lower() if c in {p!r})\n", _letters),
    _Template("running", 3, ("max", "min", "sum"), "solve(xs)",
              "returns a list whose i-th element is the {p_text} of xs[0..i] (empty list for "
              "empty xs).",
              "def solve(xs):\n    out = []\n    for x in xs:\n"
              "        out.append(x if not out else {p_expr})\n    return out\n",
              lambda rng, d, p: (_ints(rng, d),)),
    _Template("fizzbuzz", 3, ((3, 5), (2, 7), (3, 4), (4, 6)), "solve(n)",
              "returns a list of strings for the numbers 1..n: 'FizzBuzz' for multiples of both "
              "{a} and {b}, 'Fizz' for multiples of {a}, 'Buzz' for multiples of {b}, otherwise "
              "the number itself as a string.",
              "def solve(n):\n    out = []\n    for i in range(1, n + 1):\n"
              "        if i % {a} == 0 and i % {b} == 0:\n            out.append('FizzBuzz')\n"
              "        elif i % {a} == 0:\n            out.append('Fizz')\n"
              "        elif i % {b} == 0:\n            out.append('Buzz')\n"
              "        else:\n            out.append(str(i))\n    return out\n",
              lambda rng, d, p: (rng.randint(0, 5 + 5 * d),)),
    _Template("is_palindrome", 3, ("letters", "letters and digits"), "solve(s)",
              "returns True if the string s reads the same backwards, considering only its "
              "{p} and ignoring case, else False.",
              "def solve(s):\n    kept = [c.lower() for c in s if {p_test}]\n"
              "    return kept == kept[::-1]\n", _palindrome_text),
    _Template("kth_largest", 4, (2, 3, 4), "solve(xs)",
              "returns the {p_text} largest distinct value in the list xs, or None if xs has "
              "fewer than {p} distinct values.",
              "def solve(xs):\n    values = sorted(set(xs), reverse=True)\n"
              "    return values[{p} - 1] if len(values) >= {p} else None\n",
              lambda rng, d, p: ([rng.randint(-5 * d, 5 * d)
                                  for _ in range(rng.randint(0, 4 + d))],)),
    _Template("gcd_lcm", 4, ("greatest common divisor", "least common multiple"), "solve(xs)",
              "returns the {p} of the positive integers in the non-empty list xs.",
              "def solve(xs):\n    def gcd(a, b):\n        while b:\n            a, b = b, a % b\n"
              "        return a\n    result = xs[0]\n    for x in xs[1:]:\n"
              "        result = {p_expr}\n    return result\n",
              lambda rng, d, p: ([rng.randint(1, 6 * d) * rng.choice([1, 2, 3])
                                  for _ in range(rng.randint(1, 2 + d))],)),
    _Template("longest_run", 5, ("strictly increasing", "strictly decreasing", "non-decreasing",
                                 "non-increasing"), "solve(xs)",
              "returns the length of the longest contiguous {p} run in the list xs (0 for an "
              "empty list).",
              "def solve(xs):\n    best = cur = 0\n    for i, x in enumerate(xs):\n"
              "        cur = cur + 1 if i > 0 and {p_test} else 1\n        best = max(best, cur)\n"
              "    return best\n",
              lambda rng, d, p: ([rng.randint(0, 3 + d)
                                  for _ in range(rng.randint(0, 4 + 2 * d))],)),
    _Template("balanced", 5, tuple(_BALANCED), "solve(s)",
              "returns True if the {p_text} in the string s are balanced and properly nested "
              "(other characters do not matter), else False.",
              "def solve(s):\n    pairs = {{c: o for o, c in zip({p!r}[::2], {p!r}[1::2])}}\n"
              "    stack = []\n    for c in s:\n        if c in {p!r}[::2]:\n"
              "            stack.append(c)\n        elif c in pairs:\n"
              "            if not stack or stack.pop() != pairs[c]:\n                return False\n"
              "    return not stack\n", _brackets),
]

# Per-parameter words and code fragments the templates above format in.
_FILL: dict[str, Callable[[Any], dict[str, Any]]] = {
    "reverse_words": lambda p: {"p_text": f", each word in {p} case" if p else "",
                                "p_call": {"": "", "upper": ".upper()", "lower": ".lower()",
                                           "title": ".capitalize()"}[p]},
    "count_vowels": lambda p: {"p_text": ", ".join(p)},
    "running": lambda p: {"p_text": {"max": "maximum", "min": "minimum", "sum": "sum"}[p],
                          "p_expr": {"max": "max(out[-1], x)", "min": "min(out[-1], x)",
                                     "sum": "out[-1] + x"}[p]},
    "fizzbuzz": lambda p: {"a": p[0], "b": p[1]},
    "is_palindrome": lambda p: {"p_test": "c.isalpha()" if p == "letters" else "c.isalnum()"},
    "kth_largest": lambda p: {"p_text": {2: "second", 3: "third", 4: "fourth"}[p]},
    "gcd_lcm": lambda p: {"p_expr": "gcd(result, x)" if p.startswith("greatest")
                          else "result * x // gcd(result, x)"},
    "longest_run": lambda p: {"p_test": {"strictly increasing": "x > xs[i - 1]",
                                         "strictly decreasing": "x < xs[i - 1]",
                                         "non-decreasing": "x >= xs[i - 1]",
                                         "non-increasing": "x <= xs[i - 1]"}[p]},
    "balanced": lambda p: {"p_text": _BALANCED[p]},
}
# fizzbuzz's parameter fills {a} and {b}, not {p}; letters only (no digit-level alphabets).
_FILL["count_char"] = lambda p: {}
_FILL["sum_multiples"] = lambda p: {}

KINDS = tuple(dict.fromkeys(t.kind for t in _TEMPLATES))


@cache
def _reference(solution: str) -> Callable:
    """Our own reference code (trusted), compiled once, to compute the expected outputs."""
    namespace: dict[str, Any] = {}
    exec(compile(solution, "<reference>", "exec"), namespace)  # noqa: S102 (our own code)
    return namespace["solve"]


def _draw(template: _Template, p: Any, rng: random.Random) -> tuple[str, str, str]:
    """(prompt, reference solution, tests): 3 + level distinct input cases, expected values from
    the reference solution; the first case is shown in the prompt as an example."""
    d = template.level
    fill = {"p": p, **_FILL[template.kind](p)}
    solution = template.solution.format(**fill)
    solve = _reference(solution)
    cases: dict[str, Any] = {}
    for _ in range(20 * (3 + d)):
        if len(cases) == 3 + d:
            break
        args = template.inputs(rng, d, p)
        call = f"solve({', '.join(repr(a) for a in args)})"
        if call not in cases:
            cases[call] = solve(*args)
    tests = "".join(f"assert {call} == {expected!r}, "
                    f"{f'{call} should return {expected!r}'[:200]!r}\n"
                    for call, expected in cases.items())
    call, expected = next(iter(cases.items()))
    prompt = (f"Write a Python function `{template.signature}` that "
              f"{template.spec.format(**fill)} For example, {call} returns {expected!r}. "
              f"Answer with the code in a ```python block.")
    return prompt, solution, tests


def _task_id(kind: str, prompt: str) -> str:
    digest = hashlib.sha256(f"{kind}\n{prompt}".encode()).hexdigest()
    return f"{kind}-{digest[:16]}"


def generate_code_tasks(n: int, seed: int, difficulties: Sequence[int] = DIFFICULTIES,
                        kinds: Sequence[str] | None = None) -> list[CodeTask]:
    """`n` distinct tasks: a template at one of the chosen levels, a parameter and test inputs,
    all drawn at random. Deterministic per seed, and the first k do not depend on n. Prompts
    differ by parameter and by the example shown; duplicates are redrawn, and a request the
    templates cannot fill raises DataConfigError rather than looping forever."""
    difficulties = list(difficulties)
    if not difficulties or any(d not in DIFFICULTIES for d in difficulties):
        raise DataConfigError(f"code_tasks.difficulties: must be a non-empty subset of "
                              f"{DIFFICULTIES}, got {difficulties!r}")
    kinds = list(KINDS if kinds is None else kinds)
    pool = [t for t in _TEMPLATES if t.level in difficulties and t.kind in kinds]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not pool:
        raise DataConfigError(f"code_tasks.kinds: {unknown or kinds} gives no tasks at "
                              f"difficulties {difficulties}; choose from {list(KINDS)} "
                              f"(levels: {[(t.kind, t.level) for t in _TEMPLATES]})")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise DataConfigError(f"code_tasks.n: must be an integer >= 0, got {n!r}")
    rng = random.Random(f"code_tasks:{seed}")
    tasks: list[CodeTask] = []
    seen: set[str] = set()
    for _ in range(n):
        for _ in range(1000):
            template = rng.choice(pool)
            p = rng.choice(template.params)
            prompt, solution, tests = _draw(template, p, rng)
            task_id = _task_id(template.kind, prompt)
            if task_id not in seen:
                break
        else:
            raise DataConfigError(f"code_tasks.n: could not draw {n} distinct tasks of kinds "
                                  f"{kinds} at difficulties {difficulties}; lower n or allow "
                                  f"more kinds or levels")
        seen.add(task_id)
        tasks.append(CodeTask(task_id, template.kind, template.level, prompt, "solve", tests,
                              solution))
    return tasks


def load_code_tasks(path: str | os.PathLike, limit: int | None = None) -> list[CodeTask]:
    """The first `limit` tasks (all if None) of a JSON-lines file, in file order; a malformed
    line raises DataConfigError naming the file and the line."""
    path = Path(path)
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise DataConfigError(f"code_tasks.limit: must be an integer >= 0 or None, got {limit!r}")
    if not path.is_file():
        raise DataConfigError(f"code_tasks.path: no file at {path}; point it to a .jsonl file "
                              f"with 'prompt', 'tests' and 'entry_point' on each line")
    tasks: list[CodeTask] = []
    seen: dict[str, int] = {}
    for lineno, where, row in json_objects(path, f"code set {path}", limit):
        for key in ("prompt", "tests", "entry_point"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise DataConfigError(f"{where}: '{key}' must be a non-empty string; every "
                                      f"line needs 'prompt', 'tests' and 'entry_point'")
        if not row["entry_point"].isidentifier():
            raise DataConfigError(f"{where}: 'entry_point' {row['entry_point']!r} is not a "
                                  f"Python identifier")
        difficulty = row.get("difficulty")
        if difficulty is not None and (isinstance(difficulty, bool)
                                       or difficulty not in DIFFICULTIES):
            raise DataConfigError(f"{where}: 'difficulty' must be one of {DIFFICULTIES} or "
                                  f"absent, got {difficulty!r}")
        raw_id = row.get("id")
        if raw_id is not None and (isinstance(raw_id, bool)
                                   or not isinstance(raw_id, (str, int))):
            raise DataConfigError(f"{where}: 'id' must be a string or an integer")
        task_id = str(raw_id) if raw_id is not None else _task_id("file", row["prompt"])
        check_unique(seen, task_id, where, lineno)
        tasks.append(CodeTask(task_id, "file", difficulty, row["prompt"],
                              row["entry_point"], row["tests"], row.get("solution") or ""))
    return tasks


def extract_code(response: str) -> tuple[str | None, str]:
    """(code, how) from the last ```python (or ```py) fenced block, else the last untagged
    ``` block; (None, why) when there is none. Linear in the response length."""
    if not isinstance(response, str):
        return None, f"response is a {type(response).__name__}, not a string"
    if len(response) > MAX_RESPONSE_CHARS:
        return None, f"response is {len(response)} characters long (> {MAX_RESPONSE_CHARS})"
    parts = response.split("```")
    # Odd positions are fenced bodies; the last one is unclosed when the fence count is odd.
    closed = parts[1:-1:2]
    python, plain = None, None
    for body in closed:
        header, _, code = body.partition("\n")
        tag = header.strip().lower()
        if tag in ("python", "py", "python3"):
            python = code
        elif tag == "":
            plain = code
    code, how = (python, "python block") if python is not None else (plain, "plain block")
    if code is None:
        if len(parts) % 2 == 0 and len(parts) > 1:
            return None, "unclosed code fence (truncated response?)"
        return None, "no ```python code block"
    if not code.strip():
        return None, f"empty {how}"
    return code, how


# The trusted program that runs in the sandbox around the untrusted solution.
_DRIVER = r'''
import builtins, os, sys

# Functions defined below look names up in this snapshot, so a solution that rebinds
# builtins.AssertionError (or anything else in builtins) cannot change how the driver behaves.
__builtins__ = dict(builtins.__dict__)


def _main(entry):
    nonce = sys.stdin.readline().strip()
    os.close(0)
    report_fd = os.dup(1)
    os.dup2(2, 1)  # the solution's prints go to stderr; stdout carries only the verdict
    safe = dict(builtins.__dict__)
    _type, _str, _len, _repr = type, str, len, repr
    plain_scalars = (int, float, str, bool, type(None), bytes, complex)

    def report(status, detail=""):
        line = f"\n{nonce} {status} {' '.join(_str(detail).split())[:300]}\n"
        os.write(report_fd, line.encode("utf-8", "replace"))
        os._exit(0)

    def describe(exc):
        try:
            text = _str(exc)
        except BaseException:
            text = "?"
        name = _type(exc).__name__
        return f"{name}: {text}" if text else name

    def plain(value, depth=0):
        t = _type(value)
        if t in plain_scalars:
            return True
        if depth > 50:
            return False
        if t in (list, tuple, set, frozenset):
            return all(plain(v, depth + 1) for v in value)
        if t is dict:
            return all(plain(k, depth + 1) and plain(v, depth + 1) for k, v in value.items())
        return False

    with open("tests.py", encoding="utf-8") as f:
        tests_source = f.read()
    with open("solution.py", encoding="utf-8") as f:
        source = f.read()
    try:
        tests_code = compile(tests_source, "tests.py", "exec")
    except SyntaxError as exc:
        report("fail", f"task error: its tests do not compile ({exc.msg})")
    try:
        code = compile(source, "solution.py", "exec")
    except (SyntaxError, ValueError) as exc:
        line = getattr(exc, "lineno", None)
        report("fail", f"syntax error: {getattr(exc, 'msg', exc)}"
                       + (f" (line {line})" if line else ""))
    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(code, namespace)
    except BaseException as exc:
        report("fail", f"error while defining the solution: {describe(exc)}")
    fn = namespace.get(entry)
    if not callable(fn):
        report("fail", f"no function named {entry!r} defined")

    def candidate(*args, **kwargs):
        result = fn(*args, **kwargs)
        if not plain(result):
            raise TypeError(f"{entry} returned a {_type(result).__name__}; only plain built-in "
                            f"values (numbers, strings, lists, dicts, ...) count")
        return result

    test_namespace = {"__name__": "__tests__", "__builtins__": safe, entry: candidate,
                      "candidate": candidate}
    try:
        exec(tests_code, test_namespace)
        check = test_namespace.get("check")
        if callable(check):  # HumanEval style: tests define check(candidate)
            check(candidate)
    except AssertionError as exc:
        report("fail", f"test failed: {describe(exc)}")
    except BaseException as exc:
        report("fail", f"error during tests: {describe(exc)}")
    report("pass")

_main(__ENTRY__)
'''


def verify_code(task: CodeTask, response: str,
                limits: SandboxLimits | None = None) -> tuple[float, str]:
    """(1.0, "all tests passed") iff the response's code passes every test in the sandbox, else
    (0.0, why): no code block, syntax error, a failed test, timeout, a blocked operation, ...
    Never raises."""
    try:
        code, how = extract_code(response)
        if code is None:
            return 0.0, how
        nonce = secrets.token_hex(16)
        driver = _DRIVER.replace("__ENTRY__", repr(task.entry_point))
        result = run_python(driver, limits, files={"solution.py": code, "tests.py": task.tests},
                            stdin=nonce + "\n")
        verdicts = [ln[len(nonce):].strip() for ln in result.stdout.splitlines()
                    if ln.startswith(nonce + " ")]
        if result.timed_out:
            return 0.0, result.reason
        if not verdicts:
            why = "exit code 0" if result.ok else result.reason
            return 0.0, f"no verdict: the program stopped before the tests finished ({why})"
        status, _, detail = verdicts[0].partition(" ")
        if status == "pass":
            return 1.0, "all tests passed"
        if "sandbox blocked" in detail:
            return 0.0, f"blocked operation: {detail}"
        if "MemoryError" in detail:
            return 0.0, f"memory limit exceeded: {detail}"
        return 0.0, detail or "failed"
    except Exception as exc:  # noqa: BLE001 (a reward function must not crash a rollout)
        return 0.0, f"verifier error: {type(exc).__name__}: {str(exc)[:100]}"
