"""Adaptive long-short CoT fusion stage (Hunyuan-TurboS post-training): sample, verify, fuse, train.

1. Sample (once; :mod:`posttrain.sampled_data`): the parent model answers each prompt ``k_short``
   times in short-thinking mode; the verifier measures each prompt's pass rate. Easy prompts keep
   their shortest verified short answer; for hard ones the long-CoT model (``fusion.long_model``, or
   the parent itself in long-thinking mode) continues the shortest failed attempt after a bridge
   until the verifier accepts (:func:`posttrain.cot_fusion.build_fused_set`).
2. Train: SFT on the fused set, each example with its mode's control token after ``[ASSISTANT]``
   (short for easy prompts, long for hard ones), so at inference the token selects the mode. With
   ``fusion.model_picks_mode`` the token is also a training target: given no mode, the model picks
   one itself (Hunyuan-TurboS' adaptive CoT), and the stage reports its choice per difficulty
   (accuracy ``auto``: ``mode_share_by_difficulty``).

Outputs in the stage folder: ``fused/records.jsonl`` (one example per kept prompt with its pass rate,
difficulty label and mode), ``fused/summary.json`` (counts, drop reasons), the checkpoint, and the
manifest (data sizes, losses, task accuracy before and after in each mode). Prompts are synthetic
verifiable tasks drawn with another seed and never from the evaluation split.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

from data_pipelines.chat_format import AUTO
from data_pipelines.prepare import prepared_tokenizer
from data_pipelines.verifiable_tasks import Task, generate_tasks, split_tasks, verify
from megatron_ext import checkpointing
from megatron_ext.errors import ConfigError
from megatron_ext.generation import Generator
from megatron_ext.stage import StageContext, StageResult
from megatron_ext.stage_training import build_stage_model
from posttrain.chat_sampling import ChatSampler, initial_task_accuracy, sampling_params, stage_task_accuracy
from posttrain.cot_fusion import FusedExample, build_fused_set, fused_to_conversations
from posttrain.sampled_data import sample_once
from posttrain.sft_data import build_sft_data, chat_examples, train_sft


def fusion_prompts(prompts_cfg, eval_cfg, seed: int) -> list[Task]:
    """Synthetic tasks with seed ``seed + seed_offset``, minus every task on the evaluation side of
    the eval preset's split (the split is by task id, so a problem drawn twice stays out)."""
    tasks = generate_tasks(list(prompts_cfg.kinds), int(prompts_cfg.num_tasks), seed + int(prompts_cfg.seed_offset),
                           difficulties=list(prompts_cfg.difficulties))
    train_side, _ = split_tasks(tasks, float(eval_cfg.held_out_fraction), seed)
    return train_side


def _held_out(item_id: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"fusion-valid:{seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def run(ctx: StageContext) -> StageResult:
    cfg, st, model_cfg = ctx.cfg, ctx.stage_cfg, ctx.model_cfg
    fusion, seed = st.fusion, int(cfg.seed)
    tokenizer = prepared_tokenizer(cfg.data, ctx.run_dir / "data", cfg.seed)
    model = build_stage_model(ctx, tokenizer)

    def produce():
        items = fusion_prompts(st.prompts, st.eval, seed)
        generator = Generator(model.chunks, model.vocab_size, max_batch_size=int(st.sampling.batch_size))
        sample = ChatSampler(generator, tokenizer, sampling_params(st.sampling, tokenizer), seed)
        sample_long = None
        if fusion.get("long_model"):
            def sample_long(requests):  # swap the long-CoT model's weights in for the long rounds
                if not getattr(sample_long, "loaded", False):
                    checkpointing.load(Path(fusion.long_model), model.chunks)
                    sample_long.loaded = True
                return sample(requests)
        result = build_fused_set(items, sample, verify, k_short=int(fusion.k_short),
                                 easy_threshold=float(fusion.easy_threshold),
                                 max_long_attempts=int(fusion.max_long_attempts), bridge=str(fusion.bridge),
                                 sample_long=sample_long, hard_fallback=str(fusion.hard_fallback))
        summary = {**result.summary(), "generation": generator.stats.as_dict()}
        return [asdict(e) for e in result.examples], summary

    records = sample_once(ctx, model.chunks, ctx.stage_dir / "fused", produce)
    examples = [FusedExample(**r) for r in records]
    if not examples:
        raise ConfigError(
            f"stage {ctx.name!r}: the fused set is empty: no short answer and no long continuation of the "
            f"parent verified (see {ctx.stage_dir / 'fused' / 'summary.json'}). Train the parent longer or "
            f"give easier prompts (stages.{ctx.name}.prompts.difficulties), then delete {ctx.stage_dir} and rerun")
    held = [_held_out(e.item_id, float(fusion.held_out_fraction), seed) for e in examples]
    train_conv = fused_to_conversations([e for e, h in zip(examples, held) if not h])
    valid_conv = fused_to_conversations([e for e, h in zip(examples, held) if h])
    picks = bool(fusion.get("model_picks_mode", False))
    data = build_sft_data(chat_examples(train_conv, tokenizer, learn_mode=picks),
                          chat_examples(valid_conv, tokenizer, learn_mode=picks),
                          int(model_cfg.seq_length), tokenizer.pad, st.get("packing"))
    modes = ("short", "long", AUTO) if picks else ("short", "long")

    def accuracy(chunks) -> dict:
        return {mode: stage_task_accuracy(chunks, tokenizer, model.vocab_size, {**st.eval, "thinking": mode}, seed,
                                          model_cfg)
                for mode in modes}

    def initial_accuracy(chunks) -> dict:
        return {mode: initial_task_accuracy(ctx, chunks, tokenizer, model.vocab_size, {**st.eval, "thinking": mode})
                for mode in modes}

    outcome, final = train_sft(ctx, tokenizer, model, data, accuracy, initial_accuracy)
    trainer = outcome.trainer
    modes = [e.mode for e in examples]
    return StageResult(
        checkpoint=outcome.checkpoint,
        steps=trainer.state.step,
        tokens_seen=trainer.state.tokens_seen,
        final_metrics=final,
        data_fingerprint=data.fingerprint,
        extra={"fused_data": {**data.sizes, "examples": len(examples), "short": modes.count("short"),
                              "long": modes.count("long"),
                              "mean_pass_rate": sum(e.pass_rate for e in examples) / max(len(examples), 1)},
               "expert_lr_scale": outcome.expert_lr_scale},
    )
