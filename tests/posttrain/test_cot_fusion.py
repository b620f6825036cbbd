"""Adaptive long-short CoT fusion with fake deterministic samplers over the verifiable tasks."""

import hashlib
import random

import pytest

from data_pipelines import special_tokens
from data_pipelines.chat_format import format_chat
from data_pipelines.verifiable_tasks import generate_tasks, verify
from megatron_ext.errors import ConfigError
from posttrain.cot_fusion import (
    DEFAULT_BRIDGE,
    build_fused_set,
    compression_reward,
    fused_to_conversations,
    mode_reward,
)

K = 4


def _u(*key) -> float:
    digest = hashlib.sha256(":".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@pytest.fixture(scope="module")
def tasks():
    return generate_tasks(["arithmetic", "algebra", "sorting", "counting"], 40, seed=3)


class FakeShort:
    """Sample i of a task is correct with the task's own probability p (seeded per id); correct and
    wrong answers get different lengths per sample index, so 'shortest' picks are checkable."""

    def __init__(self, tasks):
        self.by_prompt = {t.prompt: t for t in tasks}
        self.calls = []

    def p(self, task) -> float:
        return random.Random(f"p:{task.id}").choice([0.0, 0.3, 0.6, 1.0])

    def answer(self, task, i: int) -> str:
        pad = "." * ((7 * i + len(task.id)) % 5)
        if _u(task.id, i) < self.p(task):
            return f"Quick{pad}: \\boxed{{{task.answer}}}"
        return f"Guess{pad}: \\boxed{{{task.answer}9x}}"

    def __call__(self, requests):
        self.calls.append(list(requests))
        out = []
        for req in requests:
            assert req.thinking == "short" and req.prefix == ""
            out.append([self.answer(self.by_prompt[req.prompt], i) for i in range(req.n)])
        return out


class FakeLong:
    """Fixes a task on its j-th call (j in 1..3 per task id); earlier calls stay wrong."""

    def __init__(self, tasks):
        self.by_prompt = {t.prompt: t for t in tasks}
        self.count = {}
        self.calls = []

    @staticmethod
    def j(task) -> int:
        return 1 + int(_u("j", task.id) * 3)

    def __call__(self, requests):
        self.calls.append(list(requests))
        out = []
        for req in requests:
            assert req.thinking == "long" and req.n == 1
            task = self.by_prompt[req.prompt]
            self.count[task.id] = self.count.get(task.id, 0) + 1
            if self.count[task.id] >= self.j(task):
                out.append([f"The box above is wrong. Redo: \\boxed{{{task.answer}}}"])
            else:
                out.append(["Still thinking... \\boxed{nope}"])
        return out


def _pass_rate(short, task):
    return sum(verify(task, short.answer(task, i))[0] == 1.0 for i in range(K)) / K


def test_routing_matches_measured_pass_rates_and_targets_verify(tasks):
    short, long = FakeShort(tasks), FakeLong(tasks)
    res = build_fused_set(tasks, short, verify, k_short=K, easy_threshold=0.75, max_long_attempts=2,
                          sample_long=long)
    assert len(short.calls) == 1 and len(short.calls[0]) == len(tasks)  # one batched call
    assert all(r.n == K for r in short.calls[0])
    by_id = {t.id: t for t in tasks}
    seen = {e.item_id for e in res.examples} | {d.item_id for d in res.dropped}
    assert seen == set(by_id) and len(seen) == len(res.examples) + len(res.dropped)

    easy = {t.id for t in tasks if _pass_rate(short, t) >= 0.75}
    assert 0 < len(easy) < len(tasks)
    for e in res.examples:
        task = by_id[e.item_id]
        assert e.pass_rate == _pass_rate(short, task)
        assert verify(task, e.target) == (1.0, "correct")  # re-verify every target
        assert e.difficulty_label == ("easy" if e.item_id in easy else "hard")
        if e.item_id in easy:
            assert e.mode == "short" and e.n_long_attempts == 0
            correct = [short.answer(task, i) for i in range(K)
                       if verify(task, short.answer(task, i))[0] == 1.0]
            assert e.target == min(correct, key=len)  # shortest verified, first on ties
        else:
            assert e.mode == "long" and e.n_long_attempts == FakeLong.j(task) <= 2
            wrong = [short.answer(task, i) for i in range(K)
                     if verify(task, short.answer(task, i))[0] == 0.0]
            assert e.short_attempt == min(wrong, key=len)
            assert e.target == e.short_attempt + DEFAULT_BRIDGE + e.continuation
            assert verify(task, e.short_attempt)[0] == 0.0
    for d in res.dropped:
        assert d.item_id not in easy and FakeLong.j(by_id[d.item_id]) == 3
        assert d.n_long_attempts == 2 and "no long continuation verified" in d.reason
    assert res.dropped, "the fixture should leave some hard items unfixed"

    # Long rounds are batched and only carry still-unfixed items, each continuing attempt + bridge.
    assert len(long.calls) == 2
    hard = [t.id for t in tasks if t.id not in easy]
    assert [by_id_p.id for by_id_p in (long.by_prompt[r.prompt] for r in long.calls[0])] == hard
    assert len(long.calls[1]) == sum(FakeLong.j(by_id[i]) >= 2 for i in hard)
    for r in long.calls[0]:
        assert r.prefix.endswith(DEFAULT_BRIDGE)

    s = res.stats
    assert (s.n_items, s.n_kept, s.n_dropped) == (len(tasks), len(res.examples), len(res.dropped))
    assert s.n_easy == len(easy) == s.n_short and s.n_long == len(hard) - len(res.dropped)
    assert s.n_long_requests == len(long.calls[0]) + len(long.calls[1])
    assert s.n_long_verified == s.n_long
    assert s.mean_pass_rate == pytest.approx(sum(_pass_rate(short, t) for t in tasks) / len(tasks))


def test_deterministic_and_sample_long_defaults_to_sample(tasks):
    def both(requests):  # one model serving both modes
        return [FakeShort(tasks)([r])[0] if r.thinking == "short" else
                [f"ok \\boxed{{{FakeShort(tasks).by_prompt[r.prompt].answer}}}"] for r in requests]

    a = build_fused_set(tasks, both, verify, k_short=K, easy_threshold=1.0, max_long_attempts=1)
    b = build_fused_set(tasks, both, verify, k_short=K, easy_threshold=1.0, max_long_attempts=1)
    assert a.examples == b.examples and not a.dropped
    assert {e.mode for e in a.examples} == {"short", "long"}


def _one_task_sampler(task, short_answers, long_answer):
    def sample(requests):
        out = []
        for r in requests:
            out.append(list(short_answers) if r.thinking == "short" else [long_answer])
        return out
    return sample


def test_hard_item_with_a_correct_short_answer_but_no_long_fix(tasks):
    task = tasks[0]
    right, wrong = f"\\boxed{{{task.answer}}}", "\\boxed{zzz}"
    sample = _one_task_sampler(task, [wrong, right, wrong, wrong], "\\boxed{still wrong}")
    res = build_fused_set([task], sample, verify, k_short=4, easy_threshold=0.5, max_long_attempts=3)
    assert not res.examples and len(res.dropped) == 1
    d = res.dropped[0]
    assert d.pass_rate == 0.25 and d.n_long_attempts == 3 and "hard_fallback='drop'" in d.reason

    kept = build_fused_set([task], sample, verify, k_short=4, easy_threshold=0.5, max_long_attempts=3,
                           hard_fallback="short")
    (e,) = kept.examples
    assert (e.mode, e.difficulty_label, e.fallback, e.target) == ("short", "hard", True, right)
    assert kept.stats.n_fallback == 1 and kept.stats.n_short == 1 and not kept.dropped

    # No correct short answer at all: dropped even with the fallback.
    none = _one_task_sampler(task, [wrong] * 4, "\\boxed{still wrong}")
    res = build_fused_set([task], none, verify, k_short=4, easy_threshold=0.5, max_long_attempts=0,
                          hard_fallback="short")
    assert not res.examples and res.dropped[0].n_long_attempts == 0


def test_config_errors():
    with pytest.raises(ConfigError, match="easy_threshold"):
        build_fused_set([], lambda r: [], verify, k_short=2, easy_threshold=0.0, max_long_attempts=1)
    with pytest.raises(ConfigError, match="k_short"):
        build_fused_set([], lambda r: [], verify, k_short=0, easy_threshold=0.5, max_long_attempts=1)
    with pytest.raises(ConfigError, match="hard_fallback"):
        build_fused_set([], lambda r: [], verify, k_short=1, easy_threshold=0.5, max_long_attempts=1,
                        hard_fallback="keep")


class CharTokenizer:
    def special_id(self, s):
        return special_tokens.ALL.index(s)

    def tokenize(self, text):
        return [100 + ord(c) for c in text]


def test_fused_to_conversations_feed_format_chat(tasks):
    res = build_fused_set(tasks[:12], FakeShort(tasks), verify, k_short=K, easy_threshold=0.75,
                          max_long_attempts=3, sample_long=FakeLong(tasks))
    convs = fused_to_conversations(res.examples)
    assert len(convs) == len(res.examples) == 12
    tok = CharTokenizer()
    for (messages, thinking), e in zip(convs, res.examples):
        assert thinking == e.mode and messages[-1]["content"] == e.target
        ids, mask = format_chat(messages, tok, thinking=thinking)
        mode_tok = special_tokens.THINK_LONG if e.mode == "long" else special_tokens.THINK_SHORT
        assert tok.special_id(mode_tok) in ids
        assert sum(mask) == len(e.target) + 1  # the target and its end of turn


def test_mode_reward_hand_values():
    assert mode_reward(0.9, "short", easy_threshold=0.5, bonus=0.2) == 0.2
    assert mode_reward(0.5, "short", easy_threshold=0.5, bonus=0.2) == 0.2  # >= threshold is easy
    assert mode_reward(0.1, "long", easy_threshold=0.5, bonus=0.2) == 0.2
    assert mode_reward(0.9, "long", easy_threshold=0.5, bonus=0.2) == 0.0
    assert mode_reward(0.1, "short", easy_threshold=0.5, bonus=0.2, penalty=0.3) == -0.3
    assert mode_reward([0.9, 0.1, 0.1], ["long", "long", "short"], easy_threshold=0.5, bonus=1.0,
                       penalty=1.0) == [-1.0, 1.0, -1.0]
    assert mode_reward(0.2, ["long", "short"], easy_threshold=0.5, bonus=1.0) == [1.0, 0.0]
    with pytest.raises(ConfigError):
        mode_reward(0.2, "medium", easy_threshold=0.5, bonus=1.0)


def test_compression_reward_hand_values():
    correct = [1, 1, 1, 0, 1, 1, 0, 1]
    lengths = [10, 30, 20, 5, 50, 50, 1, 7]
    groups = ["a", "a", "a", "a", "b", "b", "b", "c"]
    r = compression_reward(correct, lengths, groups, weight=0.5)
    # group a: correct lengths 10, 30, 20 -> (30-L)/20; the incorrect 5 does not set the minimum
    assert r[:4] == pytest.approx([0.5, 0.0, 0.25, 0.0])
    # group b: equal lengths -> equal (full) scores; c: a lone correct answer is the shortest
    assert r[4:] == pytest.approx([0.5, 0.5, 0.0, 0.5])
    import torch
    rt = compression_reward(torch.tensor([True, True]), torch.tensor([4, 8]), torch.tensor([0, 0]),
                            weight=1.0)
    assert rt == [1.0, 0.0]
