"""RL rollouts without a model: reward terms, prompt filtering / dynamic sampling, and the row layout.

A scripted generator stands in for the policy: it answers each task correctly or not by a rule, so
every reward, advantage and drop is known in advance.
"""

import math

import pytest
import torch

from data_pipelines import special_tokens
from data_pipelines.tokenizer import load_tokenizer
from data_pipelines.verifiable_tasks import generate_tasks
from megatron_ext.generation import Generation, SamplingParams
from posttrain.chat_sampling import prompt_ids
from posttrain.laser import CRefError
from posttrain.rl_rollouts import RLSettings, RolloutBatches

BASE = dict(groups=2, group_size=4, epochs=1, max_sampling_rounds=1, clip_eps=0.2, clip_eps_high=None,
            kl_coef=0.0, temperature=1.0, thinking="short", laser=True, laser_alpha=0.1, laser_beta=0.1,
            laser_coef=0.1, laser_std_threshold=0.1, laser_loss_warmup=0, laser_adv_warmup=0, c_ref=-5.0)


class ScriptedGenerator:
    """``correct(task, mode, j)`` decides each answer; long-mode answers carry extra words."""

    def __init__(self, tokenizer, tasks, correct, finished=None):
        self.tok, self.correct, self.finished = tokenizer, correct, finished or (lambda task, mode, j: True)
        self.by_prompt = {}
        for t in tasks:
            for mode in ("short", "long"):
                self.by_prompt[tuple(prompt_ids(tokenizer, t.prompt, mode))] = (t, mode)
        self.calls = 0

    def generate_sharded(self, prompts, params, seed=0):
        self.calls += 1
        out, seen = [], {}
        for p in prompts:
            task, mode = self.by_prompt[tuple(p)]
            j = seen[task.id, mode] = seen.get((task.id, mode), -1) + 1
            wrong = task.solution.replace(f"\\boxed{{{task.answer}}}", "\\boxed{wrong}")
            text = task.solution if self.correct(task, mode, j) else wrong
            if mode == "long":
                text = "Let me think about this slowly and carefully. " + text
            done = self.finished(task, mode, j)
            tokens = self.tok.tokenize(text) + ([self.tok.special_id(special_tokens.END_OF_TURN)] if done else [])
            out.append(Generation(tokens, [0.0] * len(tokens), done))
        return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def batches(tokenizer, tasks, correct, finished=None, **settings):
    gen = ScriptedGenerator(tokenizer, tasks, correct, finished)
    st = RLSettings(**{**BASE, **settings})
    return RolloutBatches(items=tasks, tokenizer=tokenizer, generator=gen, settings=st,
                          sampling=SamplingParams(max_new_tokens=64), seq_length=256, micro_batch_size=2,
                          global_batch_size=st.groups * st.group_size, dp_rank=0, dp_size=1, seed=0)


def test_mode_and_compression_rewards_join_the_verifier_reward(tokenizer):
    easy, hard = generate_tasks(["comparison"], 2, seed=3, difficulties=[1])
    # easy: always right (pass rate 1: short preferred); hard: right only on the first long answer
    rb = batches(tokenizer, [easy, hard], lambda t, mode, j: t.id == easy.id or (mode == "long" and j == 0),
                 mode_reward={"easy_threshold": 0.5, "bonus": 0.1}, compression_weight=0.2)
    groups = rb._sample_groups([easy, hard], seed=0, first_group=0)
    g_easy, g_hard = groups
    assert [s.mode for s in g_easy] == ["short", "long", "short", "long"]
    # easy: every answer correct; short ones get the mode bonus and, being shorter, the full compression
    assert [s.correct for s in g_easy] == [1.0] * 4
    assert [s.reward for s in g_easy] == pytest.approx([1 + 0.1 + 0.2, 1 + 0.0 + 0.0] * 2)
    # hard (pass rate 1/4 < 0.5): long is preferred; its one correct answer is the only one compressed
    assert [s.correct for s in g_hard] == [0.0, 1.0, 0.0, 0.0]
    assert [s.reward for s in g_hard] == pytest.approx([0.0, 1 + 0.1 + 0.2, 0.0, 0.1])


def test_filtering_drops_uniform_groups_and_fills_only_when_it_must(tokenizer):
    tasks = generate_tasks(["comparison"], 6, seed=5, difficulties=[1])
    mixed = {tasks[1].id, tasks[4].id}
    rb = batches(tokenizer, tasks, lambda t, mode, j: (t.id in mixed and j % 2 == 0) or t.id == tasks[0].id,
                 max_sampling_rounds=3)
    samples, stats = rb._collect(rollout=0)
    # the pool is shuffled once per seed: replay its draws of 2 prompts a round by hand
    draws = [rb.items[i:i + 2] for i in range(0, 6, 2)]
    rounds = next(r + 1 for r in range(3) if sum(t.id in mixed for d in draws[:r + 1] for t in d) >= 2)
    drawn = [t for d in draws[:rounds] for t in d]
    assert stats["sampling_rounds"] == rounds and stats["kept_groups"] == 2
    assert stats["filled_with_zero_advantage"] == 0
    assert stats["all_pass"] == sum(t.id == tasks[0].id for t in drawn)
    assert stats["all_fail"] == len(drawn) - 2 - stats["all_pass"]
    assert {s.item.id for s in samples} == mixed
    adv = torch.tensor([s.advantage for s in samples])
    assert adv.sum().abs() < 1e-9 and (adv != 0).all()  # group-normalised, none zero
    only_uniform = batches(tokenizer, tasks[2:4], lambda t, mode, j: False, max_sampling_rounds=1)
    samples, stats = only_uniform._collect(rollout=0)
    assert stats["filled_with_zero_advantage"] == 2 and all(s.advantage == 0 for s in samples)


def test_rows_put_the_self_reward_token_after_the_end_of_turn(tokenizer):
    tasks = generate_tasks(["comparison"], 2, seed=7, difficulties=[1])
    rb = batches(tokenizer, tasks, lambda t, mode, j: j == 0)
    sample = rb._sample_groups(tasks[:1], seed=0, first_group=0)[0][0]
    row = rb._row(sample, 0)
    p, r = len(sample.prompt), len(sample.tokens)
    ids = sample.prompt + sample.tokens + [tokenizer.special_id(special_tokens.SELF_REWARD)]
    assert row["tokens"][: p + r].tolist() == ids[:-1]
    assert row["labels"][: p + r].tolist() == ids[1:]
    resp = row["response_mask"].nonzero().flatten().tolist()
    assert resp == list(range(p - 1, p - 1 + r))  # exactly the labels that are response tokens
    assert row["zc_mask"].nonzero().flatten().tolist() == [p - 1 + r]
    assert row["labels"][p - 1 + r] == tokenizer.special_id(special_tokens.SELF_REWARD)
    unfinished = type(sample)(**{**sample.__dict__, "finished": False})
    assert rb._row(unfinished, 0)["zc_mask"].sum() == 0  # no eos, no z_c


def test_rows_are_cut_to_the_longest_sequence_rounded_up_to_64(tokenizer):
    tasks = generate_tasks(["comparison"], 2, seed=7, difficulties=[1])
    rb = batches(tokenizer, tasks, lambda t, mode, j: j == 0)
    samples = [s for g in rb._sample_groups(tasks, seed=0, first_group=0) for s in g]
    longest = max(len(s.prompt) + len(s.tokens) + s.finished for s in samples) - 1   # + z_c, minus the shift
    length = rb.row_length(samples)
    assert length % 64 == 0 and longest <= length < longest + 64
    cut, full = rb._row(samples[0], 0, length), rb._row(samples[0], 0)
    assert full["tokens"].shape == (256,) and cut["tokens"].shape == (length,)
    for key in ("tokens", "labels", "response_mask", "zc_mask"):
        assert torch.equal(cut[key], full[key][:length])
        dropped = full[key][length:]   # only padding is cut
        assert (dropped == tokenizer.pad).all() if key in ("tokens", "labels") else not dropped.any()
    rb.seq_length = length - 1    # never longer than the model's sequence
    long_sample = type(samples[0])(**{**samples[0].__dict__, "tokens": samples[0].tokens * 40})
    assert rb.row_length([long_sample]) == length - 1


def _zc_logp_stub(value_of):
    """A policy stand-in for the rollout's forward pass: every label's log-prob is
    ``value_of(sample index)``, so log pi(z_c) is known per sample."""
    def logp_fn(micro):
        return [torch.stack([torch.full(mb["tokens"].shape[1:], float(value_of(int(i)))) for i in mb["index"]])
                for mb in micro]
    return logp_fn


def test_rollout_scores_only_finished_responses_and_logs_what_laser_does(tokenizer):
    tasks = generate_tasks(["comparison"], 2, seed=11, difficulties=[1])
    logged = {}
    # answers 0 and 2 of each group are right; answer 3 never finishes (no eos: no z_c, no score)
    rb = batches(tokenizer, tasks, lambda t, mode, j: j in (0, 2), finished=lambda t, mode, j: j != 3)
    rb.on_rollout = lambda rollout, stats: logged.update(stats)
    # z_c log-probs: right answers -2 (score 0.1 * (-2 + 12) = 1.0), wrong ones -12 (score 0)
    rb.settings.c_ref = rb.c_ref = -12.0
    rb.logp_fn = lambda micro: _zc_logp_stub(lambda i: -2.0 if rb_samples[i].correct else -12.0)(micro)
    rb_samples = [s for g in rb._sample_groups(rb.items[:2], 0, 0) for s in g]   # what _collect will draw
    rb._prepare(rollout=0)
    samples = rb.last_samples
    assert [s.finished for s in samples] == [True, True, True, False] * 2
    assert [s.score for s in samples if s.finished] == pytest.approx([1.0, 0.0, 1.0] * 2)
    assert all(math.isnan(s.score) for s in samples if not s.finished)      # no made-up score
    assert logged["truncated"] == pytest.approx(0.25) and logged["finished"] == pytest.approx(0.75)
    assert logged["self_verify_f1"] == 1.0 and logged["self_verify_auroc"] == 1.0
    # both groups' finished scores [1, 0, 1] spread (std 0.577 > 0.1): LaSeR is in both groups' advantages
    assert logged["laser_groups_over_std_threshold"] == 1.0 and logged["laser_in_advantages"] == 1.0


def test_c_ref_is_never_estimated_from_too_few_finished_responses(tokenizer):
    tasks = generate_tasks(["comparison"], 2, seed=11, difficulties=[1])
    rb = batches(tokenizer, tasks, lambda t, mode, j: j == 0, finished=lambda t, mode, j: j == 0, c_ref=None)
    rb.logp_fn = _zc_logp_stub(lambda i: -3.0)
    # 2 of 8 responses finished, fewer than a group (4): refused, with the way out in the message
    with pytest.raises(CRefError, match="2 of 8 responses finished.*max_new_tokens.*laser.c_ref"):
        rb._prepare(rollout=0)
    assert rb.c_ref is None
    enough = batches(tokenizer, tasks, lambda t, mode, j: j == 0, finished=lambda t, mode, j: j < 2, c_ref=None)
    enough.logp_fn = _zc_logp_stub(lambda i: -3.0)
    enough._prepare(rollout=0)
    assert enough.c_ref == pytest.approx(-3.0)


def test_self_reward_eval_reports_the_scaling_curve_from_one_set_of_samples(tokenizer):
    from posttrain.self_reward_eval import self_reward_eval

    tasks = generate_tasks(["comparison"], 3, seed=13, difficulties=[1])
    # per prompt: answers 1 and 3 right (of 4); the self-reward says 1.0 for right, 0.0 for wrong
    rb = batches(tokenizer, tasks, lambda t, mode, j: j in (1, 3))
    rb.c_ref = -10.0
    rb.logp_fn = _zc_logp_stub(lambda i: 0.0 if i % 4 in (1, 3) else -10.0)
    out = self_reward_eval(rb, tasks, seed=0, ks=[1, 2, 4, 8])
    assert set(out["at_k"]) == {"1", "2"}          # only K below the samples per prompt
    one, two = out["at_k"]["1"], out["at_k"]["2"]
    # first answer only: wrong everywhere; first two: one right, one wrong, the score picks the right one
    assert one["k"] == 1 and one["pass_at_1"] == one["pass_at_k"] == one["best_of_k"] == 0.0
    assert two["k"] == 2 and two["pass_at_1"] == 0.5 and two["pass_at_k"] == 1.0
    assert two["majority"] == 0.0 and two["weighted_majority"] == two["best_of_k"] == 1.0   # tie -> earliest
    assert out["k"] == 4 and out["pass_at_1"] == 0.5 and out["auroc"] == 1.0 and out["f1"] == 1.0
