import ast
import hashlib
import json

import pytest

from data_pipelines.code_tasks import (
    DIFFICULTIES,
    KINDS,
    CodeTask,
    extract_code,
    generate_code_tasks,
    load_code_tasks,
    verify_code,
)
from data_pipelines.errors import DataConfigError


def _fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}```\nDone."


@pytest.fixture(scope="module")
def tasks():
    return generate_code_tasks(40, seed=0)


def test_deterministic_per_seed_prefix_stable_and_distinct(tasks):
    assert tasks == generate_code_tasks(40, seed=0)
    assert generate_code_tasks(10, seed=0) == tasks[:10]
    assert [t.id for t in generate_code_tasks(40, seed=1)] != [t.id for t in tasks]
    assert len({t.id for t in tasks}) == len(tasks)
    for t in tasks:
        assert t.id.startswith(t.kind + "-") and t.entry_point == "solve"
        assert t.difficulty in DIFFICULTIES and t.tests.count("assert ") == 3 + t.difficulty


def test_ids_are_content_hashes_stable_across_seeds(tasks):
    by_prompt = {t.prompt: t.id for t in tasks}
    for seed in range(1, 4):
        for t in generate_code_tasks(40, seed=seed):
            assert by_prompt.setdefault(t.prompt, t.id) == t.id
    t = tasks[0]
    assert t.id == f"{t.kind}-" + hashlib.sha256(f"{t.kind}\n{t.prompt}".encode()).hexdigest()[:16]
    first = ast.parse(t.tests.splitlines()[0]).body[0].test  # the first case is the example
    call, expected = ast.unparse(first.left), ast.literal_eval(first.comparators[0])
    assert f"For example, {call} returns {expected!r}." in t.prompt


def test_difficulty_and_kind_filters_and_errors():
    hard = generate_code_tasks(10, seed=3, difficulties=[5])
    assert {t.difficulty for t in hard} == {5} and {t.kind for t in hard} <= set(KINDS)
    assert {t.kind for t in generate_code_tasks(5, seed=0, kinds=["gcd_lcm"])} == {"gcd_lcm"}
    with pytest.raises(DataConfigError, match="could not draw 100 distinct"):
        generate_code_tasks(100, seed=0, kinds=["fizzbuzz"])  # 4 x 21 prompts
    with pytest.raises(DataConfigError, match="difficulties"):
        generate_code_tasks(3, seed=0, difficulties=[6])
    with pytest.raises(DataConfigError, match="kinds"):
        generate_code_tasks(3, seed=0, kinds=["nope"])
    with pytest.raises(DataConfigError, match="gives no tasks"):
        generate_code_tasks(3, seed=0, kinds=["balanced"], difficulties=[1])
    with pytest.raises(DataConfigError, match="code_tasks.n"):
        generate_code_tasks(-1, seed=0)


def test_every_reference_solution_passes_in_the_sandbox(tasks):
    every_kind = generate_code_tasks(sum(1 for _ in KINDS), seed=5)  # more coverage
    for t in tasks + every_kind:
        assert verify_code(t, _fenced(t.solution)) == (1.0, "all tests passed"), t


def test_tests_discriminate_between_levels_of_logic(tasks):
    # A solution that ignores the inputs fails every generated task: the tests have teeth.
    for t in tasks[:12]:
        reward, reason = verify_code(t, _fenced("def solve(*args):\n    return None\n"))
        assert reward == 0.0 and reason.startswith("test failed"), (t, reason)


@pytest.mark.parametrize("code, expected", [
    ("def solve(xs:\n", "syntax error"),
    ("def other(xs):\n    return 0\n", "no function named 'solve'"),
    ("import sys\nsys.exit(0)\n", "error while defining the solution: SystemExit"),
    ("import os\nos._exit(0)\n", "no verdict"),
    (("class Yes:\n    def __eq__(self, other):\n        return True\n"
      "def solve(*args):\n    return Yes()\n"), "only plain built-in values"),
    ("open('tests.py', 'w').write('')\ndef solve(*args):\n    return 0\n", "test failed"),
    ("import builtins\nbuiltins.AssertionError = None\ndef solve(*args):\n    return 0\n",
     "test failed"),
    ("def solve(*args):\n    while True:\n        pass\n", "timed out"),
    ("def solve(*args):\n    import socket\n    socket.create_connection(('1.1.1.1', 80))\n",
     "blocked operation"),
    ("def solve(*args):\n    return bytearray(10 ** 10)\n", "memory limit"),
    ("print('I passed')\n", "no function named"),
])
def test_wrong_or_hostile_solutions_score_zero(tasks, code, expected):
    from data_pipelines.code_sandbox import SandboxLimits
    limits = SandboxLimits(time_s=1.0, cpu_s=5)
    reward, reason = verify_code(tasks[0], _fenced(code), limits)
    assert reward == 0.0 and expected in reason, reason


def test_verify_code_never_raises():
    task = generate_code_tasks(1, seed=0)[0]
    assert verify_code(task, None) == (0.0, "response is a NoneType, not a string")
    assert verify_code(task, "no code here")[0] == 0.0
    broken = CodeTask("x", "file", None, "p", "solve", "assert solve(1) ==\n")
    reward, reason = verify_code(broken, _fenced("def solve(x):\n    return x\n"))
    assert reward == 0.0 and "tests do not compile" in reason


@pytest.mark.parametrize("response, code, how", [
    ("```python\na = 1\n```", "a = 1\n", "python block"),
    ("text\n```py\nb = 2\n```\nmore", "b = 2\n", "python block"),
    ("```python\nfirst = 1\n```\nthen\n```python\nlast = 2\n```", "last = 2\n", "python block"),
    ("```python\np = 1\n```\n```\nplain = 1\n```", "p = 1\n", "python block"),
    ("```\nplain = 1\n```", "plain = 1\n", "plain block"),
    ("```python\nok = 1\n```\n```python\ntruncated = ", "ok = 1\n", "python block"),
])
def test_extract_code_finds_the_last_python_block(response, code, how):
    assert extract_code(response) == (code, how)


@pytest.mark.parametrize("response, reason", [
    ("def solve(): pass", "no ```python code block"),
    ("```bash\nrm -rf /\n```", "no ```python code block"),
    ("```python\ndef solve(", "unclosed code fence"),
    ("```python\n   \n```", "empty python block"),
    ("`" * 300_000, "characters long"),
    (42, "not a string"),
])
def test_extract_code_reasons(response, reason):
    code, why = extract_code(response)
    assert code is None and reason in why


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"prompt": "Write add(a, b).", "tests": "assert add(1, 2) == 3\n", "entry_point": "add"}


def test_load_code_tasks_and_verify(tmp_path):
    path = _write(tmp_path / "set.jsonl", [
        {**GOOD, "id": "a1", "difficulty": 2}, "",
        {"prompt": "Write neg(x).", "entry_point": "neg",
         "tests": "def check(candidate):\n    assert candidate(3) == -3\n"}])
    loaded = load_code_tasks(path)
    assert [t.id for t in loaded] == ["a1", loaded[1].id] and loaded[1].id.startswith("file-")
    assert loaded[0].difficulty == 2 and loaded[1].difficulty is None
    assert load_code_tasks(path, limit=1) == loaded[:1]
    assert verify_code(loaded[0], _fenced("def add(a, b):\n    return a + b\n"))[0] == 1.0
    assert verify_code(loaded[0], _fenced("def add(a, b):\n    return a - b\n"))[0] == 0.0
    # HumanEval style: check(candidate) is called by the driver.
    assert verify_code(loaded[1], _fenced("def neg(x):\n    return -x\n"))[0] == 1.0
    assert verify_code(loaded[1], _fenced("def neg(x):\n    return x\n"))[0] == 0.0


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"prompt": "p", "entry_point": "f"}), "'tests' must be a non-empty string"),
    (json.dumps({**GOOD, "entry_point": "not valid"}), "not a Python identifier"),
    (json.dumps({**GOOD, "difficulty": 9}), "'difficulty' must be one of"),
    (json.dumps({**GOOD, "id": [1]}), "'id' must be a string"),
    (json.dumps({**GOOD, "id": "a1"}), "duplicate id 'a1' \\(first on line 1\\)"),
])
def test_load_code_tasks_errors_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", [{**GOOD, "id": "a1"}, line])
    with pytest.raises(DataConfigError, match=message) as info:
        load_code_tasks(path)
    assert f"{path} line 2" in str(info.value)


def test_load_code_tasks_missing_file(tmp_path):
    with pytest.raises(DataConfigError, match="no file at"):
        load_code_tasks(tmp_path / "missing.jsonl")
