"""LaSeR at test time: sample K answers, score each by the self-reward (one extra token), and report
verification quality and inference-time scaling (majority, weighted majority, best-of-K).

Shared by the RL stages (held-out synthetic tasks after training) and the ``evaluate`` stage (any
checkpoint, synthetic tasks and the math evaluation sets). The log-probs come from a forward-only pass
of megatron-core's pipeline schedule (:func:`forward_logps`), so every parallel layout works.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from data_pipelines.verifiable_tasks import extract_answer, normalise_answer
from megatron_ext.trainer import moe_aux_losses
from posttrain import laser
from posttrain.inference_scaling import PromptSamples, Sample, aggregate
from posttrain.rl_rollouts import RolloutBatches


def forward_logps(chunks, microbatches: list[dict], forward_step) -> list:
    """Per-token log-probs of each micro-batch from a forward-only pass (last pipeline stage; None
    elsewhere). The micro-batches share one shape [mbs, seq], which the schedule's pipeline
    exchanges use."""
    mbs, seq_length = microbatches[0]["tokens"].shape
    fwd = get_forward_backward_func()
    data = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    with torch.no_grad():
        out = fwd(forward_step_func=forward_step, data_iterator=data, model=chunks,
                  num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=mbs,
                  forward_only=True)
    moe_aux_losses(1, chunks[0].config.num_layers)  # these forwards are not training's: drop their aux losses
    return [d["logp"] for d in out] if out else [None] * len(microbatches)


def self_reward_eval(batches: RolloutBatches, tasks, seed: int, equivalent=None, ks=()) -> dict[str, Any]:
    """LaSeR at test time on held-out tasks: ``group_size`` samples each, scored by the self-reward
    (one extra token), against the verifier: self-verification accuracy on correct and on incorrect
    answers, their F1 (chance: 0.5 each) and the AUROC, and pass@1 / majority / self-reward-weighted
    majority / best-of-K (:func:`posttrain.inference_scaling.aggregate`; ``equivalent`` groups answers
    for the votes, exact match after normalising by default), with every finished sample's score by
    correctness (``scores``, for histograms). ``at_k`` repeats the aggregate on each prompt's first K
    samples for every K in ``ks`` below ``group_size``: the inference-time scaling
    curve from one set of samples."""
    st = batches.settings
    samples = batches.sample(list(tasks), seed)
    logps = batches.zc_logprobs(samples)
    per_prompt: dict[str, list[Sample]] = {}
    for s, lp in zip(samples, logps):
        answer, _ = extract_answer(batches.tokenizer.detokenize(s.tokens))
        kind = getattr(s.item, "kind", "")
        score = laser.self_reward_score(lp, batches.c_ref, st.laser_beta) if s.finished else math.nan
        per_prompt.setdefault(s.item.id, []).append(
            Sample(answer=None if answer is None else normalise_answer(answer, kind),
                   correct=s.correct >= 1.0, score=score, finished=s.finished))
    result = _plain(aggregate([PromptSamples(pid, group) for pid, group in per_prompt.items()], equivalent=equivalent))
    finished = [s for group in per_prompt.values() for s in group if s.finished]
    result["scores"] = {"correct": [round(s.score, 4) for s in finished if s.correct],      # histograms
                        "incorrect": [round(s.score, 4) for s in finished if not s.correct]}
    at_k = {str(k): _plain(aggregate([PromptSamples(pid, group[:k]) for pid, group in per_prompt.items()],
                                     equivalent=equivalent))
            for k in sorted(set(int(k) for k in ks)) if 0 < k < st.group_size}
    return {**result, "at_k": at_k} if at_k else result


def _plain(result: dict[str, Any]) -> dict[str, Any]:
    """NaN (a class without samples) as None, which JSON can hold."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}
