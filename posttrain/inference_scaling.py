"""LaSeR's inference-time scaling metrics (arXiv 2510.14943), model-agnostic.

Given K sampled responses per prompt, each reduced to its extracted final answer, the verifier's
verdict, LaSeR's self-reward score ``r_s`` and whether it finished, :func:`aggregate` reports:

- ``pass_at_1``: mean over prompts of the share of its samples that are correct;
- ``pass_at_k``: share of prompts with at least one correct sample;
- ``majority`` (maj@K): plain majority voting over the extracted answers;
- ``weighted_majority``: the same vote with each sample weighted by its self-reward score
  (the paper's use of ``r_s`` for inference-time scaling);
- ``best_of_k``: the answer of the single highest-scoring sample;
- ``acc_correct`` / ``acc_incorrect`` / ``f1`` / ``auroc``: self-verification (``r_s > threshold``
  predicts "correct"; AUROC over every threshold) over every finished sample, from
  :func:`posttrain.laser.self_verification_metrics`.

Choices, all deterministic:

- answers are grouped greedily in sample order: an answer joins the first group whose
  *representative* (its first answer) is ``equivalent`` to it, else starts a new group; so a
  non-transitive equivalence (e.g. a symbolic checker) cannot chain groups together;
- a voted answer is correct iff its representative sample is correct (the verifier judged that
  sample; equivalent answers are meant to share a verdict);
- a ``None`` answer never votes and never wins; a prompt with no answer that can win counts wrong;
- ties go to the group whose representative comes first (the earliest sample);
- plain majority counts every sample with an answer, finished or not; weighted majority, best-of-K
  and self-verification use finished samples only, since only a finished response has an eos for
  ``z_c`` to follow and so only it has a score;
- the vote weight is ``clamp(r_s, 0, 1)``: the score's intended range (it is trained towards the
  {0, 1} verifier reward), the same clamp LaSeR applies before using the score as an advantage, so a
  negative score cannot cancel other votes and one wild score cannot outvote the rest. When every
  finished group weighs 0 the tie rule picks the earliest finished answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from posttrain.laser import self_verification_metrics


@dataclass(frozen=True)
class Sample:
    """One sampled response: its extracted final answer (None if none was found), the verifier's
    verdict, LaSeR's self-reward score ``r_s`` and whether it finished (was not truncated)."""

    answer: str | None
    correct: bool
    score: float
    finished: bool = True


@dataclass(frozen=True)
class PromptSamples:
    """The K samples drawn for one prompt, in sampling order (the order breaks ties)."""

    prompt_id: str
    samples: list[Sample]


Equivalence = Callable[[str, str], bool]


def exact_match(a: str, b: str) -> bool:
    """The default equivalence: equal strings once surrounding whitespace is stripped."""
    return a.strip() == b.strip()


def _groups(samples: Sequence[Sample], equivalent: Equivalence) -> list[list[Sample]]:
    """Samples with an answer, grouped greedily against each group's first (representative) sample."""
    groups: list[list[Sample]] = []
    for sample in samples:
        if sample.answer is None:
            continue
        for group in groups:
            if equivalent(group[0].answer, sample.answer):
                group.append(sample)
                break
        else:
            groups.append([sample])
    return groups


def _vote(samples: Sequence[Sample], equivalent: Equivalence, weight: Callable[[Sample], float]) -> bool:
    """Whether the winning group's answer is correct; groups are in first-appearance order, and
    ``max`` keeps the first of equal totals, which is the earliest-sample tie rule."""
    groups = _groups(samples, equivalent)
    if not groups:
        return False
    winner = max(groups, key=lambda group: sum(weight(s) for s in group))
    return winner[0].correct


def _best_of_k(samples: Sequence[Sample]) -> bool:
    """Whether the highest-scoring finished sample is correct (ties: the earliest; none: wrong)."""
    finished = [s for s in samples if s.finished]
    if not finished:
        return False
    return max(finished, key=lambda s: s.score).correct


def _validate(prompts: Sequence[PromptSamples]) -> None:
    if not prompts:
        raise ValueError("aggregate: `prompts` is empty; pass at least one PromptSamples")
    for prompt in prompts:
        if not prompt.samples:
            raise ValueError(f"aggregate: prompt {prompt.prompt_id!r} has no samples; drop it or sample it")
        for i, sample in enumerate(prompt.samples):
            if sample.finished and not math.isfinite(sample.score):
                raise ValueError(f"aggregate: prompt {prompt.prompt_id!r} sample {i} is finished but its "
                                 f"score is {sample.score}; a finished sample needs a finite self-reward score")


def aggregate(prompts: Sequence[PromptSamples], *, equivalent: Equivalence | None = None,
              threshold: float = 0.5) -> dict:
    """LaSeR's inference-time scaling metrics over one evaluation set (choices: module docstring).

    ``equivalent(a, b)`` decides whether two extracted answers are the same (default
    :func:`exact_match`; e.g. ``data_pipelines.eval_sets.answers_equivalent`` for math).
    ``threshold`` is the self-verification cut (LaSeR: 0.5). Accuracies are fractions in [0, 1];
    a self-verification value is NaN when its class has no finished sample.
    """
    _validate(prompts)
    equivalent = equivalent or exact_match
    n = len(prompts)

    def mean(values) -> float:
        return sum(values) / n

    def vote_weight(s: Sample) -> float:
        return min(max(s.score, 0.0), 1.0)

    finished = [s for p in prompts for s in p.samples if s.finished]
    verification = self_verification_metrics(
        torch.tensor([s.score for s in finished], dtype=torch.float64),
        torch.tensor([s.correct for s in finished], dtype=torch.bool),
        threshold=threshold,
    )
    return {
        "pass_at_1": mean(sum(s.correct for s in p.samples) / len(p.samples) for p in prompts),
        "pass_at_k": mean(any(s.correct for s in p.samples) for p in prompts),
        "majority": mean(_vote(p.samples, equivalent, lambda s: 1.0) for p in prompts),
        "weighted_majority": mean(
            _vote([s for s in p.samples if s.finished], equivalent, vote_weight) for p in prompts),
        "best_of_k": mean(_best_of_k(p.samples) for p in prompts),
        "acc_correct": verification["acc_correct"],
        "acc_incorrect": verification["acc_incorrect"],
        "f1": verification["f1"],
        "auroc": verification["auroc"],
        "n_finished": len(finished),
        "n_prompts": n,
        "k": max(len(p.samples) for p in prompts),
    }


_COLUMNS = (("pass@1", "pass_at_1"), ("maj@K", "majority"), ("weighted maj@K", "weighted_majority"),
            ("best-of-K", "best_of_k"), ("pass@K", "pass_at_k"), ("self-verify F1", "f1"),
            ("self-verify AUROC", "auroc"))


def _percent(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def format_table(results: Mapping[str, dict]) -> str:
    """A fixed-width text table of :func:`aggregate` results, one row per evaluation set.

    Values are percentages with one decimal ("-" for NaN); the ``K`` and ``prompts`` columns say
    how many samples per prompt and prompts each row is over.
    """
    header = ["set", "prompts", "K"] + [title for title, _ in _COLUMNS]
    rows = [[name, str(r["n_prompts"]), str(r["k"])] + [_percent(r[key]) for _, key in _COLUMNS]
            for name, r in results.items()]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join([first] + rest)

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(row) for row in rows])
