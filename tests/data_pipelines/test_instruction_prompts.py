import time
from collections import Counter

import pytest

from data_pipelines.errors import DataConfigError
from data_pipelines.instruction_prompts import (
    _INCOMPATIBLE,
    CONSTRAINT_KINDS,
    Constraint,
    InstructionPrompt,
    check_constraint,
    check_constraints,
    generate_instruction_prompts,
)


def test_deterministic_per_seed_and_prefix_stable():
    first = generate_instruction_prompts(100, seed=0)
    assert first == generate_instruction_prompts(100, seed=0)
    assert generate_instruction_prompts(10, seed=0) == first[:10]
    assert first != generate_instruction_prompts(100, seed=1)


def test_prompts_state_compatible_constraints():
    prompts = generate_instruction_prompts(500, seed=2)
    assert Counter(len(p.constraints) for p in prompts).keys() == {1, 2, 3}
    assert {c.kind for p in prompts for c in p.constraints} == set(CONSTRAINT_KINDS)
    for p in prompts:
        kinds = [c.kind for c in p.constraints]
        assert len(kinds) == len(set(kinds))
        assert not any(frozenset({a, b}) in _INCOMPATIBLE for a in kinds for b in kinds)
        for c in p.constraints:
            assert c.describe() in p.prompt  # the model is told every rule it is scored on
        assert len(p.prompt) < 300


def _c(kind, arg=None):
    return Constraint(kind, arg)


@pytest.mark.parametrize("constraint,response,ok", [
    (_c("max_words", 5), "one two three four five", True),
    (_c("max_words", 5), "one two three four five six", False),
    (_c("max_words", 3), "- a\n- b\n- c", True),  # bullet marks are not words
    (_c("min_words", 3), "one two three", True),
    (_c("min_words", 3), "one two", False),
    (_c("include_keyword", "river"), "The River was wide.", True),
    (_c("include_keyword", "river"), "The riverbank was wide.", False),
    (_c("exclude_keyword", "very"), "It was everything.", True),
    (_c("exclude_keyword", "very"), "It was Very good.", False),
    (_c("end_with", "That is all."), "Tea is hot. That is all.  \n", True),
    (_c("end_with", "That is all."), "That is all. Tea is hot.", False),
    (_c("all_lowercase"), "all quiet here.", True),
    (_c("all_lowercase"), "All quiet here.", False),
    (_c("all_lowercase"), "123 !!!", False),  # no letters: not a lowercase answer
    (_c("num_bullets", 2), "Tips:\n- save\n* spend less\n", True),
    (_c("num_bullets", 2), "- one\n- two\n- three", False),
    (_c("num_bullets", 2), "-5 and -6\n-\n", False),
    (_c("json_format"), '{"tip": "save"}', True),
    (_c("json_format"), '```json\n["a", "b"]\n```', True),
    (_c("json_format"), '"just a string"', False),
    (_c("json_format"), "{'single': 'quotes'}", False),
])
def test_checkers_on_hand_written_responses(constraint, response, ok):
    assert check_constraint(constraint, response) is ok


@pytest.mark.parametrize("kind", CONSTRAINT_KINDS)
def test_empty_response_meets_nothing(kind):
    arg = {"max_words": 5, "min_words": 1, "include_keyword": "a", "exclude_keyword": "a",
           "end_with": "x", "num_bullets": 0}.get(kind)
    assert not check_constraint(Constraint(kind, arg), "   \n")


def test_reward_is_fraction_met():
    p = InstructionPrompt("t", "...", (_c("max_words", 10), _c("include_keyword", "tea"),
                                       _c("all_lowercase")))
    assert check_constraints(p, "i like tea") == (1.0, {"max_words(10)": True,
                                                       "include_keyword('tea')": True,
                                                       "all_lowercase": True})
    reward, details = check_constraints(p, "I like coffee")
    assert reward == pytest.approx(1 / 3) and details["max_words(10)"]


def test_never_raises_on_hostile_responses():
    p = InstructionPrompt("t", "...", tuple(
        _c(k, {"max_words": 5, "min_words": 5, "include_keyword": "a", "exclude_keyword": "a",
               "end_with": "x", "num_bullets": 2}.get(k)) for k in CONSTRAINT_KINDS))
    start = time.perf_counter()
    for response in ["[" * 1_000_000, "{" * 100_000 + "}" * 100_000, "- \n" * 300_000,
                     "a " * 500_000, "\ud800\x00", None, b"bytes", 42]:
        reward, details = check_constraints(p, response)
        assert 0.0 <= reward <= 1.0 and len(details) == len(CONSTRAINT_KINDS)
    assert time.perf_counter() - start < 5.0


def test_bad_config():
    with pytest.raises(DataConfigError, match="instruction_prompts.n"):
        generate_instruction_prompts(-1, seed=0)
    with pytest.raises(DataConfigError, match="max_constraints"):
        generate_instruction_prompts(1, seed=0, max_constraints=4)
