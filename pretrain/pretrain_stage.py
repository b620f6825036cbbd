"""Causal-LM pretraining stage: a data mix, a Hunyuan-style model, megatron-core training.

Main pretraining and annealing are this one stage with different configs (``stage/pretrain.yaml``:
warm-up + cosine on the main mix; ``stage/anneal.yaml``: a higher-quality mix, LR decaying to its
floor, starting from the previous stage's weights).
"""

from __future__ import annotations

import time

from megatron.core import parallel_state

from data_pipelines.gpt_datasets import build_gpt_datasets
from data_pipelines.prepare import data_fingerprint, prepare_data
from data_pipelines.tokenizer import load_tokenizer
from megatron_ext import model_builder, optim
from megatron_ext.checkpointing import latest_checkpoint
from megatron_ext.expert_lr import expert_lr_scale
from megatron_ext.metrics import MetricsWriter
from megatron_ext.stage import StageContext, StageResult
from megatron_ext.trainer import StepBatches, Trainer


def run(ctx: StageContext) -> StageResult:
    cfg, st, env, model_cfg = ctx.cfg, ctx.stage_cfg, ctx.env, ctx.model_cfg
    train = st.train
    seq_length = int(model_cfg.seq_length)
    data_dir = ctx.run_dir / "data"
    prepared = prepare_data(cfg.data, data_dir, cfg.seed)
    mix = cfg.data.mixes[st.mix]
    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    gbs, mbs, steps = int(train.global_batch_size), int(train.micro_batch_size), int(train.steps)
    train_ds, valid_ds = build_gpt_datasets(
        prepared, mix, seq_length,
        train_samples=steps * gbs,
        valid_samples=int(train.eval_iters) * gbs,
        seed=int(cfg.seed),
        split=cfg.data.split,
        cache_dir=data_dir / "cache",
    )

    config = model_builder.transformer_config(model_cfg, cfg.parallel)
    vocab = model_builder.padded_vocab_size(model_builder.model_vocab_size(model_cfg, tokenizer), env.tp)
    chunks = model_builder.build_model(model_cfg, config, vocab)
    use_dist_opt = bool(cfg.parallel.use_distributed_optimizer)
    ddp_chunks = optim.wrap_ddp(chunks, config, use_dist_opt)
    lr_scale = expert_lr_scale(train.get("expert_lr"), model_cfg, gbs * seq_length,
                               field=f"stages.{ctx.name}.train.expert_lr")
    optimizer, scheduler = optim.build_optimizer(train, ddp_chunks, bf16=config.bf16,
                                                 use_distributed_optimizer=use_dist_opt,
                                                 expert_lr_scale=lr_scale)
    dp_rank = parallel_state.get_data_parallel_rank()
    trainer = Trainer(
        ddp_chunks, optimizer, scheduler, train,
        train_batches=StepBatches(train_ds, mbs, gbs, dp_rank, env.dp),
        valid_batches=StepBatches(valid_ds, mbs, gbs, dp_rank, env.dp) if valid_ds is not None else None,
        checkpoint_root=ctx.stage_dir / "checkpoints",
        metrics=MetricsWriter(ctx.stage_dir / "metrics", enabled=env.is_main),
        seq_length=seq_length,
        on_checkpoint=lambda state, path: ctx.on_checkpoint(state.step, state.tokens_seen),
    )
    trainer.restore(ctx.parent_checkpoint)
    if trainer.state.resumed_from_step is None:  # a resumed attempt recorded this already
        ctx.record_metrics({"initial_valid_loss": trainer.evaluate()})
    t0 = time.perf_counter()
    last = trainer.fit()
    final = {
        "train_loss": last.get("loss"),
        "valid_loss": last["valid_loss"] if last else trainer.evaluate(),
        "train_time_s": round(time.perf_counter() - t0, 3),
    }
    trainer.metrics.close()
    return StageResult(
        checkpoint=latest_checkpoint(ctx.stage_dir / "checkpoints"),
        steps=trainer.state.step,
        tokens_seen=trainer.state.tokens_seen,
        final_metrics=final,
        data_fingerprint=data_fingerprint(prepared, mix),
        extra={"data_mix": dict(mix),
               "data_inputs": {source: prepared.fingerprints[source] for source in mix if mix[source] > 0},
               "data_stats": prepared.stats, "expert_lr_scale": lr_scale},
    )
