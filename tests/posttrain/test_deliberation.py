"""Multi-round deliberation: judges, battles, win rates, targeted data selection, round records."""

import json
import math

import pytest

from data_pipelines.verifiable_tasks import generate_tasks, verify
from megatron_ext.errors import ConfigError
from posttrain.deliberation import (
    Battle,
    DeliberationRound,
    JudgePanel,
    RewardModelJudge,
    RuleJudge,
    VerifierJudge,
    WinRateTable,
    category_quotas,
    deliberation_round,
    run_battles,
    select_training_data,
    weakest_categories,
    win_rate_table,
)

KINDS = ["arithmetic", "algebra", "sorting"]


@pytest.fixture(scope="module")
def tasks():
    return generate_tasks(KINDS, 30, seed=1)  # 10 per kind, mixed difficulties


def _answers(tasks):
    cand = [t.solution for t in tasks]
    refs = {"ref_a": ["A: " + t.solution for t in tasks], "ref_b": ["B: " + t.solution for t in tasks]}
    return cand, refs


def always(pref):
    return JudgePanel([lambda item, a, b: {"pref": pref}])


@pytest.mark.parametrize("pref, side", [(1.0, "candidate"), (-1.0, "reference")])
def test_one_sided_judge(tasks, pref, side):
    cand, refs = _answers(tasks)
    battles = run_battles(tasks, cand, refs, always(pref))
    assert len(battles) == 2 * len(tasks)
    assert [(b.item_id, b.reference) for b in battles[:2]] == [(tasks[0].id, "ref_a"), (tasks[0].id, "ref_b")]
    assert {b.winner for b in battles} == {side}
    table = win_rate_table(battles)
    expected = 1.0 if side == "candidate" else 0.0
    assert table.overall.win_rate == expected and table.overall.n == 60
    assert {c: r.win_rate for c, r in table.categories.items()} == {k: expected for k in KINDS}
    assert all(r.n == 20 for r in table.categories.values())
    data = select_training_data(battles, table, tasks, budget=1000, seed=0)
    if side == "candidate":
        # Both battles of an item give the same candidate answer: counted once.
        assert {r.source for r in data} == {"candidate"} and len(data) == len(tasks)
        assert all(r.answer == t.solution for r in data for t in tasks if t.id == r.item_id)
    else:
        assert {r.source for r in data} == {"ref_a", "ref_b"} and len(data) == 2 * len(tasks)
        assert all(r.answer.startswith(r.source[-1].upper() + ": ") for r in data)


def test_ties_count_half_and_take_the_candidate_answer(tasks):
    cand, refs = _answers(tasks)
    battles = run_battles(tasks, cand, {"ref_a": refs["ref_a"]}, always(0.0))
    table = win_rate_table(battles)
    assert table.overall.ties == 30 and table.overall.win_rate == 0.5
    assert {r.source for r in select_training_data(battles, table, tasks, budget=5, seed=0)} == {"candidate"}


def test_accept_filter_drops_best_answers_that_fail_it(tasks):
    """Ties between two wrong answers (or a win on format alone) must not become training data."""
    wrong = [t.solution.replace(t.answer, t.answer + "1") for t in tasks]
    right = {"ref_a": [t.solution for t in tasks]}
    battles = run_battles(tasks, wrong, right, always(0.0))  # a judge blind to correctness: all ties
    table = win_rate_table(battles)
    unfiltered = select_training_data(battles, table, tasks, budget=100, seed=0)
    assert {r.source for r in unfiltered} == {"candidate"}  # ties take the candidate's (wrong) answer
    accept = lambda item, answer: verify(item, answer)[0] == 1.0
    assert select_training_data(battles, table, tasks, budget=100, seed=0, accept=accept) == []
    battles = run_battles(tasks, wrong, right, always(-1.0))  # the reference wins: its answers are right
    kept = select_training_data(battles, win_rate_table(battles), tasks, budget=100, seed=0, accept=accept)
    assert len(kept) == len(tasks) and {r.source for r in kept} == {"ref_a"}


def _kind_judge(loses_in):
    """Prefers the reference on items of the kinds in `loses_in` (with their own win share)."""
    def judge(item, a, b):
        share = loses_in.get(item.kind, 0.0)
        # lose on the first `share` fraction of items by id hash, win on the others
        return {"pref": -1.0 if (int(item.id.split("-")[1][:8], 16) / 16**8) < share else 1.0}
    return JudgePanel([judge])


def test_weak_categories_get_more_budget_and_losses_first(tasks):
    cand, refs = _answers(tasks)
    battles = run_battles(tasks, cand, {"ref_a": refs["ref_a"]}, _kind_judge({"algebra": 1.0}))
    table = win_rate_table(battles)
    assert table.categories["algebra"].win_rate == 0.0
    assert weakest_categories(table, k=1) == ["algebra"]
    data = select_training_data(battles, table, tasks, budget=12, weak_share=0.5, seed=0)
    counts = {k: sum(r.category == k for r in data) for k in KINDS}
    # shares: 0.5/3 each + 0.5 * (1, 0, 0) -> 2/3, 1/6, 1/6 of 12
    assert counts == {"algebra": 8, "arithmetic": 2, "sorting": 2}
    assert all(r.source == "ref_a" for r in data if r.category == "algebra")

    # Mixed record in one category: its losses are taken before its wins.
    battles = run_battles(tasks, cand, {"ref_a": refs["ref_a"]}, _kind_judge({"sorting": 0.5}))
    table = win_rate_table(battles)
    n_lost = table.categories["sorting"].losses
    assert 0 < n_lost < 10
    data = select_training_data(battles, table, tasks, budget=3 * n_lost, weak_share=1.0, seed=0)
    sorting = [r for r in data if r.category == "sorting"]
    assert len(sorting) == min(10, 3 * n_lost) and len(data) == 3 * n_lost
    assert sum(r.winner == "reference" for r in sorting) == n_lost


def test_category_quotas():
    table = WinRateTable.from_dict({
        "overall": {"wins": 0, "losses": 0, "ties": 0},
        "by_reference": {},
        "categories": {"a": {"wins": 2, "losses": 8, "ties": 0}, "b": {"wins": 4, "losses": 4, "ties": 2},
                       "c": {"wins": 8, "losses": 2, "ties": 0}}})
    assert [table.categories[c].win_rate for c in "abc"] == [0.2, 0.5, 0.8]
    q = category_quotas(table, 100, 0.6, {"a": 100, "b": 100, "c": 100})
    ideal = {"a": 100 * (0.4 / 3 + 0.6 * 0.8 / 1.5), "b": 100 * (0.4 / 3 + 0.6 * 0.5 / 1.5),
             "c": 100 * (0.4 / 3 + 0.6 * 0.2 / 1.5)}
    assert sum(q.values()) == 100 and q["a"] > q["b"] > q["c"]
    assert all(abs(q[c] - ideal[c]) < 1 for c in "abc")
    assert category_quotas(table, 90, 0.0, {"a": 100, "b": 100, "c": 100}) == {"a": 30, "b": 30, "c": 30}
    # A capped category's surplus goes to the others; never more than is available.
    q = category_quotas(table, 50, 0.6, {"a": 3, "b": 100, "c": 100})
    assert q["a"] == 3 and sum(q.values()) == 50 and q["b"] > q["c"]
    assert category_quotas(table, 500, 0.6, {"a": 3, "b": 4, "c": 0}) == {"a": 3, "b": 4, "c": 0}


def test_curriculum_order_and_determinism(tasks):
    cand, refs = _answers(tasks)
    battles = run_battles(tasks, cand, refs, _kind_judge({"algebra": 0.7, "sorting": 0.3}))
    table = win_rate_table(battles)
    a = select_training_data(battles, table, tasks, budget=25, seed=7)
    b = select_training_data(battles, table, tasks, budget=25, seed=7)
    assert a == b and len(a) == 25
    diffs = [r.difficulty for r in a]
    assert diffs == sorted(diffs) and len(set(diffs)) > 1
    prompts = {t.id: t.prompt for t in tasks}
    assert all(r.prompt == prompts[r.item_id] for r in a)


def test_judges_and_panel_hand_values(tasks):
    task = tasks[0]
    good = f"Short. \\boxed{{{task.answer}}}"
    bad = "x" * 50 + " answer: wrong"
    assert VerifierJudge(verify)(task, good, bad) == {"correctness": 1.0}
    assert VerifierJudge(verify)(task, bad, good) == {"correctness": -1.0}
    assert VerifierJudge(verify)(task, good, good) == {"correctness": 0.0}
    rules = RuleJudge(max_chars=40)
    assert rules(task, good, bad) == {"format": 1.0, "length": 1.0}
    assert RuleJudge(max_chars=40, require_boxed=False)(task, good, bad) == {"format": 0.0, "length": 1.0}
    rm = RewardModelJudge(lambda item, ans: -len(ans) / 10, name="rm", temperature=2.0)
    expected_rm = math.tanh((len(bad) - len(good)) / 10 / 2.0)
    assert rm(task, good, bad) == {"rm": pytest.approx(expected_rm)}

    panel = JudgePanel([VerifierJudge(verify), rules, rm], weights={"correctness": 3.0, "length": 0.0})
    scores, overall = panel(task, good, bad)
    assert scores == {"correctness": 1.0, "format": 1.0, "length": 1.0, "rm": pytest.approx(expected_rm)}
    # weights: correctness 3, format 1 (unlisted), length 0, rm 1
    assert overall == pytest.approx((3.0 + 1.0 + expected_rm) / 5.0)

    battles = run_battles([task], [good], {"ref": [bad]}, panel)
    assert battles[0].winner == "candidate" and battles[0].scores == scores


def test_panel_position_swap_and_errors(tasks):
    first = lambda item, a, b: {"pos": 1.0}
    assert JudgePanel([first])(tasks[0], "x", "y") == ({"pos": 1.0}, 1.0)
    assert JudgePanel([first], swap_positions=True)(tasks[0], "x", "y") == ({"pos": 0.0}, 0.0)
    with pytest.raises(ConfigError, match="dimension 'pos'"):
        JudgePanel([first, first])(tasks[0], "x", "y")
    with pytest.raises(ConfigError, match="weights"):
        JudgePanel([first], weights={"pos": -1.0})
    with pytest.raises(ConfigError, match="candidate_answers"):
        run_battles(tasks, ["x"], {"ref": ["y"] * len(tasks)}, JudgePanel([first]))
    with pytest.raises(ConfigError, match="weak_share"):
        select_training_data([], WinRateTable(), tasks, budget=3, weak_share=1.5)


def test_round_written_and_read_back(tasks, tmp_path):
    cand, refs = _answers(tasks)
    cand_by_id = {t.id: a for t, a in zip(tasks, cand)}  # a mapping works as well as a list
    rnd = deliberation_round(2, tasks, cand_by_id, refs, _kind_judge({"algebra": 1.0}), budget=10,
                             seed=5)
    folder = rnd.write(tmp_path / "round_02")
    lines = (folder / "battles.jsonl").read_text().splitlines()
    assert len(lines) == 60 and json.loads(lines[0])["item_id"] == tasks[0].id
    table = json.loads((folder / "win_rates.json").read_text())
    assert table["round"] == 2 and table["categories"]["algebra"]["win_rate"] == 0.0
    assert table["categories"]["sorting"] == {"wins": 20, "losses": 0, "ties": 0, "n": 20, "win_rate": 1.0}
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["weakest_categories"][0] == "algebra" and summary["n_selected"] == 10

    back = DeliberationRound.read(folder)
    assert back.round_index == 2 and back.battles == rnd.battles and back.selected == rnd.selected
    assert back.table.to_dict() == rnd.table.to_dict()
    assert all(isinstance(b, Battle) for b in back.battles)
    with pytest.raises(ConfigError, match="missing"):
        DeliberationRound.read(tmp_path / "nowhere")
