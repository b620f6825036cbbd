import json

import pytest

from data_pipelines import eval_sets
from data_pipelines.errors import DataConfigError
from data_pipelines.eval_sets import (
    ANSWER_BACKEND,
    DEFAULT_EVAL_DIR,
    EVAL_DIR_ENV,
    EVAL_SETS,
    answers_equivalent,
    load_eval_set,
    normalise_latex,
)

EXPECTED_COUNTS = {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "olympiadbench": 675}
needs_shared = pytest.mark.skipif(not DEFAULT_EVAL_DIR.is_dir(),
                                  reason=f"shared eval data not at {DEFAULT_EVAL_DIR}")


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(EVAL_DIR_ENV, raising=False)


@needs_shared
@pytest.mark.parametrize("name", EVAL_SETS)
def test_shared_sets_load_with_expected_counts(name):
    items = load_eval_set(name)
    assert len(items) == EXPECTED_COUNTS[name]
    assert len({i.id for i in items}) == len(items)
    for item in items:
        assert item.problem.strip() and item.answer and isinstance(item.answer, str)
        assert item.id.startswith(name + "-")
    assert load_eval_set(name, limit=3) == items[:3]


@needs_shared
def test_math500_keeps_metadata():
    item = load_eval_set("math500", limit=1)[0]
    assert {"solution", "subject", "level"} <= set(item.meta)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_dir_from_argument_and_env(tmp_path, monkeypatch):
    _write(tmp_path / "tiny.jsonl", [{"problem": "1+1?", "answer": 2}, "",
                                     {"problem": "2+2?", "answer": "4", "id": "b"}])
    items = load_eval_set("tiny", eval_dir=tmp_path)
    assert [(i.id, i.answer) for i in items] == [("tiny-1", "2"), ("tiny-b", "4")]
    monkeypatch.setenv(EVAL_DIR_ENV, str(tmp_path))
    assert load_eval_set("tiny") == items


@pytest.mark.parametrize("bad_line,match", [
    ("{not json", "line 2: not valid JSON"),
    ('["a list"]', "line 2: expected a JSON object"),
    ('{"problem": "p"}', "line 2: missing field"),
    ('{"problem": "", "answer": "1"}', "line 2: 'problem' must be"),
    ('{"problem": "p", "answer": "1", "id": 1}', "line 2: duplicate id"),
])
def test_malformed_line_names_set_path_and_line(tmp_path, bad_line, match):
    (tmp_path / "broken.jsonl").write_text('{"problem": "p", "answer": "1", "id": 1}\n'
                                           + bad_line + "\n")
    with pytest.raises(DataConfigError, match=match) as info:
        load_eval_set("broken", eval_dir=tmp_path)
    assert "'broken'" in str(info.value) and str(tmp_path / "broken.jsonl") in str(info.value)


def test_missing_set_lists_available(tmp_path):
    _write(tmp_path / "aime24.jsonl", [{"problem": "p", "answer": "1"}])
    with pytest.raises(DataConfigError, match=r"'aime25'.*\['aime24'\]"):
        load_eval_set("aime25", eval_dir=tmp_path)
    with pytest.raises(DataConfigError, match="folder missing"):
        load_eval_set("aime25", eval_dir=tmp_path / "nope")
    with pytest.raises(DataConfigError, match="not a set name"):
        load_eval_set("../secrets", eval_dir=tmp_path)


@pytest.mark.parametrize("a,b", [
    ("\\frac{1}{2}", "0.5"), ("\\dfrac{1}{2}", "\\frac12"), ("204", " 204 "), ("204", "204.0"),
    ("1,000", "1000"), ("\\text{Evelyn}", "Evelyn"), ("x = 5", "5"), ("90^\\circ", "90"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"), ("p - q", "p-q"),
])
def test_equivalent(a, b):
    assert answers_equivalent(a, b) and answers_equivalent(b, a)


@pytest.mark.parametrize("a,b", [("1", "2"), ("\\frac{1}{2}", "\\frac{1}{3}"),
                                 ("Evelyn", "Bob"), ("", "1")])
def test_not_equivalent(a, b):
    assert not answers_equivalent(a, b)


def test_equivalent_never_raises():
    for a, b in [("{" * 10000, "1"), ("\\frac{1}{0}", "1"), (None, "1"), ("\\frac{", "}")]:
        assert answers_equivalent(a, b) in (True, False)


@pytest.mark.skipif(ANSWER_BACKEND != "math_verify",
                    reason="math_verify not installed: symbolic equivalence (sqrt, pi) is "
                           "checked only with it; the normalised-string fallback is tested above")
def test_symbolic_equivalence_with_math_verify():
    assert answers_equivalent("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")
    assert answers_equivalent("2\\pi", "\\pi \\cdot 2")


def test_fallback_backend_when_math_verify_missing(monkeypatch):
    monkeypatch.setattr(eval_sets, "_math_verify", None)
    assert answers_equivalent("\\frac{1}{2}", "0.5")
    assert not answers_equivalent("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")
    assert normalise_latex("\\$1,234.50") == "2469/2"
