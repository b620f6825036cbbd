"""LaSeR's inference-time scaling metrics (posttrain.inference_scaling) against hand-worked numbers."""

import math

import pytest

from data_pipelines.verifiable_tasks import normalise_answer
from posttrain.inference_scaling import PromptSamples, Sample, aggregate, format_table


def numeric_equal(a: str, b: str) -> bool:
    return normalise_answer(a) == normalise_answer(b)


def three_prompts() -> list[PromptSamples]:
    """K = 4. Per prompt, with exact-match grouping:

    p1: "7" wrong twice at low scores vs "5" right once at 0.9, plus a None. Majority picks "7"
        (wrong); weighted 0.3 vs 0.9 picks "5" (right); best-of-K is the 0.9 sample (right).
    p2: "2" and "2.0" right (0.8, 0.7), "3" wrong finished (0.6) and "3" wrong unfinished (0.95).
        Majority: "3" has 2 votes vs 1 + 1, wrong. Weighted over finished only: "2" 0.8 wins
        (with the unfinished sample "3" would weigh 1.55). Best-of-K over finished: 0.8, right
        (the unfinished 0.95 would be wrong).
    p3: every answer None, all wrong, scores 0.9, -0.5, 0.2, 1.5 (all finished): wrong everywhere.
    """
    return [
        PromptSamples("p1", [Sample("7", False, 0.2), Sample("7", False, 0.1),
                             Sample("5", True, 0.9), Sample(None, False, 0.3)]),
        PromptSamples("p2", [Sample("2", True, 0.8), Sample("2.0", True, 0.7),
                             Sample("3", False, 0.6), Sample("3", False, 0.95, finished=False)]),
        PromptSamples("p3", [Sample(None, False, 0.9), Sample(None, False, -0.5),
                             Sample(None, False, 0.2), Sample(None, False, 1.5)]),
    ]


def test_aggregate_hand_computed_exact_match():
    r = aggregate(three_prompts())
    assert r["n_prompts"] == 3 and r["k"] == 4
    assert r["pass_at_1"] == pytest.approx((1 / 4 + 2 / 4 + 0) / 3)  # 0.25
    assert r["pass_at_k"] == pytest.approx(2 / 3)
    assert r["majority"] == pytest.approx(0.0)
    assert r["weighted_majority"] == pytest.approx(2 / 3)
    assert r["best_of_k"] == pytest.approx(2 / 3)
    # 11 finished samples: 3 correct (0.9, 0.8, 0.7: all > 0.5); 8 incorrect
    # (0.2, 0.1, 0.3, 0.6, 0.9, -0.5, 0.2, 1.5: five <= 0.5). The unfinished 0.95 is left out.
    assert r["n_finished"] == 11
    assert r["acc_correct"] == pytest.approx(1.0)
    assert r["acc_incorrect"] == pytest.approx(5 / 8)
    assert r["f1"] == pytest.approx(2 * 1.0 * 0.625 / 1.625)  # 10 / 13


def test_custom_equivalence_merges_numeric_answers_and_tie_goes_to_earliest():
    # p2 under numeric equality: "2" == "2.0" gives 2 votes, tied with "3"'s 2; "2" came first -> right
    r = aggregate(three_prompts(), equivalent=numeric_equal)
    assert r["majority"] == pytest.approx(1 / 3)
    assert r["weighted_majority"] == pytest.approx(2 / 3)  # 1.5 vs 0.6 in p2: unchanged
    assert r["pass_at_1"] == pytest.approx(0.25)  # equivalence does not touch per-sample correctness


def test_threshold_is_the_self_verification_cut():
    r = aggregate(three_prompts(), threshold=0.85)
    # correct 0.9, 0.8, 0.7: one above; incorrect: 0.9 and 1.5 above, six of eight at or below
    assert r["acc_correct"] == pytest.approx(1 / 3)
    assert r["acc_incorrect"] == pytest.approx(6 / 8)


def test_majority_tie_goes_to_earliest_sample():
    wrong_first = [PromptSamples("q", [Sample("a", False, 0.0), Sample("b", True, 0.0)])]
    right_first = [PromptSamples("q", [Sample("b", True, 0.0), Sample("a", False, 0.0)])]
    assert aggregate(wrong_first)["majority"] == 0.0
    assert aggregate(right_first)["majority"] == 1.0


def test_none_answer_never_wins_and_all_none_counts_wrong():
    # two None votes (artificially flagged correct) against one wrong answer: the answer wins
    prompt = PromptSamples("q", [Sample(None, True, 0.9), Sample(None, True, 0.9), Sample("x", False, 0.1)])
    r = aggregate([prompt])
    assert r["majority"] == 0.0 and r["weighted_majority"] == 0.0
    all_none = PromptSamples("q", [Sample(None, True, 0.9), Sample(None, True, 0.8)])
    r = aggregate([all_none])
    assert r["majority"] == 0.0 and r["weighted_majority"] == 0.0
    assert r["pass_at_1"] == 1.0  # per-sample correctness stays the verifier's


def test_weights_are_clamped_to_unit_interval():
    # unclamped: "b" 5.0 beats "a" 0.9 + 0.9; clamped: 1.0 < 1.8
    big = PromptSamples("q", [Sample("a", True, 0.9), Sample("a", True, 0.9), Sample("b", False, 5.0)])
    # unclamped: "a" 0.6 - 0.4 = 0.2 loses to "b" 0.5; clamped: 0.6 > 0.5
    negative = PromptSamples("q", [Sample("a", True, 0.6), Sample("a", True, -0.4), Sample("b", False, 0.5)])
    assert aggregate([big])["weighted_majority"] == 1.0
    assert aggregate([negative])["weighted_majority"] == 1.0
    assert aggregate([big])["majority"] == 1.0  # 2 votes vs 1


def test_weighted_majority_all_zero_weights_picks_earliest_finished_answer():
    prompt = PromptSamples("q", [Sample("a", False, 0.9, finished=False), Sample("b", True, -1.0),
                                 Sample("c", False, 0.0)])
    assert aggregate([prompt])["weighted_majority"] == 1.0


def test_best_of_k_highest_finished_score_ties_earliest():
    tie = PromptSamples("q", [Sample("a", True, 0.7), Sample("b", False, 0.7), Sample("c", False, 0.2)])
    assert aggregate([tie])["best_of_k"] == 1.0
    tie_reversed = PromptSamples("q", [Sample("b", False, 0.7), Sample("a", True, 0.7)])
    assert aggregate([tie_reversed])["best_of_k"] == 0.0
    none_finished = PromptSamples("q", [Sample("a", True, 0.9, finished=False)])
    r = aggregate([none_finished])
    assert r["best_of_k"] == 0.0 and r["weighted_majority"] == 0.0
    assert r["majority"] == 1.0  # plain majority counts unfinished samples that carry an answer
    assert r["n_finished"] == 0 and math.isnan(r["f1"])


def test_k_is_max_samples_and_ragged_prompts_average_per_prompt():
    prompts = [PromptSamples("a", [Sample("1", True, 0.9)]),
               PromptSamples("b", [Sample("1", False, 0.1), Sample("2", False, 0.1), Sample("3", True, 0.9)])]
    r = aggregate(prompts)
    assert r["k"] == 3 and r["n_prompts"] == 2
    assert r["pass_at_1"] == pytest.approx((1 + 1 / 3) / 2)


def test_user_errors_raise_value_error():
    with pytest.raises(ValueError, match="empty"):
        aggregate([])
    with pytest.raises(ValueError, match="no samples"):
        aggregate([PromptSamples("q", [])])
    with pytest.raises(ValueError, match="finite"):
        aggregate([PromptSamples("q", [Sample("a", True, float("nan"))])])
    # an unfinished sample has no score: NaN is fine there
    aggregate([PromptSamples("q", [Sample("a", True, float("nan"), finished=False)])])


def test_sample_is_frozen():
    with pytest.raises(AttributeError):
        Sample("a", True, 0.5).score = 1.0


def test_format_table_rows_and_numbers():
    results = {"math500": aggregate(three_prompts()),
               "aime24": aggregate([PromptSamples("q", [Sample("a", True, 0.9, finished=False)])])}
    table = format_table(results)
    lines = table.splitlines()
    assert len(lines) == 4  # header, rule, two sets
    for title in ("pass@1", "maj@K", "weighted maj@K", "best-of-K", "pass@K", "self-verify F1",
                  "self-verify AUROC"):
        assert title in lines[0]
    math_row = next(line for line in lines if line.startswith("math500"))
    cells = math_row.split()
    # AUROC over the finished samples: correct 0.9, 0.8, 0.7 against 8 incorrect (0.2 0.1 0.3 0.6 0.9
    # -0.5 0.2 1.5): 0.9 wins 6 pairs and ties 1, 0.8 and 0.7 win 6 each: 18.5 / 24
    assert cells == ["math500", "3", "4", "25.0", "0.0", "66.7", "66.7", "66.7", "76.9", "77.1"]
    aime_row = next(line for line in lines if line.startswith("aime24"))
    assert aime_row.split() == ["aime24", "1", "1", "100.0", "100.0", "0.0", "0.0", "100.0", "-", "-"]
    assert len({len(line) for line in lines}) == 1  # fixed width
