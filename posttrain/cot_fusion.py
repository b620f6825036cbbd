"""Adaptive long-short chain-of-thought fusion (Hunyuan-TurboS, arXiv 2505.15431, post-training).

The report builds SFT data that teaches *when* to think long: a prompt the short-CoT model already
solves keeps a correct short answer; otherwise a long-CoT model continues from the short model's
wrong attempt until it reaches a verified answer, and the concatenation (wrong attempt, a bridge
that opens the reflection, the long continuation) is the long-mode target. RL then adds two reward
terms: a difficulty-adaptive mode reward (long CoT for hard prompts, short for easy ones) and a
compression reward (among correct answers the shorter scores higher).

Everything here is model-agnostic: the generation engine enters as a :class:`Sampler` callable and
correctness as a :class:`Verifier` callable (e.g. ``data_pipelines.verifiable_tasks.verify``), so the
logic is testable with fake samplers and the model-side stage only wires them up.

Choices (the report does not fix them):
- A response is *verified* iff its reward is ``>= accept_reward`` (1.0 by default: exact answers).
- ``pass_rate`` = verified short samples / ``k_short``; a prompt is *easy* iff
  ``pass_rate >= easy_threshold`` (``easy_threshold`` in (0, 1], so an easy prompt always has a
  verified short answer and a hard one always has a failed attempt to continue from).
- Deterministic picks: the easy target is the shortest verified short answer and the attempt a
  hard prompt continues from is the shortest failed one (ties: the earlier sample). Shortest,
  because the compression reward later prefers short answers anyway and a short wrong prefix
  wastes fewer tokens; by length rather than by position, so the pick does not depend on the
  order the engine returns samples in.
- Each long round asks for one continuation of the same attempt per still-unfixed hard prompt
  (one batched call per round), up to ``max_long_attempts`` rounds.
- A hard prompt whose long continuations never verify is *dropped* by default, even when one of
  its short samples was correct: keeping that short answer (either as a "long" target, which would
  teach the long mode to skip the reflection, or as a "short" target on a prompt measured hard,
  which contradicts the routing) blurs what each mode means. ``hard_fallback="short"`` keeps it as
  a short-mode example instead (``fallback=True`` on the example) for when data is scarce.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from megatron_ext.errors import ConfigError

DEFAULT_BRIDGE = "\n\nWait, let me re-check this step by step.\n"
MODES = ("short", "long")


@dataclass(frozen=True)
class SampleRequest:
    """Ask for ``n`` sampled assistant responses to the user ``prompt``.

    ``thinking`` selects the mode token after the assistant role ("short", "long" or None, as in
    ``chat_format``); each response continues ``prefix`` (already part of the assistant turn), and the
    sampler returns the continuation only.
    """

    prompt: str
    n: int
    thinking: str | None
    prefix: str = ""


class Sampler(Protocol):
    """``sample(requests) -> responses``, ``responses[i]`` holding ``requests[i].n`` strings. Batched."""

    def __call__(self, requests: list[SampleRequest]) -> list[list[str]]: ...


class Verifier(Protocol):
    """``verify(item, response) -> (reward in [0, 1], reason)``, e.g. ``verifiable_tasks.verify``."""

    def __call__(self, item: Any, response: str) -> tuple[float, str]: ...


@dataclass(frozen=True)
class FusedExample:
    """One SFT example. ``target`` is the whole assistant text; for a long example it is
    ``short_attempt + bridge + continuation`` and ``short_attempt``/``continuation`` are kept apart."""

    item_id: str
    prompt: str
    mode: Literal["short", "long"]
    target: str
    pass_rate: float
    difficulty_label: Literal["easy", "hard"]
    n_long_attempts: int
    short_attempt: str | None = None
    continuation: str | None = None
    fallback: bool = False


@dataclass(frozen=True)
class DroppedItem:
    item_id: str
    prompt: str
    pass_rate: float
    n_long_attempts: int
    reason: str


@dataclass(frozen=True)
class FusionStats:
    n_items: int
    n_kept: int
    n_dropped: int
    n_easy: int
    n_hard: int
    n_short: int  # kept examples in short mode (easy prompts, plus fallbacks)
    n_long: int  # kept examples in long mode
    n_fallback: int
    mean_pass_rate: float  # over every item, kept or dropped
    n_long_requests: int  # long continuations sampled in total
    n_long_verified: int  # of those, how many made the concatenation verify


@dataclass
class FusionResult:
    examples: list[FusedExample]
    dropped: list[DroppedItem]
    stats: FusionStats

    def summary(self) -> dict[str, Any]:
        """Stats plus the drop reasons, JSON-ready (for a stage's run folder)."""
        return {**asdict(self.stats), "dropped": [asdict(d) for d in self.dropped]}


def _check_config(k_short: int, easy_threshold: float, max_long_attempts: int,
                  accept_reward: float, hard_fallback: str) -> None:
    if not isinstance(k_short, int) or k_short < 1:
        raise ConfigError(f"cot_fusion.k_short: must be an integer >= 1, got {k_short!r}")
    if not 0.0 < easy_threshold <= 1.0:
        raise ConfigError(f"cot_fusion.easy_threshold: must be in (0, 1] (0 would call a prompt "
                          f"with no correct answer easy), got {easy_threshold!r}")
    if not isinstance(max_long_attempts, int) or max_long_attempts < 0:
        raise ConfigError(
            f"cot_fusion.max_long_attempts: must be an integer >= 0, got {max_long_attempts!r}")
    if not 0.0 < accept_reward <= 1.0:
        raise ConfigError(f"cot_fusion.accept_reward: must be in (0, 1], got {accept_reward!r}")
    if hard_fallback not in ("drop", "short"):
        raise ConfigError(
            f"cot_fusion.hard_fallback: must be 'drop' or 'short', got {hard_fallback!r}")


def _sample_checked(sample: Sampler, requests: list[SampleRequest]) -> list[list[str]]:
    if not requests:
        return []
    out = sample(requests)
    assert len(out) == len(requests), f"sampler returned {len(out)} lists for {len(requests)} requests"
    for req, responses in zip(requests, out):
        assert len(responses) == req.n, f"sampler returned {len(responses)} responses, asked {req.n}"
    return [list(r) for r in out]


def _shortest(responses: Sequence[str], indices: Sequence[int]) -> int:
    """Index (into ``responses``) of the shortest among ``indices``; the earlier one on ties."""
    return min(indices, key=lambda i: (len(responses[i]), i))


def build_fused_set(items: Sequence[Any], sample: Sampler, verify: Verifier, *, k_short: int,
                    easy_threshold: float, max_long_attempts: int, bridge: str = DEFAULT_BRIDGE,
                    sample_long: Sampler | None = None, accept_reward: float = 1.0,
                    hard_fallback: Literal["drop", "short"] = "drop") -> FusionResult:
    """Route each item to a short or a long SFT target (see the module docstring for the rules).

    1. One batched call: ``k_short`` short-mode samples per item; ``pass_rate`` = verified fraction.
    2. Easy (``pass_rate >= easy_threshold``): target = shortest verified short answer, mode short.
    3. Hard: prefix = shortest failed attempt + ``bridge``; up to ``max_long_attempts`` rounds, each
       one batched call to ``sample_long`` (default ``sample``) in long mode for the items not yet
       fixed, until ``verify(prefix + continuation)`` accepts; target = that text, mode long.
    4. Hard items never fixed are dropped (or, with ``hard_fallback="short"`` and a verified short
       answer, kept in short mode) and reported with the reason.
    """
    _check_config(k_short, easy_threshold, max_long_attempts, accept_reward, hard_fallback)
    sample_long = sample if sample_long is None else sample_long
    items = list(items)

    def verified(item, response: str) -> bool:
        return verify(item, response)[0] >= accept_reward

    shorts = _sample_checked(sample, [SampleRequest(it.prompt, k_short, "short") for it in items])
    pass_rates: list[float] = []
    kept: dict[int, FusedExample] = {}
    hard: dict[int, tuple[str, list[int]]] = {}  # item index -> (prefix attempt, verified shorts)
    for idx, (item, responses) in enumerate(zip(items, shorts)):
        ok = [i for i, r in enumerate(responses) if verified(item, r)]
        rate = len(ok) / k_short
        pass_rates.append(rate)
        if rate >= easy_threshold:
            kept[idx] = FusedExample(item.id, item.prompt, "short", responses[_shortest(responses, ok)],
                                     rate, "easy", 0)
        else:
            failed = sorted(set(range(k_short)) - set(ok))
            hard[idx] = (responses[_shortest(responses, failed)], ok)

    attempts = {idx: 0 for idx in hard}
    pending = sorted(hard)
    n_requests = n_verified = 0
    for _ in range(max_long_attempts):
        if not pending:
            break
        requests = [SampleRequest(items[i].prompt, 1, "long", prefix=hard[i][0] + bridge)
                    for i in pending]
        outs = _sample_checked(sample_long, requests)
        still = []
        for idx, req, out in zip(pending, requests, outs):
            attempts[idx] += 1
            n_requests += 1
            target = req.prefix + out[0]
            if verified(items[idx], target):
                n_verified += 1
                kept[idx] = FusedExample(items[idx].id, items[idx].prompt, "long", target,
                                         pass_rates[idx], "hard", attempts[idx],
                                         short_attempt=hard[idx][0], continuation=out[0])
            else:
                still.append(idx)
        pending = still

    dropped: list[DroppedItem] = []
    for idx in pending:
        item, (_, ok) = items[idx], hard[idx]
        if ok and hard_fallback == "short":
            responses = shorts[idx]
            kept[idx] = FusedExample(item.id, item.prompt, "short", responses[_shortest(responses, ok)],
                                     pass_rates[idx], "hard", attempts[idx], fallback=True)
            continue
        why = (f"no long continuation verified in {attempts[idx]} attempt(s)"
               + (f"; {len(ok)}/{k_short} short answers were correct but hard_fallback='drop'"
                  if ok else ""))
        dropped.append(DroppedItem(item.id, item.prompt, pass_rates[idx], attempts[idx], why))

    examples = [kept[i] for i in sorted(kept)]
    stats = FusionStats(
        n_items=len(items), n_kept=len(examples), n_dropped=len(dropped),
        n_easy=len(items) - len(hard), n_hard=len(hard),
        n_short=sum(e.mode == "short" for e in examples),
        n_long=sum(e.mode == "long" for e in examples),
        n_fallback=sum(e.fallback for e in examples),
        mean_pass_rate=sum(pass_rates) / len(pass_rates) if pass_rates else 0.0,
        n_long_requests=n_requests, n_long_verified=n_verified)
    return FusionResult(examples, dropped, stats)


def fused_to_conversations(examples: Sequence[FusedExample]) -> list[tuple[list[dict[str, str]], str]]:
    """``(messages, thinking)`` per example, for ``chat_format.format_chat(messages, tok, thinking=...)``.

    The whole target is the assistant ``content`` (no ``reasoning`` field): the long continuation was
    sampled as a plain continuation of the assistant turn, so it is trained in that same layout.
    """
    return [([{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.target}],
             e.mode) for e in examples]


def _broadcast(name: str, value, n: int) -> list:
    if isinstance(value, (str, int, float)):
        return [value] * n
    value = list(value.tolist() if hasattr(value, "tolist") else value)
    assert len(value) == n, f"{name}: {len(value)} values, expected {n}"
    return value


def mode_reward(pass_rate, mode, *, easy_threshold: float, bonus: float,
                penalty: float = 0.0):
    """Difficulty-adaptive mode reward (TurboS RL: long CoT for hard prompts, short for easy).

    ``r = +bonus``    if the response's mode is the preferred one,
    ``r = -penalty``  otherwise (``penalty`` 0 by default: a mismatch earns nothing),
    preferred = "short" if ``pass_rate >= easy_threshold`` else "long".

    ``pass_rate`` is the prompt's measured pass rate (the online rejection-sampling estimate, e.g.
    the fraction of its GRPO group that verified). Scalars in, a float out; sequences (a scalar
    broadcasts) in, a list of floats out. It is added to the correctness reward by the caller.
    """
    scalar = isinstance(pass_rate, (int, float)) and isinstance(mode, str)
    n = 1 if scalar else len(mode if not isinstance(mode, str) else pass_rate)
    rates, modes = _broadcast("pass_rate", pass_rate, n), _broadcast("mode", mode, n)
    out = []
    for rate, m in zip(rates, modes):
        if m not in MODES:
            raise ConfigError(f"mode_reward.mode: must be one of {MODES}, got {m!r}")
        preferred = "short" if rate >= easy_threshold else "long"
        out.append(float(bonus) if m == preferred else -float(penalty))
    return out[0] if scalar else out


def compression_reward(correct, lengths, group_ids, *, weight: float) -> list[float]:
    """Long-CoT compression reward (TurboS RL: among equally correct answers the shorter wins).

    Within each group g (the responses to one prompt), over its *correct* responses only::

        r_i = weight * (L_max - L_i) / (L_max - L_min)   if L_max > L_min
        r_i = weight                                      if L_max == L_min (all equally short)
        r_i = 0                                           for an incorrect response

    so the shortest correct answer always earns ``weight``, the longest correct one 0 when lengths
    differ, and equal lengths earn equal scores. Inputs are aligned sequences (or tensors) of
    bools, token/char lengths and hashable group ids; returns a list of floats.
    """
    n = len(lengths)
    correct = [bool(c) for c in _broadcast("correct", correct, n)]
    lengths = [float(x) for x in _broadcast("lengths", lengths, n)]
    group_ids = _broadcast("group_ids", group_ids, n)
    spans: dict[Any, tuple[float, float]] = {}
    for ok, length, g in zip(correct, lengths, group_ids):
        if ok:
            lo, hi = spans.get(g, (math.inf, -math.inf))
            spans[g] = (min(lo, length), max(hi, length))
    out = []
    for ok, length, g in zip(correct, lengths, group_ids):
        if not ok:
            out.append(0.0)
            continue
        lo, hi = spans[g]
        out.append(float(weight) if hi == lo else float(weight) * (hi - length) / (hi - lo))
    return out
