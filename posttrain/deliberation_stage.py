"""One round of multi-round deliberation learning (Hunyuan-TurboS post-training), as a pipeline stage.

Chain ``deliberation`` stages for R rounds (``deliberation_1``, ``deliberation_2`` ... in
``pipeline.order``): each takes the previous round's checkpoint as its candidate and hands on its own.

1. Battles (once; :mod:`posttrain.sampled_data`): the candidate (the parent's weights) and each
   reference checkpoint (``references``: earlier stages of the pipeline by name, or checkpoint
   folders of the same architecture, loaded in turn into the same model) answer the round's prompts;
   a judge panel (``judges``: verifier correctness, format and length rules, optionally a reward
   model given as ``module:function``) scores each pair on its dimensions.
2. Win rates per category (task kind) locate the weaknesses; the targeted data is the best answer of
   each battle when the verifier accepts it, weighted toward the weak categories, easy to hard
   (:func:`posttrain.deliberation.deliberation_round`).
3. SFT of the candidate on that data (the trainer reloads the parent's weights after the references
   were sampled).

Kept in the stage folder: ``round/`` (``battles.jsonl``, ``win_rates.json``, ``training_data.jsonl``,
``summary.json``), the checkpoint, and the manifest (data sizes, win rates, losses, task accuracy).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import asdict

from data_pipelines.prepare import prepared_tokenizer
from data_pipelines.verifiable_tasks import generate_tasks, split_tasks, verify
from megatron_ext import checkpointing
from megatron_ext.errors import ConfigError
from megatron_ext.generation import Generator
from megatron_ext.stage import StageContext, StageResult
from megatron_ext.stage_training import build_stage_model
from posttrain.chat_sampling import ChatSampler, initial_task_accuracy, sampling_params, stage_task_accuracy
from posttrain.cot_fusion import SampleRequest
from posttrain.deliberation import (JudgePanel, RewardModelJudge, RuleJudge, TrainingRecord, VerifierJudge,
                                    deliberation_round)
from posttrain.sampled_data import sample_once
from posttrain.sft_data import build_sft_data, chat_examples, train_sft


def _reward_model(spec: str, field: str):
    """``module:function`` -> the function, a ``score(item, answer) -> float`` reward model."""
    module_name, _, fn_name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{field}={spec!r}: cannot import it ({exc}); give 'package.module:function' "
                          f"taking (item, answer) and returning a float") from exc


def judge_panel(judges_cfg, field: str) -> JudgePanel:
    """The panel of the stage's ``judges`` block; its ``weights`` map dimension -> weight."""
    judges = [VerifierJudge(verify), RuleJudge(int(judges_cfg.max_chars), bool(judges_cfg.require_boxed))]
    if judges_cfg.get("reward_model"):
        judges.append(RewardModelJudge(_reward_model(judges_cfg.reward_model, f"{field}.reward_model")))
    return JudgePanel(judges, weights=dict(judges_cfg.get("weights") or {}))


def _held_out(item_id: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"deliberation-valid:{seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def run(ctx: StageContext) -> StageResult:
    cfg, st, model_cfg = ctx.cfg, ctx.stage_cfg, ctx.model_cfg
    seed, round_index = int(cfg.seed), int(st["round"])
    field = f"stages.{ctx.name}"
    references = {ref: ctx.checkpoint_of(ref, f"{field}.references") for ref in st.references}
    if not references:
        raise ConfigError(f"{field}.references is empty: name at least one earlier stage or checkpoint "
                          f"for the candidate to battle")
    panel = judge_panel(st.judges, f"{field}.judges")
    tokenizer = prepared_tokenizer(cfg.data, ctx.run_dir / "data", cfg.seed)
    model = build_stage_model(ctx, tokenizer)
    round_dir = ctx.stage_dir / "round"

    def produce():
        p = st.prompts
        tasks = generate_tasks(list(p.kinds), int(p.num_tasks), seed + int(p.seed_offset),
                               difficulties=list(p.difficulties))
        items, _ = split_tasks(tasks, float(st.eval.held_out_fraction), seed)  # never an eval task
        generator = Generator(model.chunks, model.vocab_size, max_batch_size=int(st.sampling.batch_size))
        sample = ChatSampler(generator, tokenizer, sampling_params(st.sampling, tokenizer), seed + round_index)
        requests = [SampleRequest(t.prompt, 1, st.get("thinking")) for t in items]
        candidate = [group[0] for group in sample(requests)]       # the parent's weights
        answers = {}
        for name, path in references.items():
            checkpointing.load(path, model.chunks)
            answers[name] = [group[0] for group in sample(requests)]
        rnd = deliberation_round(round_index, items, candidate, answers, panel, budget=int(st.budget),
                                 weak_share=float(st.weak_share), seed=seed,
                                 accept=lambda item, answer: verify(item, answer)[0] >= 1.0)
        if ctx.env.is_main:
            rnd.write(round_dir)
        return [asdict(r) for r in rnd.selected], {**rnd.summary(), "generation": generator.stats.as_dict()}

    records = [TrainingRecord(**r) for r in sample_once(ctx, model.chunks, round_dir, produce)]
    if not records:
        raise ConfigError(f"stage {ctx.name!r}: the round selected no training data ({field}.budget="
                          f"{st.budget}); raise the budget or the number of prompts, then delete "
                          f"{ctx.stage_dir} and rerun")
    thinking = st.get("thinking")
    held = [_held_out(f"{r.item_id}:{r.source}", float(st.held_out_fraction), seed) for r in records]
    train_conv = [(r.to_conversation(), thinking) for r, h in zip(records, held) if not h]
    valid_conv = [(r.to_conversation(), thinking) for r, h in zip(records, held) if h]
    data = build_sft_data(chat_examples(train_conv, tokenizer), chat_examples(valid_conv, tokenizer),
                          int(model_cfg.seq_length), tokenizer.pad, st.get("packing"))

    def accuracy(chunks) -> dict:
        return stage_task_accuracy(chunks, tokenizer, model.vocab_size, st.eval, seed, model_cfg)

    def initial_accuracy(chunks) -> dict:
        return initial_task_accuracy(ctx, chunks, tokenizer, model.vocab_size, st.eval)

    outcome, final = train_sft(ctx, tokenizer, model, data, accuracy, initial_accuracy)
    trainer = outcome.trainer
    table = json.loads((round_dir / "win_rates.json").read_text())
    return StageResult(
        checkpoint=outcome.checkpoint,
        steps=trainer.state.step,
        tokens_seen=trainer.state.tokens_seen,
        final_metrics={**final, "win_rate": table["overall"]["win_rate"]},
        data_fingerprint=data.fingerprint,
        extra={"deliberation": {"round": round_index, "references": {k: str(v) for k, v in references.items()},
                                "win_rates": table, "selected": len(records),
                                "selected_by_source": {s: sum(r.source == s for r in records)
                                                       for s in sorted({r.source for r in records})},
                                **data.sizes},
               "expert_lr_scale": outcome.expert_lr_scale},
    )
