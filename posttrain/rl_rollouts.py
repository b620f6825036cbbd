"""GRPO rollouts on megatron-core: sample groups, reward them, and serve them to the Trainer as batches.

The :class:`megatron_ext.trainer.Trainer` runs one optimizer update per step on ``train_batches
.microbatches(step)``. :class:`RolloutBatches` is that object for RL: at the first update of each
rollout it samples ``groups`` prompts x ``group_size`` responses with the current policy
(:mod:`megatron_ext.generation`), verifies them (``data_pipelines.verifiers``), drops always-pass /
always-fail prompts and zero-advantage groups (prompt filtering and DAPO's dynamic sampling: it samples
more prompts, up to ``max_sampling_rounds``, to fill the batch), records the behaviour policy's
log-probs (one forward pass; and the reference model's when the KL term is on), and then serves the
rollout in ``epochs`` passes of mini-batches of ``train.global_batch_size`` sequences.

A training sequence is ``prompt + response``, plus LaSeR's self-reward token ``z_c`` right after a
finished response's end of turn (one extra position; its log-prob is read at that label). Rows are
right-padded to the rollout's longest sequence rounded up to ``LENGTH_MULTIPLE`` x tensor-parallel
size (sequence parallelism splits it), at most the model's ``seq_length``: with causal attention
(and Mamba's left-to-right state) padding after a sequence never changes it, so a shorter row
computes the same log-probs for a fraction of the cost (the demo's rows use about 100 of 256 positions).

Loss normalisation: megatron-core averages the loss over micro-batches and data-parallel ranks, so
each micro-batch's token sum is divided by the update's global token count times
``num_microbatches * dp``: the update's loss is then the exact token mean over all its response
tokens (DAPO's token-level loss), and LaSeR's class weights are computed over the whole update.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from data_pipelines import special_tokens
from data_pipelines.verifiers import verify_batch
from megatron_ext.generation import Generator, SamplingParams
from posttrain import grpo, laser
from posttrain.chat_sampling import prompt_ids, prompt_text, response_text
from posttrain.cot_fusion import compression_reward, mode_reward


@dataclass
class RLSettings:
    """The ``rl`` block of an RL stage, flattened (see launch/conf/stage/rl_stem.yaml)."""

    groups: int                  # prompts per rollout after filtering
    group_size: int              # responses per prompt (GRPO's G)
    epochs: int                  # passes over a rollout; each mini-batch is one optimizer update
    max_sampling_rounds: int     # dynamic sampling: extra prompt draws to fill the rollout
    clip_eps: float
    clip_eps_high: float | None
    kl_coef: float
    temperature: float
    thinking: str | None
    laser: bool                  # append z_c and train / use the self-reward
    laser_alpha: float
    laser_beta: float
    laser_coef: float            # advantage integration weight (0.1)
    laser_std_threshold: float
    laser_loss_warmup: int       # updates before the self-reward loss starts
    laser_adv_warmup: int        # updates (after the loss starts) before advantages integrate it
    c_ref: float | None          # None: estimated from the first rollout (the initial policy)
    mode_reward: dict | None = None      # {easy_threshold, bonus[, penalty]}: half of each group long-CoT
    compression_weight: float = 0.0      # long-CoT compression reward weight (0: off)


@dataclass
class Sample:
    group: int
    item: Any
    prompt: list[int]
    tokens: list[int]            # the response, its stop token included when finished
    finished: bool
    reward: float                # what the advantages use: the verifier's plus any extra terms
    correct: float               # the verifier's reward r_v in {0, 1}: LaSeR's target
    reason: str
    mode: str | None = None      # the thinking mode it was sampled in
    advantage: float = 0.0
    score: float = math.nan      # self-reward r_s under the behaviour policy


LENGTH_MULTIPLE = 64


def token_logprobs_parallel(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(label) [b, s] from vocab-parallel logits [b, s, v/tp] (megatron's TP cross entropy)."""
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    ce = tensor_parallel.vocab_parallel_cross_entropy(scaled.transpose(0, 1).contiguous(),
                                                      labels.transpose(0, 1).contiguous())
    return -ce.transpose(0, 1)


def rl_loss(logits: torch.Tensor, batch: dict, settings: RLSettings, step: int, sink: dict):
    """The loss of one micro-batch (module docstring) and, for forward-only passes, its log-probs."""
    logp = token_logprobs_parallel(logits, batch["labels"], settings.temperature)
    if "old_logp" not in batch:  # a forward-only pass that records log-probs
        return logp.sum() * 0, {"logp": logp.detach()}
    scale = batch["loss_scale"][0]
    mask = batch["response_mask"]
    pg, metrics = grpo.policy_loss(logp, batch["old_logp"], batch["advantages"], mask,
                                   clip_eps=settings.clip_eps, clip_eps_high=settings.clip_eps_high,
                                   kl_coef=settings.kl_coef,
                                   ref_logp=batch.get("ref_logp") if settings.kl_coef > 0 else None)
    loss = pg * metrics["tokens"] * scale
    logs = {"lm_loss": torch.stack([(pg * metrics["tokens"]).detach().double(), metrics["tokens"].double()])}
    if settings.laser and step >= settings.laser_loss_warmup:
        zc = batch["zc_mask"]
        logp_zc = (logp * zc).sum(-1)
        scores = laser.self_reward_score(logp_zc, batch["c_ref"][0], settings.laser_beta)
        mse = (batch["laser_weight"] * (scores - batch["rewards"]) ** 2).sum()
        loss = loss + settings.laser_alpha * mse * batch["laser_scale"][0]
        sink["laser_mse_sum"] = sink.get("laser_mse_sum", 0.0) + float(mse.detach())
    for k in ("kl", "clip_frac", "ratio_mean"):
        sink.setdefault(k, []).append(float(metrics[k]))
    return loss, logs


def rl_forward_step_factory(settings: RLSettings, batches: "RolloutBatches"):
    """The Trainer's ``forward_step``: the model's logits, then :func:`rl_loss` on the last stage."""

    def forward_step(batch_iter, model):
        batch = next(batch_iter)
        logits = model(batch["tokens"], batch["position_ids"], None)
        return logits, lambda out: rl_loss(out, batch, settings, batches.current_step, batches.loss_metrics)

    return forward_step


def _collect_zc_logprobs(mb: dict, logp: torch.Tensor, into: dict[int, float]) -> None:
    """log pi(z_c | ...) of each row of ``mb`` that has z_c, keyed by the row's sample index."""
    for idx, row_logp, zc in zip(mb["index"].tolist(), logp, mb["zc_mask"]):
        if zc.any():
            into[idx] = float((row_logp * zc).sum())


class RolloutBatches:
    """``train_batches`` for the Trainer in an RL stage (module docstring)."""

    def __init__(self, *, items: Sequence[Any], tokenizer, generator: Generator, settings: RLSettings,
                 sampling: SamplingParams, seq_length: int, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int,
                 on_rollout: Callable[[int, dict], None] | None = None):
        per_rollout = settings.groups * settings.group_size
        if per_rollout % global_batch_size:
            raise ValueError(f"rl: groups x group_size = {per_rollout} sequences per rollout must be a multiple "
                             f"of train.global_batch_size={global_batch_size}")
        self.items = list(items)
        random.Random(f"rl-prompts:{seed}").shuffle(self.items)
        self.tokenizer, self.generator, self.settings, self.sampling = tokenizer, generator, settings, sampling
        self.seq_length, self.mbs, self.gbs = seq_length, micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)
        self.minibatches = per_rollout // global_batch_size
        self.updates_per_rollout = self.minibatches * settings.epochs
        self.on_rollout = on_rollout
        self.zc = tokenizer.special_id(special_tokens.SELF_REWARD)
        self.c_ref = settings.c_ref
        self.logp_fn: Callable[[list[dict]], list[torch.Tensor | None]] | None = None
        self.ref_logp_fn: Callable[[list[dict]], list[torch.Tensor | None]] | None = None
        self._rollout_index: int | None = None
        self._micro: list[list[dict]] = []
        self.current_step = 0
        self.loss_metrics: dict = {}
        self._cursor = 0

    # -- sampling ------------------------------------------------------------------------------
    def _draw(self, n: int) -> list[Any]:
        out = []
        for _ in range(n):
            out.append(self.items[self._cursor % len(self.items)])
            self._cursor += 1
        return out

    def _modes(self) -> list[str | None]:
        """Each group member's thinking mode: the stage's, or half short / half long when the
        difficulty-adaptive mode reward is on (the group's pass rate then says which mode it wants)."""
        st = self.settings
        if st.mode_reward:
            return ["short" if j % 2 == 0 else "long" for j in range(st.group_size)]
        return [st.thinking] * st.group_size

    def _sample_groups(self, items: Sequence[Any], seed: int, first_group: int) -> list[list[Sample]]:
        """``group_size`` responses per item, rewarded: the verifier's r_v plus, when configured, the
        CoT-fusion terms (:func:`posttrain.cot_fusion.mode_reward`, :func:`compression_reward`)."""
        st = self.settings
        modes = self._modes()
        prompts = [[prompt_ids(self.tokenizer, prompt_text(it), m) for m in modes] for it in items]
        flat = self.generator.generate_sharded([p for per_item in prompts for p in per_item],
                                               self.sampling, seed=seed)
        texts = [response_text(self.tokenizer, g) for g in flat]
        verdicts = verify_batch([it for it in items for _ in range(st.group_size)], texts)
        groups = []
        for gi, item in enumerate(items):
            span = range(gi * st.group_size, (gi + 1) * st.group_size)
            correct = [verdicts[i].reward for i in span]
            extra = [0.0] * st.group_size
            if st.mode_reward:
                pass_rate = sum(c >= 1.0 for c in correct) / len(correct)
                extra = [e + mode_reward(pass_rate, m, **st.mode_reward) for e, m in zip(extra, modes)]
            if st.compression_weight:
                lengths = [len(flat[i].tokens) for i in span]
                comp = compression_reward([c >= 1.0 for c in correct], lengths, [0] * len(lengths),
                                          weight=st.compression_weight)
                extra = [e + c for e, c in zip(extra, comp)]
            groups.append([Sample(first_group + gi, item, prompts[gi][j], flat[i].tokens, flat[i].finished,
                                  correct[j] + extra[j], correct[j], verdicts[i].reason, modes[j])
                           for j, i in enumerate(span)])
        return groups

    def _collect(self, rollout: int) -> tuple[list[Sample], dict]:
        """Sample until ``groups`` groups with a non-zero advantage (or the rounds run out)."""
        st = self.settings
        self._cursor = rollout * st.groups * st.max_sampling_rounds  # deterministic per rollout (resumes)
        kept, dropped, all_samples = [], [], []
        stats = {"all_pass": 0, "all_fail": 0, "sampling_rounds": 0}
        for round_ in range(st.max_sampling_rounds):
            stats["sampling_rounds"] += 1
            groups = self._sample_groups(self._draw(st.groups), self.seed + 1000 * rollout + round_,
                                         first_group=round_ * st.groups)
            if round_ == 0:  # the same prompts every pass over the pool: comparable across passes
                stats["first_draw_reward"] = sum(s.correct for g in groups for s in g) / (len(groups) * st.group_size)
                stats["pool_pass"] = rollout * st.groups * st.max_sampling_rounds // len(self.items)
            for group in groups:
                all_samples += group
                rewards = torch.tensor([s.reward for s in group])
                if bool((rewards == rewards[0]).all()):
                    stats["all_pass" if group[0].correct >= 1.0 else "all_fail"] += 1
                    dropped.append(group)
                else:
                    kept.append(group)
            if len(kept) >= st.groups:
                break
        filled = max(0, st.groups - len(kept))
        groups = kept[:st.groups] + dropped[:filled]  # zero-advantage groups only if nothing else
        stats["filled_with_zero_advantage"] = filled
        samples = [s for g in groups for s in g]
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
        ids = torch.tensor([s.group for s in samples])
        adv = grpo.group_advantages(rewards, ids)
        for s, a in zip(samples, adv.tolist()):
            s.advantage = a
        all_rewards = [s.reward for s in all_samples]
        stats.update({
            "reward_mean": sum(all_rewards) / len(all_rewards),
            "verifier_reward_mean": sum(s.correct for s in all_samples) / len(all_samples),
            "trained_reward_mean": float(rewards.mean()),
            "finished": sum(s.finished for s in all_samples) / len(all_samples),
            "truncated": sum(not s.finished for s in all_samples) / len(all_samples),
            "response_tokens": sum(len(s.tokens) for s in all_samples) / len(all_samples),
            "kept_groups": min(len(kept), st.groups),
        })
        return samples, stats

    # -- sequences -----------------------------------------------------------------------------
    def _ids(self, s: Sample) -> list[int]:
        """The row's tokens before the label shift: prompt + response (+ z_c after a finished one)."""
        ids = s.prompt + s.tokens
        return ids + [self.zc] if self.settings.laser and s.finished else ids

    def row_length(self, samples: Sequence[Sample]) -> int:
        """The row length for ``samples`` (module docstring): the same on every rank, which all hold
        every sample, so pipeline stages agree on the shapes they exchange."""
        tp = parallel_state.get_tensor_model_parallel_world_size() if dist.is_initialized() else 1
        multiple = LENGTH_MULTIPLE * tp
        longest = max((len(self._ids(s)) - 1 for s in samples), default=1)
        return min(self.seq_length, -(-longest // multiple) * multiple)

    def _row(self, s: Sample, index: int, length: int | None = None) -> dict[str, torch.Tensor]:
        ids = self._ids(s)
        with_zc = self.settings.laser and s.finished
        if len(ids) - 1 > self.seq_length:
            raise ValueError(f"rl: prompt + response + 1 = {len(ids)} tokens exceeds seq_length={self.seq_length}; "
                             f"lower sampling.max_new_tokens")
        S, p, r = length or self.seq_length, len(s.prompt), len(s.tokens)
        tokens = torch.full((S,), self.tokenizer.pad, dtype=torch.long)
        labels = torch.full((S,), self.tokenizer.pad, dtype=torch.long)
        tokens[:len(ids) - 1] = torch.tensor(ids[:-1])
        labels[:len(ids) - 1] = torch.tensor(ids[1:])
        response = torch.zeros(S)
        response[p - 1:p - 1 + r] = 1.0           # label positions of the response tokens
        zc = torch.zeros(S)
        if with_zc:
            zc[p - 1 + r] = 1.0                   # the label after the end of turn is z_c
        return {"tokens": tokens, "labels": labels, "position_ids": torch.arange(S), "response_mask": response,
                "zc_mask": zc, "rewards": torch.tensor(float(s.correct)), "index": torch.tensor(index),
                "finished": torch.tensor(float(s.finished))}

    def _microbatches(self, rows: list[dict], minibatch: int) -> list[dict]:
        out = []
        base = minibatch * self.gbs
        for m in range(self.num_microbatches):
            start = base + (m * self.dp_size + self.dp_rank) * self.mbs
            chunk = rows[start:start + self.mbs]
            out.append({k: torch.stack([r[k] for r in chunk]) for k in chunk[0]})
        return out

    # -- the rollout's forward passes ----------------------------------------------------------
    def zc_logprobs(self, samples: Sequence[Sample]) -> list[float]:
        """log pi(z_c | prompt, response, eos) of each finished sample under the current weights (NaN
        for unfinished ones): one forward pass over all of them on every rank (evaluation only)."""
        length = self.row_length(samples)
        rows = [self._row(s, i, length) for i, s in enumerate(samples)]
        micro = [{k: torch.stack([r[k] for r in rows[j:j + self.mbs]]) for k in rows[0]}
                 for j in range(0, len(rows), self.mbs)]
        found: dict[int, float] = {}
        for mb, lp in zip(micro, self.logp_fn(micro)):
            if lp is not None:
                _collect_zc_logprobs(mb, lp, found)
        values = self._gather_by_index(found, len(samples))
        return [v if s.finished else math.nan for v, s in zip(values, samples)]

    def sample(self, items: Sequence[Any], seed: int) -> list[Sample]:
        """``group_size`` responses to each item, verified, unfiltered (evaluation)."""
        return [s for g in self._sample_groups(items, seed, first_group=0) for s in g]

    def _gather_by_index(self, values: dict[int, float], n: int) -> list[float]:
        """Per-sequence values held by the last pipeline stage of each data-parallel rank -> all ranks."""
        t = torch.zeros(n, dtype=torch.float64)
        has = torch.zeros(n, dtype=torch.float64)
        for i, v in values.items():
            t[i], has[i] = v, 1.0
        both = torch.stack([t, has])
        if dist.is_initialized():
            dist.all_reduce(both, group=parallel_state.get_data_parallel_group())
            if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
                    both.zero_()
                dist.all_reduce(both, group=parallel_state.get_pipeline_model_parallel_group())
        return (both[0] / both[1].clamp(min=1)).tolist()

    def _prepare(self, rollout: int) -> None:
        st = self.settings
        samples, stats = self._collect(rollout)
        length = self.row_length(samples)
        rows = [self._row(s, i, length) for i, s in enumerate(samples)]
        self._micro = [self._microbatches(rows, m) for m in range(self.minibatches)]
        # Behaviour log-probs (and the reference's) of every micro-batch, before any update.
        zc_logp: dict[int, float] = {}
        for micro in self._micro:
            logps = self.logp_fn(micro)
            refs = self.ref_logp_fn(micro) if (self.ref_logp_fn is not None and st.kl_coef > 0) else [None] * len(micro)
            for mb, lp, ref in zip(micro, logps, refs):
                if lp is None:  # not the last pipeline stage: it never computes the loss
                    continue
                mb["old_logp"] = lp
                if ref is not None:
                    mb["ref_logp"] = ref
                _collect_zc_logprobs(mb, lp, zc_logp)
        logp_zc = self._gather_by_index(zc_logp, len(samples))
        finished = torch.tensor([s.finished for s in samples])
        if st.laser and self.c_ref is None:
            # the policy before any update is the reference; no constant is made up from no response
            self.c_ref = laser.c_ref_estimate(torch.tensor(logp_zc), finished, min_finished=st.group_size)
        # a truncated response has no z_c, so no score (NaN; never used)
        scores = torch.tensor([laser.self_reward_score(v, self.c_ref, st.laser_beta) if f and st.laser else math.nan
                               for v, f in zip(logp_zc, finished.tolist())], dtype=torch.float64)
        verifier_adv = torch.tensor([s.advantage for s in samples], dtype=torch.float64)
        group_ids = torch.tensor([s.group for s in samples])
        step = rollout * self.updates_per_rollout
        integrating = st.laser and step >= st.laser_loss_warmup + st.laser_adv_warmup
        if integrating:
            adv = laser.integrate_advantages(verifier_adv, scores, group_ids, finished, coef=st.laser_coef,
                                             std_threshold=st.laser_std_threshold)
        else:
            adv = verifier_adv
        correct = torch.tensor([s.correct for s in samples], dtype=torch.float64)
        for m, micro in enumerate(self._micro):
            # global counts of this update (mini-batch), over every data-parallel rank's rows
            lo, hi = m * self.gbs, (m + 1) * self.gbs
            tokens = sum(len(s.tokens) for s in samples[lo:hi])
            n_finished = max(int(finished[lo:hi].sum()), 1)
            mb_weights = laser.self_reward_weights(correct[lo:hi], finished[lo:hi])
            factor = self.num_microbatches * self.dp_size
            for mb in micro:
                idx = mb["index"]
                mb["advantages"] = adv[idx].float()
                mb["laser_weight"] = mb_weights[idx - lo].float()
                mb["c_ref"] = torch.full((len(idx),), float(self.c_ref) if st.laser else 0.0)
                mb["loss_scale"] = torch.full((len(idx),), factor / max(tokens, 1))
                mb["laser_scale"] = torch.full((len(idx),), factor / n_finished)
        for s, sc in zip(samples, scores.tolist()):
            s.score = sc
        if finished.any() and st.laser:
            verification = laser.self_verification_metrics(scores[finished], correct[finished] > 0.5)
            stats.update({f"self_verify_{k}": v for k, v in verification.items()})
            stats["laser_groups_over_std_threshold"] = laser.self_reward_group_share(
                scores, group_ids, finished, st.laser_std_threshold)
            stats["laser_in_advantages"] = float(integrating)
        stats.update({"c_ref": self.c_ref, "advantage_abs_mean": float(adv.abs().mean())})
        self.last_samples = samples
        if self.on_rollout is not None:
            self.on_rollout(rollout, stats)

    # -- the Trainer's interface ---------------------------------------------------------------
    def microbatches(self, step: int) -> list[dict]:
        rollout, update = divmod(step, self.updates_per_rollout)
        if rollout != self._rollout_index:
            self._prepare(rollout)
            self._rollout_index = rollout
        self.current_step = step
        self.loss_metrics = {}
        return self._micro[update % self.minibatches]
