import time

import pytest

from data_pipelines.code_sandbox import SandboxLimits
from data_pipelines.code_tasks import generate_code_tasks
from data_pipelines.errors import DataConfigError
from data_pipelines.eval_sets import EvalItem
from data_pipelines.instruction_prompts import Constraint, InstructionPrompt
from data_pipelines.verifiable_tasks import KINDS, generate_tasks
from data_pipelines.verifiers import Verdict, verify_batch, verify_response

MATH_TASK = generate_tasks(sorted(KINDS), 1, seed=0)[0]
CODE_TASK = generate_code_tasks(1, seed=0)[0]
PROMPT = InstructionPrompt("if-test", "Describe tea. Include the word \"river\". Write only in "
                           "lowercase letters.",
                           (Constraint("include_keyword", "river"), Constraint("all_lowercase")))
EVAL_ITEM = EvalItem("math500-1", "What is 1/2 + 1/4?", "\\frac{3}{4}")


def _code(text: str) -> str:
    return f"```python\n{text}```"


CASES = [  # item, right response, wrong response, expected part of the wrong reason
    (MATH_TASK, MATH_TASK.solution, "\\boxed{not it}", "wrong answer"),
    (CODE_TASK, _code(CODE_TASK.solution), _code("def solve(*a):\n    return 0\n"), "test failed"),
    (PROMPT, "tea by the river is calm", "Tea by the river is calm", "all_lowercase"),
    (EVAL_ITEM, "So the sum is \\boxed{\\dfrac{3}{4}}", "\\boxed{0.7}", "wrong answer"),
]


@pytest.mark.parametrize("item, right, wrong, why", CASES,
                         ids=["task", "code", "instruction", "eval"])
def test_dispatch_right_and_wrong(item, right, wrong, why):
    assert verify_response(item, right).reward == 1.0
    verdict = verify_response(item, wrong)
    assert isinstance(verdict, Verdict) and verdict.reward == 0.0 and why in verdict.reason


def test_instruction_is_all_or_nothing_and_names_the_failures():
    neither = verify_response(PROMPT, "Tea is nice")
    assert neither == Verdict(0.0, "2/2 constraints failed: include_keyword('river'), "
                                      "all_lowercase")
    half = verify_response(PROMPT, "Tea by the river")
    assert half == Verdict(0.0, "1/2 constraints failed: all_lowercase")
    assert verify_response(PROMPT, "tea by the river") == Verdict(1.0, "all 2 constraints met")


def test_eval_item_accepts_equivalent_forms():
    assert verify_response(EVAL_ITEM, "\\boxed{0.75}").reward == 1.0
    assert verify_response(EVAL_ITEM, "the answer: 3/4 but no box").reward == 0.0


HOSTILE = [None, 12, "", "\\boxed{" * 10000, "{" * 100000, "```python\n" * 1000,
           "\\boxed{" + "x" * 10000 + "}", "\x00\udcff" * 100, ["\\boxed{1}"]]


@pytest.mark.parametrize("item", [MATH_TASK, CODE_TASK, PROMPT, EVAL_ITEM],
                         ids=["task", "code", "instruction", "eval"])
def test_hostile_responses_score_zero_with_a_reason(item):
    for response in HOSTILE:
        verdict = verify_response(item, response)
        assert verdict.reward == 0.0 and verdict.reason, (item, response, verdict)


def test_verifier_never_raises(monkeypatch):
    assert verify_response(object(), "x") == Verdict(0.0, "verifier error: no verifier for a "
                                                          "object")

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr("data_pipelines.eval_sets.answers_equivalent", boom)
    assert verify_response(EVAL_ITEM, "\\boxed{1}") == Verdict(
        0.0, "verifier error: RuntimeError: boom")
    monkeypatch.setattr("data_pipelines.verifiers.verify_code", boom)
    assert verify_batch([CODE_TASK], ["x"]) == [Verdict(0.0, "verifier error: RuntimeError: boom")]


def test_verify_batch_keeps_order_and_runs_code_in_parallel():
    code_tasks = generate_code_tasks(6, seed=1)
    items = [MATH_TASK, *code_tasks[:3], PROMPT, *code_tasks[3:], EVAL_ITEM]
    responses = [MATH_TASK.solution] + [_code(t.solution) for t in code_tasks[:3]] + [
        "Tea"] + [_code("def solve(*a):\n    return 0\n")] * 3 + ["\\boxed{3/4}"]
    verdicts = verify_batch(items, responses, max_workers=3)
    assert [v.reward for v in verdicts] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert verdicts == [verify_response(i, r) for i, r in zip(items, responses)]


def test_verify_batch_parallel_timeouts_overlap():
    loop = _code("def solve(*a):\n    while True:\n        pass\n")
    limits = SandboxLimits(time_s=1.0, cpu_s=5)
    start = time.monotonic()
    verdicts = verify_batch([CODE_TASK] * 4, [loop] * 4, max_workers=4, code_limits=limits)
    assert time.monotonic() - start < 3.0  # 4 timeouts of 1 s in parallel, not 4 s in a row
    assert all(v.reward == 0.0 and "timed out" in v.reason for v in verdicts)


def test_verify_batch_config_errors():
    with pytest.raises(DataConfigError, match="2 items but 1 responses"):
        verify_batch([MATH_TASK, PROMPT], ["x"])
    with pytest.raises(DataConfigError, match="max_workers"):
        verify_batch([], [], max_workers=0)
    assert verify_batch([], []) == []
