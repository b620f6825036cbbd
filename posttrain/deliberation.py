"""Multi-round deliberation learning ("multi-round arena learning", Hunyuan-TurboS, arXiv 2505.15431).

One round: the SFT model (the *candidate*) battles reference models on the same prompts; a panel of
judges scores every battle on several dimensions; the per-category win rates show where the
candidate is weak; targeted SFT data (the better answer of each battle, weighted toward the weak
categories, ordered easy to hard) trains the next candidate. Repeat for several rounds.

Model-agnostic: answers come in as strings, judges are callables
``judge(item, answer_a, answer_b) -> {dimension: preference in [-1, 1]}`` (positive prefers
``answer_a``, which is always the candidate here). Items need ``.id``, ``.prompt``, ``.kind`` (the
category) and ``.difficulty`` (``verifiable_tasks.Task`` has them all).

Choices (the report gives no formulas):
- Win rate = (wins + ties / 2) / battles: a tie is half a win, as in chess and arena scoreboards,
  so a category of all ties reads 50%, neither strong nor weak.
- A battle's best answer is the winner's; on a tie the candidate's own (already judged as good,
  and on-policy, so cheaper to learn than a reference's style).
- Within a category, battles the candidate *lost* are taken first, then ties, then wins: those
  are the weaknesses the round is meant to fix. Seeded shuffling breaks the remaining ties.
- Budget per category: ``(1 - weak_share) / C`` of it split evenly, ``weak_share`` split in
  proportion to the loss rate ``1 - win_rate``; quotas go to integers by largest remainder and a
  category's unused quota moves to the others. A lower win rate therefore never gets less.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from data_pipelines.verifiable_tasks import extract_answer
from megatron_ext.errors import ConfigError

WINNERS = ("candidate", "reference", "tie")
CANDIDATE = "candidate"


class Judge(Protocol):
    """``judge(item, answer_a, answer_b) -> {dimension: preference in [-1, 1]}``; > 0 prefers a."""

    def __call__(self, item: Any, answer_a: str, answer_b: str) -> dict[str, float]: ...


class VerifierJudge:
    """Correctness: ``reward(a) - reward(b)``, i.e. +1 / -1 / 0 for a 0/1 verifier."""

    def __init__(self, verify: Callable[[Any, str], tuple[float, str]], name: str = "correctness"):
        self.verify, self.name = verify, name

    def __call__(self, item, answer_a: str, answer_b: str) -> dict[str, float]:
        return {self.name: float(self.verify(item, answer_a)[0] - self.verify(item, answer_b)[0])}


class RuleJudge:
    """Format and length rules, each a 0/1 compliance per answer; preference = ``c(a) - c(b)``.

    ``format``: non-empty, and (with ``require_boxed``) the final answer is in a ``\\boxed{}``;
    ``length``: at most ``max_chars`` characters.
    """

    def __init__(self, max_chars: int, require_boxed: bool = True):
        if not isinstance(max_chars, int) or max_chars < 1:
            raise ConfigError(f"deliberation.rule_judge.max_chars: must be an integer >= 1, "
                              f"got {max_chars!r}")
        self.max_chars, self.require_boxed = max_chars, require_boxed

    def _format_ok(self, answer: str) -> float:
        if not answer.strip():
            return 0.0
        return float(not self.require_boxed or extract_answer(answer)[1] == "boxed")

    def __call__(self, item, answer_a: str, answer_b: str) -> dict[str, float]:
        return {"format": self._format_ok(answer_a) - self._format_ok(answer_b),
                "length": float(len(answer_a) <= self.max_chars) - float(len(answer_b) <= self.max_chars)}


class RewardModelJudge:
    """A pluggable scalar reward model ``score_fn(item, answer) -> float``:
    preference = ``tanh((score(a) - score(b)) / temperature)`` (the sign of the difference, softened)."""

    def __init__(self, score_fn: Callable[[Any, str], float], name: str = "reward_model",
                 temperature: float = 1.0):
        if not temperature > 0:
            raise ConfigError(f"deliberation.reward_model_judge.temperature: must be > 0, "
                              f"got {temperature!r}")
        self.score_fn, self.name, self.temperature = score_fn, name, temperature

    def __call__(self, item, answer_a: str, answer_b: str) -> dict[str, float]:
        diff = float(self.score_fn(item, answer_a)) - float(self.score_fn(item, answer_b))
        return {self.name: math.tanh(diff / self.temperature)}


class JudgePanel:
    """Several judges; ``overall = sum_d w_d * s_d / sum_d w_d`` over every dimension returned.

    ``weights`` maps dimension names to weights >= 0; a dimension not listed weighs 1. Two judges
    returning the same dimension name is an error (rename one). With ``swap_positions`` every judge
    also sees the answers swapped and ``s_d = (s_d(a, b) - s_d(b, a)) / 2``, which cancels a model
    judge's position bias (twice the judge calls).
    """

    def __init__(self, judges: Sequence[Judge], weights: Mapping[str, float] | None = None,
                 swap_positions: bool = False):
        if not judges:
            raise ConfigError("deliberation.panel.judges: empty; give at least one judge")
        weights = dict(weights or {})
        bad = {k: v for k, v in weights.items() if not (v >= 0 and math.isfinite(v))}
        if bad:
            raise ConfigError(f"deliberation.panel.weights: must be finite and >= 0, got {bad}")
        self.judges, self.weights, self.swap_positions = list(judges), weights, swap_positions

    def _scores(self, item, a: str, b: str) -> dict[str, float]:
        scores: dict[str, float] = {}
        for judge in self.judges:
            for dim, s in judge(item, a, b).items():
                if dim in scores:
                    raise ConfigError(f"deliberation.panel.judges: two judges return dimension "
                                      f"{dim!r}; give one of them another name")
                assert -1.0 <= s <= 1.0, f"judge {judge!r} scored {dim!r} = {s}, outside [-1, 1]"
                scores[dim] = float(s)
        return scores

    def __call__(self, item, answer_a: str, answer_b: str) -> tuple[dict[str, float], float]:
        """(per-dimension scores, overall preference in [-1, 1]); > 0 prefers ``answer_a``."""
        scores = self._scores(item, answer_a, answer_b)
        if self.swap_positions:
            swapped = self._scores(item, answer_b, answer_a)
            scores = {d: (s - swapped.get(d, 0.0)) / 2 for d, s in scores.items()}
        total = sum(self.weights.get(d, 1.0) for d in scores)
        overall = sum(self.weights.get(d, 1.0) * s for d, s in scores.items()) / total if total else 0.0
        return scores, overall


@dataclass(frozen=True)
class Battle:
    item_id: str
    category: str
    difficulty: int
    reference: str  # the reference model's name
    candidate_answer: str
    reference_answer: str
    scores: dict[str, float]  # per dimension, > 0 prefers the candidate
    overall: float
    winner: str  # "candidate" | "reference" | "tie"

    def best(self) -> tuple[str, str]:
        """(answer, source) of the better answer: the winner's, the candidate's on a tie."""
        if self.winner == "reference":
            return self.reference_answer, self.reference
        return self.candidate_answer, CANDIDATE

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Battle:
        return cls(**record)


def _aligned(name: str, answers, items: Sequence[Any]) -> list[str]:
    """Answers per item: a sequence aligned with ``items`` or a mapping item id -> answer."""
    if isinstance(answers, Mapping):
        missing = [it.id for it in items if it.id not in answers]
        if missing:
            raise ConfigError(f"deliberation.{name}: no answer for item ids {missing[:5]}")
        return [answers[it.id] for it in items]
    answers = list(answers)
    if len(answers) != len(items):
        raise ConfigError(f"deliberation.{name}: {len(answers)} answers for {len(items)} items; "
                          f"give one per item, in the items' order")
    return answers


def run_battles(items: Sequence[Any], candidate_answers, reference_answers: Mapping[str, Any],
                panel: JudgePanel, *, tie_margin: float = 0.0) -> list[Battle]:
    """One battle per (item, reference model): the panel compares the candidate's answer (as
    ``answer_a``) with the reference's; ``overall > tie_margin`` is a candidate win,
    ``< -tie_margin`` a reference win, anything else a tie. Ordered by item, then reference."""
    items = list(items)
    if not reference_answers:
        raise ConfigError("deliberation.reference_answers: empty; give at least one reference model")
    if CANDIDATE in reference_answers:
        raise ConfigError(f"deliberation.reference_answers: {CANDIDATE!r} names the candidate; "
                          f"rename that reference model")
    cands = _aligned("candidate_answers", candidate_answers, items)
    refs = {name: _aligned(f"reference_answers[{name!r}]", ans, items)
            for name, ans in reference_answers.items()}
    battles = []
    for i, item in enumerate(items):
        for name, answers in refs.items():
            scores, overall = panel(item, cands[i], answers[i])
            winner = ("candidate" if overall > tie_margin
                      else "reference" if overall < -tie_margin else "tie")
            battles.append(Battle(item.id, item.kind, item.difficulty, name, cands[i], answers[i],
                                  scores, overall, winner))
    return battles


@dataclass
class WinRecord:
    wins: int = 0
    losses: int = 0
    ties: int = 0

    @property
    def n(self) -> int:
        return self.wins + self.losses + self.ties

    @property
    def win_rate(self) -> float:
        """(wins + ties / 2) / battles; 0.5 for no battles (nothing known either way)."""
        return (self.wins + 0.5 * self.ties) / self.n if self.n else 0.5

    def add(self, winner: str) -> None:
        assert winner in WINNERS, winner
        if winner == "candidate":
            self.wins += 1
        elif winner == "reference":
            self.losses += 1
        else:
            self.ties += 1

    def to_dict(self) -> dict[str, Any]:
        return {"wins": self.wins, "losses": self.losses, "ties": self.ties, "n": self.n,
                "win_rate": self.win_rate}


@dataclass
class WinRateTable:
    """The candidate's record per category, per reference model and overall."""

    categories: dict[str, WinRecord] = field(default_factory=dict)
    by_reference: dict[str, WinRecord] = field(default_factory=dict)
    overall: WinRecord = field(default_factory=WinRecord)

    def to_dict(self) -> dict[str, Any]:
        return {"overall": self.overall.to_dict(),
                "categories": {c: r.to_dict() for c, r in sorted(self.categories.items())},
                "by_reference": {c: r.to_dict() for c, r in sorted(self.by_reference.items())}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WinRateTable:
        def rec(x):
            return WinRecord(x["wins"], x["losses"], x["ties"])
        return cls({c: rec(x) for c, x in d["categories"].items()},
                   {c: rec(x) for c, x in d["by_reference"].items()}, rec(d["overall"]))


def win_rate_table(battles: Sequence[Battle]) -> WinRateTable:
    """Wins / losses / ties and win rate (a tie counts half) per category, per reference, overall."""
    table = WinRateTable()
    for b in battles:
        table.categories.setdefault(b.category, WinRecord()).add(b.winner)
        table.by_reference.setdefault(b.reference, WinRecord()).add(b.winner)
        table.overall.add(b.winner)
    return table


def weakest_categories(table: WinRateTable, k: int | None = None,
                       below: float | None = None) -> list[str]:
    """Categories from the lowest win rate up (name breaks ties); the first ``k``, and/or only
    those with a win rate strictly ``below`` a threshold."""
    ranked = sorted(table.categories, key=lambda c: (table.categories[c].win_rate, c))
    if below is not None:
        ranked = [c for c in ranked if table.categories[c].win_rate < below]
    return ranked if k is None else ranked[:k]


def category_quotas(table: WinRateTable, budget: int, weak_share: float,
                    available: Mapping[str, int]) -> dict[str, int]:
    """Examples per category: share_c = (1 - weak_share) / C + weak_share * l_c / sum(l), with
    l_c = 1 - win_rate_c (evenly when every l_c is 0); integers by largest remainder (weaker first
    on equal remainders), capped at ``available[c]``, a capped category's surplus re-split among the
    rest. Sums to ``min(budget, sum(available))``."""
    open_cats = sorted(c for c, n in available.items() if n > 0)
    quotas = {c: 0 for c in available}
    left = min(budget, sum(available.values()))
    while left > 0 and open_cats:
        loss = {c: 1.0 - table.categories[c].win_rate if c in table.categories else 0.5
                for c in open_cats}
        total_loss = sum(loss.values())
        share = {c: (1 - weak_share) / len(open_cats)
                 + weak_share * (loss[c] / total_loss if total_loss else 1 / len(open_cats))
                 for c in open_cats}
        ideal = {c: left * share[c] for c in open_cats}
        give = {c: math.floor(ideal[c]) for c in open_cats}
        order = sorted(open_cats, key=lambda c: (-(ideal[c] - give[c]), -loss[c], c))
        for c in order[: left - sum(give.values())]:
            give[c] += 1
        for c in open_cats:
            give[c] = min(give[c], available[c] - quotas[c])
            quotas[c] += give[c]
        left -= sum(give.values())
        open_cats = [c for c in open_cats if quotas[c] < available[c]]
    return quotas


@dataclass(frozen=True)
class TrainingRecord:
    """One targeted SFT example: the best answer of a battle."""

    item_id: str
    category: str
    difficulty: int
    prompt: str
    answer: str
    source: str  # "candidate" or the reference model's name
    winner: str  # the battle's outcome, from the candidate's side

    def to_conversation(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}]


_PRIORITY = {"reference": 0, "tie": 1, "candidate": 2}  # the candidate's losses first


def select_training_data(battles: Sequence[Battle], table: WinRateTable, items: Sequence[Any], *,
                         budget: int, weak_share: float = 0.5, seed: int = 0,
                         accept: Callable[[Any, str], bool] | None = None) -> list[TrainingRecord]:
    """Targeted SFT data for the next round (module docstring: best answer, quotas, priority).

    ``accept(item, answer)``, when given, must hold for a best answer to become training data: the
    panel only ranks the two answers of a battle, so the better of two wrong answers (a tie, or a
    narrow win on format) would otherwise be trained on. With a verifier it keeps only correct ones.

    Identical (item, answer) pairs count once. The result is ordered by difficulty, easiest first
    (the curriculum), in a seeded shuffled order within a difficulty; same inputs and seed, same
    list.
    """
    if not isinstance(budget, int) or budget < 0:
        raise ConfigError(f"deliberation.budget: must be an integer >= 0, got {budget!r}")
    if not 0.0 <= weak_share <= 1.0:
        raise ConfigError(f"deliberation.weak_share: must be in [0, 1], got {weak_share!r}")
    by_id = {it.id: it for it in items}
    missing = sorted({b.item_id for b in battles} - by_id.keys())
    if missing:
        raise ConfigError(f"deliberation.items: no item for battle ids {missing[:5]}; pass the "
                          f"items the battles were run on")
    pool: dict[tuple[str, str], TrainingRecord] = {}
    for b in battles:
        answer, source = b.best()
        if accept is not None and not accept(by_id[b.item_id], answer):
            continue
        rec = TrainingRecord(b.item_id, b.category, b.difficulty, by_id[b.item_id].prompt,
                             answer, source, b.winner)
        key = (b.item_id, answer)
        if key not in pool or _PRIORITY[rec.winner] < _PRIORITY[pool[key].winner]:
            pool[key] = rec
    rng = random.Random(f"deliberation:{seed}")
    per_cat: dict[str, list[TrainingRecord]] = {}
    for rec in pool.values():
        per_cat.setdefault(rec.category, []).append(rec)
    quotas = category_quotas(table, budget, weak_share, {c: len(r) for c, r in per_cat.items()})
    chosen: list[TrainingRecord] = []
    for cat in sorted(per_cat):
        recs = sorted(per_cat[cat], key=lambda r: (r.item_id, r.source, r.answer))
        rng.shuffle(recs)
        recs.sort(key=lambda r: _PRIORITY[r.winner])
        chosen += recs[: quotas[cat]]
    rng.shuffle(chosen)
    chosen.sort(key=lambda r: r.difficulty)
    return chosen


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class DeliberationRound:
    """One round's battles, win-rate table and selected data, written to / read from a folder:
    ``battles.jsonl``, ``win_rates.json``, ``training_data.jsonl`` and ``summary.json``."""

    round_index: int
    battles: list[Battle]
    table: WinRateTable
    selected: list[TrainingRecord]

    def summary(self, k_weakest: int = 3) -> dict[str, Any]:
        sources: dict[str, int] = {}
        for r in self.selected:
            sources[r.source] = sources.get(r.source, 0) + 1
        return {"round": self.round_index, "n_battles": len(self.battles),
                "win_rate": self.table.overall.win_rate,
                "weakest_categories": weakest_categories(self.table, k_weakest),
                "n_selected": len(self.selected), "selected_by_source": dict(sorted(sources.items()))}

    def write(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / "battles.jsonl",
                      "".join(json.dumps(b.to_record()) + "\n" for b in self.battles))
        _write_atomic(folder / "win_rates.json",
                      json.dumps({"round": self.round_index, **self.table.to_dict()}, indent=2))
        _write_atomic(folder / "training_data.jsonl",
                      "".join(json.dumps(asdict(r)) + "\n" for r in self.selected))
        _write_atomic(folder / "summary.json", json.dumps(self.summary(), indent=2))
        return folder

    @classmethod
    def read(cls, folder: str | os.PathLike) -> DeliberationRound:
        folder = Path(folder)
        for name in ("battles.jsonl", "win_rates.json", "training_data.jsonl"):
            if not (folder / name).is_file():
                raise ConfigError(f"deliberation round folder {folder}: {name} is missing; point to "
                                  f"a folder written by DeliberationRound.write")
        lines = lambda name: [json.loads(x) for x in (folder / name).read_text().splitlines() if x]
        table = json.loads((folder / "win_rates.json").read_text())
        return cls(table["round"], [Battle.from_record(r) for r in lines("battles.jsonl")],
                   WinRateTable.from_dict(table),
                   [TrainingRecord(**r) for r in lines("training_data.jsonl")])


def deliberation_round(round_index: int, items: Sequence[Any], candidate_answers,
                       reference_answers: Mapping[str, Any], panel: JudgePanel, *, budget: int,
                       weak_share: float = 0.5, seed: int = 0, tie_margin: float = 0.0,
                       accept: Callable[[Any, str], bool] | None = None) -> DeliberationRound:
    """Battles, table and selected data of one round (seed offset by the round index)."""
    battles = run_battles(items, candidate_answers, reference_answers, panel, tie_margin=tie_margin)
    table = win_rate_table(battles)
    selected = select_training_data(battles, table, items, budget=budget, weak_share=weak_share,
                                    seed=seed + round_index, accept=accept)
    return DeliberationRound(round_index, battles, table, selected)
