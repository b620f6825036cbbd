"""LaSeR's math (posttrain.laser) against numbers worked out by hand in each test."""

import math

import pytest
import torch

from posttrain.laser import (
    CRefError,
    auroc,
    c_ref_estimate,
    c_ref_problem,
    integrate_advantages,
    self_reward_loss,
    self_reward_score,
    self_reward_weights,
    self_verification_metrics,
)

SQRT3 = math.sqrt(3.0)


def test_score_is_beta_times_logp_minus_c_ref():
    assert self_reward_score(-20.0, -23.0) == pytest.approx(0.3)
    assert self_reward_score(-20.0, -23.0, beta=0.5) == pytest.approx(1.5)
    logp = torch.tensor([-23.0, -18.0, -33.0], requires_grad=True)
    score = self_reward_score(logp, -23.0)
    torch.testing.assert_close(score, torch.tensor([0.0, 0.5, -1.0]))
    score.sum().backward()
    torch.testing.assert_close(logp.grad, torch.full((3,), 0.1))


def test_c_ref_is_mean_over_finished_reference_logprobs():
    logp_ref = torch.tensor([-20.0, -24.0, -100.0])
    assert c_ref_estimate(logp_ref, torch.tensor([True, True, False])) == pytest.approx(-22.0)


def test_c_ref_refuses_too_few_finished_responses():
    logp_ref = torch.tensor([-20.0, -24.0, -100.0])
    with pytest.raises(CRefError, match="0 of 3 responses finished.*max_new_tokens"):
        c_ref_estimate(logp_ref, torch.zeros(3, dtype=torch.bool))
    with pytest.raises(CRefError, match="at least 3"):
        c_ref_estimate(logp_ref, torch.tensor([True, True, False]), min_finished=3)


def test_c_ref_problem_when_a_score_of_one_is_unreachable():
    # score = beta (log p - c_ref) <= -beta c_ref since log p <= 0: 1 is reachable iff c_ref <= -1 / beta
    assert c_ref_problem(-23.0, 0.1) is None and c_ref_problem(-10.0, 0.1) is None
    assert "0.800 < 1" in c_ref_problem(-8.0, 0.1)
    assert c_ref_problem(-8.0, 0.2) is None


def test_loss_class_balanced_weights_one_correct_of_four():
    # N = 4 finished, 1 correct: w_correct = 4 / (2 * 1) = 2, w_incorrect = 4 / (2 * 3) = 2/3.
    # squared errors: 0.25 (correct), 0.04, 0, 0.16 (incorrect)
    # loss = (2 * 0.25 + 2/3 * 0.20) / 4 = 0.6333... / 4 = 0.158333...
    # A fifth, unfinished response with a huge error must not count (nor change N).
    scores = torch.tensor([0.5, 0.2, 0.0, 0.4, 3.0], requires_grad=True)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0])
    finished = torch.tensor([True, True, True, True, False])
    loss = self_reward_loss(scores, rewards, finished)
    assert loss.item() == pytest.approx(0.6333333333 / 4, rel=1e-6)
    loss.backward()
    # d/ds w (s - r)^2 / N = 2 w (s - r) / N: correct 2*2*(-0.5)/4 = -0.5; incorrect 2*(2/3)*s/4 = s/3
    torch.testing.assert_close(scores.grad, torch.tensor([-0.5, 0.2 / 3, 0.0, 0.4 / 3, 0.0]))


def test_loss_one_class_batch_weighs_half_as_the_formula_says():
    # N / (2 N_c) with N_c = N: every response of a one-class batch weighs 0.5 (LaSeR's reference
    # code), so the loss is half the plain MSE; unfinished responses still weigh 0.
    finished = torch.tensor([True, True, False])
    torch.testing.assert_close(self_reward_weights(torch.zeros(3), finished), torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(self_reward_weights(torch.ones(3), finished), torch.tensor([0.5, 0.5, 0.0]))
    scores = torch.tensor([0.5, 0.1, 7.0])
    assert self_reward_loss(scores, torch.zeros(3), finished).item() == pytest.approx(0.5 * 0.13)
    assert self_reward_loss(scores, torch.ones(3), finished).item() == pytest.approx(0.5 * (0.25 + 0.81) / 2)


def test_loss_nothing_finished_is_zero_with_grad_path():
    scores = torch.tensor([0.5, 0.1], requires_grad=True)
    loss = self_reward_loss(scores, torch.ones(2), torch.zeros(2, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    torch.testing.assert_close(scores.grad, torch.zeros(2))


def _advantage_batch():
    # group 7: clamped scores [1, 0, 1, 0]: mean 0.5, sample std sqrt(1/3) -> A_self = +-sqrt(3)/2
    # group 3: clamped [0.95, 1, 0.9, 1]: sample std 0.0479 <= 0.1 -> fall back to A_verifier
    # group 11: finished clamped [1, 0, 0]: mean 1/3, sample std sqrt(1/3) -> A_self = 2/sqrt3, -1/sqrt3;
    #           the unfinished score 5.0 is left out of the statistics and gets A_verifier
    group_ids = torch.tensor([7] * 4 + [3] * 4 + [11] * 4)
    scores = torch.tensor([1.7, -0.3, 1.0, 0.0, 0.95, 1.2, 0.9, 1.05, 1.0, 0.0, 0.0, 5.0])
    finished = torch.tensor([True] * 11 + [False])
    a_v = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.3, -0.2, 0.1, -0.2, 1.2, -0.6, -0.6, 0.7])
    h = SQRT3 / 2
    expected = torch.tensor([
        0.9 + 0.1 * h, -0.9 - 0.1 * h, 0.45 + 0.1 * h, -0.45 - 0.1 * h,
        0.3, -0.2, 0.1, -0.2,
        1.08 + 0.2 / SQRT3, -0.54 - 0.1 / SQRT3, -0.54 - 0.1 / SQRT3, 0.7,
    ])
    return a_v, scores, group_ids, finished, expected


def test_integrate_advantages_hand_values():
    a_v, scores, group_ids, finished, expected = _advantage_batch()
    torch.testing.assert_close(integrate_advantages(a_v, scores, group_ids, finished), expected)


def test_integrate_advantages_is_order_independent():
    a_v, scores, group_ids, finished, expected = _advantage_batch()
    perm = torch.randperm(len(a_v), generator=torch.Generator().manual_seed(0))
    out = integrate_advantages(a_v[perm], scores[perm], group_ids[perm], finished[perm])
    torch.testing.assert_close(out, expected[perm])


def test_integrate_advantages_threshold_and_coef():
    a_v, scores, group_ids, finished, _ = _advantage_batch()
    # a threshold above every group's std: all groups fall back, the result is A_verifier
    torch.testing.assert_close(integrate_advantages(a_v, scores, group_ids, finished, std_threshold=0.9), a_v)
    torch.testing.assert_close(integrate_advantages(a_v, scores, group_ids, finished, coef=0.0), a_v)
    # threshold 0.01 lets group 3 normalise: clamped [0.95, 1, 0.9, 1], mean 0.9625, var 0.006875 / 3
    out = integrate_advantages(a_v, scores, group_ids, finished, std_threshold=0.01)
    std = math.sqrt(0.006875 / 3)
    a_self = torch.tensor([-0.0125, 0.0375, -0.0625, 0.0375]) / std
    torch.testing.assert_close(out[4:8], 0.9 * a_v[4:8] + 0.1 * a_self)


def test_self_verification_metrics():
    # correct: scores .9 .6 .55 .4 -> 3 of 4 above 0.5; incorrect: .7 .1 .5 -> 2 of 3 at or below 0.5
    scores = torch.tensor([0.9, 0.6, 0.55, 0.4, 0.7, 0.1, 0.5])
    correct = torch.tensor([1, 1, 1, 1, 0, 0, 0])
    m = self_verification_metrics(scores, correct)
    assert m["acc_correct"] == pytest.approx(0.75)
    assert m["acc_incorrect"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.75 * (2 / 3) / (0.75 + 2 / 3))
    assert (m["n_correct"], m["n_incorrect"]) == (4, 3)
    empty = self_verification_metrics(torch.tensor([0.9, 0.2]), torch.tensor([1, 1]))
    assert empty["acc_correct"] == 0.5 and math.isnan(empty["acc_incorrect"]) and math.isnan(empty["f1"])
    zero = self_verification_metrics(torch.tensor([0.2, 0.9]), torch.tensor([1, 0]))
    assert zero["f1"] == 0.0


def _auroc_pairs(scores, correct):
    """The definition: the share of (correct, incorrect) pairs ranked right, ties counting 1/2."""
    pos = [s for s, c in zip(scores, correct) if c]
    neg = [s for s, c in zip(scores, correct) if not c]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_definition_with_ties():
    scores = [0.9, 0.3, 0.3, 0.5, 0.1, 0.3, 0.7, 0.5]
    correct = [1, 1, 0, 0, 0, 1, 1, 0]
    assert auroc(torch.tensor(scores), torch.tensor(correct)) == pytest.approx(_auroc_pairs(scores, correct))
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        s = torch.randint(0, 6, (40,), generator=g).double() / 5   # many ties
        c = torch.rand(40, generator=g) < 0.4
        assert auroc(s, c) == pytest.approx(_auroc_pairs(s.tolist(), c.tolist()))
    assert auroc(torch.tensor([0.9, 0.1]), torch.tensor([1, 0])) == 1.0
    assert auroc(torch.tensor([0.1, 0.9]), torch.tensor([1, 0])) == 0.0
    assert math.isnan(auroc(torch.tensor([0.1, 0.9]), torch.tensor([1, 1])))
    assert self_verification_metrics(torch.tensor(scores), torch.tensor(correct))["auroc"] == pytest.approx(
        _auroc_pairs(scores, correct))
