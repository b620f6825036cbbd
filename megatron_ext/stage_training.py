"""The training part every training stage shares: model, DDP, optimizer, trainer, resume, fit.

A stage builds its datasets (and, if it needs one, its forward step); :func:`train_stage` does the
rest the same way for all of them, so a resume, the initial evaluation recorded in the manifest and the
final metrics mean the same thing in every stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megatron.core import parallel_state

from megatron_ext import checkpointing, model_builder, optim
from megatron_ext.batch_sizes import micro_batch_size
from megatron_ext.checkpointing import latest_checkpoint
from megatron_ext.expert_lr import expert_lr_scale
from megatron_ext.metrics import MetricsWriter
from megatron_ext.stage import StageContext
from megatron_ext.trainer import StepBatches, Trainer, lm_forward_step


@dataclass
class TrainingOutcome:
    trainer: Trainer
    checkpoint: Path                # the stage's final checkpoint
    final_metrics: dict
    expert_lr_scale: float | None


@dataclass
class StageModel:
    """A stage's model chunks (DDP-wrapped), optimizer and scheduler, before any weights are loaded."""

    chunks: list
    optimizer: object
    scheduler: object
    expert_lr_scale: float | None
    vocab_size: int                 # the tokenizer's (model_vocab_size); logits beyond it are padding


def build_stage_model(ctx: StageContext, tokenizer) -> StageModel:
    """The stage's model (``ctx.model_cfg`` under ``cfg.parallel``), DDP and optimizer.

    Stages that sample from their parent before training (CoT fusion, deliberation) build it first,
    load the parent's weights and generate, then hand it to :func:`train_stage`."""
    cfg, model_cfg, train = ctx.cfg, ctx.model_cfg, ctx.stage_cfg.train
    gbs = int(train.global_batch_size)
    config = model_builder.transformer_config(model_cfg, cfg.parallel)
    vocab = model_builder.model_vocab_size(model_cfg, tokenizer)
    chunks = model_builder.build_model(model_cfg, config, model_builder.padded_vocab_size(vocab, ctx.env.tp))
    use_dist_opt = bool(cfg.parallel.use_distributed_optimizer)
    ddp_chunks = optim.wrap_ddp(chunks, config, use_dist_opt)
    lr_scale = expert_lr_scale(train.get("expert_lr"), model_cfg, gbs * int(model_cfg.seq_length),
                               field=f"stages.{ctx.name}.train.expert_lr")
    optimizer, scheduler = optim.build_optimizer(train, ddp_chunks, bf16=config.bf16,
                                                 use_distributed_optimizer=use_dist_opt,
                                                 expert_lr_scale=lr_scale)
    return StageModel(ddp_chunks, optimizer, scheduler, lr_scale, vocab)


def load_frozen_model(ctx: StageContext, tokenizer, checkpoint: Path) -> list:
    """The stage's model chunks (``ctx.model_cfg``, no DDP, no optimizer) with ``checkpoint``'s
    weights and no gradients: a reference policy, or a model only to sample from and score."""
    config = model_builder.transformer_config(ctx.model_cfg, ctx.cfg.parallel)
    vocab = model_builder.padded_vocab_size(model_builder.model_vocab_size(ctx.model_cfg, tokenizer), ctx.env.tp)
    chunks = model_builder.build_model(ctx.model_cfg, config, vocab)
    checkpointing.load(Path(checkpoint), chunks)
    for chunk in chunks:
        chunk.requires_grad_(False)
    return chunks


def train_stage(ctx: StageContext, tokenizer, train_ds, valid_ds,
                forward_step: Callable = lm_forward_step, model: StageModel | None = None,
                initial_metrics: Callable[[list], dict] | None = None, train_batches=None,
                on_trainer: Callable[[Trainer], None] | None = None) -> TrainingOutcome:
    """Train ``model`` (default: a fresh :func:`build_stage_model`) on ``train_ds`` from the stage's
    latest checkpoint, else its parent's weights; ``valid_ds`` (or None) gives the evaluation loss.

    ``initial_metrics(chunks)``, when given, measures the parent's weights before the first step
    (e.g. task accuracy); like the initial evaluation loss it is recorded once, not on a resume.
    ``train_batches`` replaces ``StepBatches(train_ds)`` (RL's rollouts); ``on_trainer(trainer)`` runs
    after the weights are restored, before the first step."""
    env, model_cfg, train = ctx.env, ctx.model_cfg, ctx.stage_cfg.train
    model = model or build_stage_model(ctx, tokenizer)
    seq_length = int(model_cfg.seq_length)
    gbs, mbs = int(train.global_batch_size), micro_batch_size(train, env.dp, env.pp)
    dp_rank = parallel_state.get_data_parallel_rank()
    trainer = Trainer(
        model.chunks, model.optimizer, model.scheduler, train,
        train_batches=train_batches or StepBatches(train_ds, mbs, gbs, dp_rank, env.dp),
        valid_batches=StepBatches(valid_ds, mbs, gbs, dp_rank, env.dp) if valid_ds is not None else None,
        checkpoint_root=ctx.stage_dir / "checkpoints",
        metrics=MetricsWriter(ctx.stage_dir / "metrics", enabled=env.is_main),
        seq_length=seq_length,
        forward_step=forward_step,
        on_checkpoint=lambda state, path: ctx.on_checkpoint(state.step, state.tokens_seen),
    )
    trainer.restore(ctx.parent_checkpoint)
    if on_trainer is not None:
        on_trainer(trainer)
    if trainer.state.resumed_from_step is None:  # a resumed attempt recorded this already
        ctx.record_metrics({"initial_valid_loss": trainer.evaluate(),
                            **(initial_metrics(trainer.chunks) if initial_metrics else {})})
    t0 = time.perf_counter()
    last = trainer.fit()
    final = {
        "train_loss": last.get("loss"),
        "valid_loss": last["valid_loss"] if last else trainer.evaluate(),
        "train_time_s": round(time.perf_counter() - t0, 3),
    }
    trainer.metrics.close()
    return TrainingOutcome(trainer, latest_checkpoint(ctx.stage_dir / "checkpoints"), final, model.expert_lr_scale)
