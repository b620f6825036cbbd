import re
import statistics
import time

import pytest

from data_pipelines.errors import DataConfigError
from data_pipelines.verifiable_tasks import (
    DIFFICULTIES,
    KINDS,
    extract_answer,
    generate_tasks,
    split_tasks,
    verify,
)

ALL_KINDS = sorted(KINDS)


def test_deterministic_per_seed_and_prefix_stable():
    first = generate_tasks(ALL_KINDS, 120, seed=0)
    assert first == generate_tasks(ALL_KINDS, 120, seed=0)
    assert generate_tasks(ALL_KINDS, 30, seed=0) == first[:30]
    other = generate_tasks(ALL_KINDS, 120, seed=1)
    assert len({t.id for t in first} & {t.id for t in other}) < 10
    assert len({t.id for t in first}) == len(first)  # distinct within one call


def test_kinds_balanced_and_fields():
    tasks = generate_tasks(ALL_KINDS, 60, seed=2)
    assert {k: sum(t.kind == k for t in tasks) for k in ALL_KINDS} == {k: 10 for k in ALL_KINDS}
    for t in tasks:
        assert t.difficulty in DIFFICULTIES
        assert t.id.startswith(t.kind + "-")
        assert t.solution.rstrip().endswith(f"\\boxed{{{t.answer}}}.")
        assert len(t.prompt) < 120 and len(t.solution) < 250  # fits a 128-256 token window


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_own_solution_scores_one(kind):
    for t in generate_tasks([kind], 300, seed=3):
        assert verify(t, t.solution) == (1.0, "correct"), t


def test_answers_are_right():
    for t in generate_tasks(["arithmetic"], 100, seed=4):
        assert eval(t.prompt.removeprefix("Compute ").rstrip(".")) == int(t.answer)
    for t in generate_tasks(["algebra"], 100, seed=4):
        equation = re.fullmatch(r"Solve for x: (\d+)x ([-+]) (\d+) = (-?\d+)\.", t.prompt)
        a, sign, b, c = equation.groups()
        assert int(a) * int(t.answer) + int(sign + b) == int(c)
    for t in generate_tasks(["sorting"], 50, seed=4):
        values = [int(v) for v in t.prompt.split(":")[1].rstrip(".").split(",")]
        assert t.answer == ", ".join(map(str, sorted(values)))


def _mean_size(kind, difficulty):
    tasks = generate_tasks([kind], 100, seed=5, difficulties=[difficulty])
    if kind in ("sorting", "comparison"):
        return statistics.mean(len(re.findall(r"-?\d+", t.prompt.split(":")[1])) for t in tasks)
    return statistics.mean(max(abs(int(v)) for v in re.findall(r"-?\d+", t.prompt)) for t in tasks)


@pytest.mark.parametrize("kind", ["arithmetic", "algebra", "sorting", "comparison"])
def test_difficulty_grows_size(kind):
    sizes = [_mean_size(kind, d) for d in DIFFICULTIES]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0], sizes


def test_verify_accepts_formatting_variants():
    [t] = generate_tasks(["sorting"], 1, seed=6)
    squashed = t.answer.replace(" ", "")
    assert verify(t, f"so \\boxed{{ [{squashed}] }}")[0] == 1.0
    assert verify(t, f"work...\nAnswer: {t.answer}\n")[0] == 1.0
    [a] = generate_tasks(["arithmetic"], 1, seed=6)
    assert verify(a, f"$\\boxed{{{a.answer}}}$")[0] == 1.0
    assert verify(a, f"\\boxed{{{a.answer}.0}}")[0] == 1.0
    assert verify(a, f"\\boxed{{{a.answer}}} ... actually \\boxed{{{int(a.answer) + 1}}}")[0] == 0.0


@pytest.mark.parametrize("response,reason", [
    ("", "no \\boxed"), ("I think it is 5", "no \\boxed"), ("\\boxed{5", "unbalanced"),
    ("\\boxed{{{5}", "unbalanced"), ("\\boxed{\\frac{1}{2}}", "wrong answer"),
    ("answer: " + "9" * 5000, "characters long"),
])
def test_verify_rejects(response, reason):
    [t] = generate_tasks(["comparison"], 1, seed=7)
    reward, why = verify(t, response)
    assert reward == 0.0 and reason in why, why


def test_verify_hostile_inputs_fast():
    [t] = generate_tasks(["arithmetic"], 1, seed=8)
    hostile = ["{" * 1_000_000, "\\boxed{" * 100_000, "}" * 1_000_000, "x" * 1_000_000,
               "\n" * 1_000_000, " " * 1_000_000 + "answer", "\\boxed{" + "{" * 1_000_000,
               "\x00\ud800" * 1000, None, 12345]
    start = time.perf_counter()
    for response in hostile:
        reward, why = verify(t, response)
        assert reward == 0.0 and why
    assert time.perf_counter() - start < 2.0
    assert verify(t, "x" * 1_000_000 + f"\\boxed{{{t.answer}}}")[0] == 1.0
    assert extract_answer("\\boxed{a{b}c}") == ("a{b}c", "boxed")


def test_split_disjoint_and_stable():
    tasks = generate_tasks(ALL_KINDS, 1000, seed=9)
    train, held = split_tasks(tasks, 0.2, seed=0)
    assert not {t.id for t in train} & {t.id for t in held}
    assert len(train) + len(held) == len(tasks)
    assert 0.15 < len(held) / len(tasks) < 0.25
    assert split_tasks(tasks, 0.2, seed=0) == (train, held)
    # Decided per task: a subset or a reordering puts each task on the same side.
    train2, held2 = split_tasks(list(reversed(tasks[:500])), 0.2, seed=0)
    assert {t.id for t in held2} == {t.id for t in held if t in tasks[:500]}
    assert split_tasks(tasks, 0.0, seed=0)[1] == [] and split_tasks(tasks, 1.0, seed=0)[0] == []


def test_bad_config():
    with pytest.raises(DataConfigError, match="unknown"):
        generate_tasks(["calculus"], 1, seed=0)
    with pytest.raises(DataConfigError, match="difficulties"):
        generate_tasks(["sorting"], 1, seed=0, difficulties=[6])
    with pytest.raises(DataConfigError, match="held_out_fraction"):
        split_tasks([], 1.5, seed=0)
    with pytest.raises(DataConfigError, match="distinct"):
        generate_tasks(["arithmetic"], 2000, seed=0, difficulties=[1])
