"""The pure-torch math of LaSeR: last-token self-rewarding (arXiv 2510.14943).

LaSeR's observation: the policy's log-probability of a pre-specified token ``z_c`` appended after
the response's first eos, ``log pi_theta(z_c | x, y, eos)``, measured against a constant ``c_ref``
that stands for the reference model's value, can be trained to predict whether the response is
correct. ``z_c`` is a reserved token the model never otherwise emits, so the extra token costs one
position of the forward pass that computes the policy log-probs anyway, and no separate reward model.

- score (LaSeR's self-rewarding score): ``r_s = beta_v * (log pi_theta(z_c | x, y, eos) - c_ref)``,
  ``beta_v = 0.1`` (:func:`self_reward_score`);
- loss: ``L = L_pg + alpha * mean_i w_i * (r_s,i - r_v,i)^2`` with ``alpha = 0.1``, ``r_v`` the
  verifier reward in {0, 1} and class-balanced weights (:func:`self_reward_loss` is the second term
  without ``alpha``);
- advantage integration: ``A = (1 - coef) * A_verifier + coef * A_self``, ``coef = 0.1``, ``A_self``
  the GRPO-style normalisation of the clamped scores within each group (:func:`integrate_advantages`);
- test time: ``r_s > 0.5`` predicts "correct" (:func:`self_verification_metrics`).

Only finished (non-truncated) responses have an eos to put ``z_c`` after, so only they count.
"""

from __future__ import annotations

import torch

from megatron_ext.errors import ConfigError
from posttrain.grpo import group_mean_std


def self_reward_score(logp_zc, c_ref, beta: float = 0.1):
    """LaSeR's self-rewarding score ``r_s = beta_v * (log pi_theta(z_c | x, y, eos) - c_ref)``.

    The form of an implicit reward ``beta * log(pi_theta / pi_ref)`` at the one token ``z_c``, with
    the reference model's log-prob replaced by a pre-computed constant ``c_ref`` (e.g. -23 for
    Qwen2.5-7B; :func:`c_ref_estimate`), which saves a reference forward pass per response. Works on
    tensors (keeps the graph: the MSE loss trains through it) or floats.
    """
    return beta * (logp_zc - c_ref)


def c_ref_estimate(logp_zc_reference: torch.Tensor, finished: torch.Tensor, min_finished: int = 1) -> float:
    """``c_ref``: the mean of ``log pi_ref(z_c | x, y, eos)`` over finished responses.

    How the constant is "estimated once from the reference model": score a batch of the reference
    (starting) policy's own finished responses with ``z_c`` appended and average. Truncated responses
    have no eos for ``z_c`` to follow, so they are left out; fewer than ``min_finished`` finished
    responses is an error (:class:`CRefError`): a constant made up of nothing would be saved and
    inherited by every later stage."""
    mask = finished.bool()
    if int(mask.sum()) < max(1, min_finished):
        raise CRefError(f"LaSeR c_ref: {int(mask.sum())} of {mask.numel()} responses finished (ended with an "
                        f"end of turn), at least {max(1, min_finished)} are needed to estimate c_ref; the rest "
                        f"hit sampling.max_new_tokens. Raise sampling.max_new_tokens, or set laser.c_ref")
    return float(logp_zc_reference.detach().double()[mask].mean())


class CRefError(ConfigError):
    """Too few finished responses to estimate LaSeR's c_ref (the fix is a config change)."""


def c_ref_problem(c_ref: float, beta: float) -> str | None:
    """Why ``c_ref`` cannot work with ``beta``, if it cannot: ``log pi <= 0``, so the largest score is
    ``-beta * c_ref``, and a score of 1 (a correct answer's target) needs ``c_ref <= -1 / beta``."""
    if c_ref > -1.0 / beta:
        return (f"LaSeR c_ref={c_ref:.3f} > -1/beta = {-1.0 / beta:.3f}: the largest reachable self-reward "
                f"is -beta * c_ref = {-beta * c_ref:.3f} < 1, so correct answers can never reach their "
                f"target score; set laser.c_ref <= {-1.0 / beta:.3f} or lower laser.beta")
    return None


def self_reward_weights(verifier_rewards: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
    """LaSeR's class-balancing weights per response: ``N / (2 N_correct)`` for correct ones,
    ``N / (2 N_incorrect)`` for incorrect ones, 0 for unfinished ones (``N`` finished responses,
    correct: ``r_v > 0.5``). They make each class weigh half of the loss whatever the batch's pass
    rate, so the score does not learn the base rate. A batch with one class only takes the formula
    as it stands: ``N / (2 N)`` = 0.5 for every response, as LaSeR's reference code does (that
    batch's loss is half its plain MSE).

    Computed once over a whole step's batch, so micro-batches and data-parallel ranks weigh alike."""
    assert verifier_rewards.shape == finished.shape and finished.dim() == 1
    mask = finished.bool()
    n = int(mask.sum())
    dtype = torch.promote_types(verifier_rewards.dtype, torch.float32)
    correct = verifier_rewards.to(dtype) > 0.5
    n_correct = int((correct & mask).sum())
    n_incorrect = n - n_correct
    w_correct = n / (2 * n_correct) if n_correct else 0.0
    w_incorrect = n / (2 * n_incorrect) if n_incorrect else 0.0
    weights = torch.where(correct, torch.tensor(w_correct, dtype=dtype), torch.tensor(w_incorrect, dtype=dtype))
    return weights * mask.to(dtype)


def self_reward_loss(scores: torch.Tensor, verifier_rewards: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
    """Class-balanced MSE between self-reward scores and verifier rewards (LaSeR's auxiliary loss).

    ``(1 / N) * sum_{i finished} w_i * (r_s,i - r_v,i)^2`` with :func:`self_reward_weights`. When
    nothing is finished the result is ``scores.sum() * 0``: a zero that keeps a grad path, so every
    rank's backward still runs over the same graph. The caller multiplies by ``alpha`` (0.1).
    """
    assert scores.shape == verifier_rewards.shape == finished.shape and scores.dim() == 1
    mask = finished.bool()
    n = int(mask.sum())
    if n == 0:
        return scores.sum() * 0
    dtype = torch.promote_types(scores.dtype, torch.float32)
    weights = self_reward_weights(verifier_rewards, finished).to(scores.device)
    s, r = scores.to(dtype), verifier_rewards.to(dtype)
    return (weights * (s - torch.where(mask, r, s)) ** 2).sum() / n


def integrate_advantages(verifier_adv: torch.Tensor, scores: torch.Tensor, group_ids: torch.Tensor,
                         finished: torch.Tensor, coef: float = 0.1, std_threshold: float = 0.1) -> torch.Tensor:
    """LaSeR's advantage: ``A = (1 - coef) * A_verifier + coef * A_self``, per response.

    ``A_self = (c_i - mean_g(c)) / std_g(c)`` with ``c = clamp(r_s, 0, 1)`` (the score's intended
    range, so one wild score cannot dominate its group). Choices:

    - group statistics over the group's *finished* responses only (a truncated response has no score);
      ``std_g`` is the sample (``n - 1``) std, as in :func:`posttrain.grpo.group_advantages`;
    - no eps: a group is only normalised when ``std_g > std_threshold`` (LaSeR: 0.1), otherwise its
      scores cannot tell its responses apart and ``A_self`` falls back to ``A_verifier`` (the result
      is ``A_verifier``). A group with fewer than two finished responses has std 0 and falls back;
    - unfinished responses get the fallback ``A_self = A_verifier`` (result ``A_verifier``).

    Scores are detached: the advantage is a constant of the policy loss (the scores are trained by
    :func:`self_reward_loss` instead).
    """
    assert verifier_adv.shape == scores.shape == group_ids.shape == finished.shape and scores.dim() == 1
    dtype = torch.promote_types(verifier_adv.dtype, torch.float32)
    a_v = verifier_adv.detach().to(dtype)
    clamped, mean, std, use_self = _self_reward_groups(scores, group_ids, finished, std_threshold, dtype)
    # the clamp only keeps the unselected branch of where() finite for std-0 groups
    a_self = torch.where(use_self, (clamped - mean) / std.clamp(min=1e-30), a_v)
    return (1 - coef) * a_v + coef * a_self


def _self_reward_groups(scores, group_ids, finished, std_threshold: float, dtype):
    """(clamped scores, their group mean and std over finished responses, whether each response's
    group is normalised: finished and ``std > std_threshold``). Unfinished scores may be NaN."""
    assert std_threshold >= 0, std_threshold
    mask = finished.bool()
    clamped = torch.where(mask, scores.detach().to(dtype), torch.zeros((), dtype=dtype)).clamp(0.0, 1.0)
    mean, std, _ = group_mean_std(clamped, group_ids, mask)
    return clamped, mean.to(dtype), std.to(dtype), mask & (std.to(dtype) > std_threshold)


def self_reward_group_share(scores: torch.Tensor, group_ids: torch.Tensor, finished: torch.Tensor,
                            std_threshold: float = 0.1) -> float:
    """The share of groups whose clamped self-rewards spread by more than ``std_threshold``: the groups
    where :func:`integrate_advantages` lets the self-reward into the advantages (elsewhere it falls
    back to the verifier's). Near 0 means LaSeR changes nothing in training."""
    _, _, _, use_self = _self_reward_groups(scores, group_ids, finished, std_threshold, torch.float64)
    groups = torch.unique(group_ids)
    used = torch.unique(group_ids[use_self])
    return len(used) / max(len(groups), 1)


def self_verification_metrics(scores: torch.Tensor, correct: torch.Tensor, threshold: float = 0.5) -> dict:
    """How well the scores verify responses: LaSeR's test-time evaluation.

    A score above ``threshold`` (0.5) predicts "correct". ``acc_correct`` is the share of correct
    responses predicted correct, ``acc_incorrect`` the share of incorrect ones predicted incorrect,
    and ``f1`` their harmonic mean ``2 a b / (a + b)`` (LaSeR's F1: it is low unless the scores
    recognise both classes, unlike plain accuracy on an unbalanced set), ``auroc`` the threshold-free
    :func:`auroc`. An empty class gives NaN for its accuracy, the F1 and the AUROC; F1 is 0 when both
    accuracies are 0. Counts are included.
    """
    assert scores.shape == correct.shape and scores.dim() == 1
    predicted = scores.detach() > threshold
    is_correct = correct.bool()
    n_correct = int(is_correct.sum())
    n_incorrect = int((~is_correct).sum())
    acc_correct = float((predicted & is_correct).sum()) / n_correct if n_correct else float("nan")
    acc_incorrect = float((~predicted & ~is_correct).sum()) / n_incorrect if n_incorrect else float("nan")
    total = acc_correct + acc_incorrect
    f1 = 2 * acc_correct * acc_incorrect / total if total > 0 else (0.0 if total == 0 else float("nan"))
    return {"acc_correct": acc_correct, "acc_incorrect": acc_incorrect, "f1": f1,
            "auroc": auroc(scores, is_correct), "n_correct": n_correct, "n_incorrect": n_incorrect}


def auroc(scores: torch.Tensor, correct: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` separating correct from incorrect responses: the chance
    that a random correct response scores above a random incorrect one, ties counting one half
    (Mann-Whitney U / (N_correct N_incorrect), from the ranks with ties averaged). Unlike F1 at 0.5
    it does not depend on the threshold, so it shows whether the score ranks answers at all even
    while its scale is off. NaN when a class is empty."""
    assert scores.shape == correct.shape and scores.dim() == 1
    is_correct = correct.bool()
    n_pos, n_neg = int(is_correct.sum()), int((~is_correct).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores.detach().double(), return_inverse=True, return_counts=True)
    below = torch.cumsum(counts, 0) - counts                  # responses scoring strictly lower
    ranks = (below + (counts + 1) / 2).double()[inverse]      # 1-based ranks, ties averaged
    u = float(ranks[is_correct].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)
