"""Causal-LM pretraining stage: a data mix, a Hunyuan-style model, megatron-core training.

Main pretraining and annealing are this one stage with different configs (``stage/pretrain.yaml``:
warm-up + cosine on the main mix; ``stage/anneal.yaml``: a higher-quality mix, LR decaying to its
floor, starting from the previous stage's weights).
"""

from __future__ import annotations



from data_pipelines.gpt_datasets import build_gpt_datasets
from data_pipelines.prepare import data_fingerprint, prepare_data
from data_pipelines.tokenizer import load_tokenizer
from megatron_ext.stage import StageContext, StageResult
from megatron_ext.stage_training import train_stage


def run(ctx: StageContext) -> StageResult:
    cfg, st, model_cfg = ctx.cfg, ctx.stage_cfg, ctx.model_cfg
    train = st.train
    seq_length = int(model_cfg.seq_length)
    data_dir = ctx.run_dir / "data"
    prepared = prepare_data(cfg.data, data_dir, cfg.seed)
    mix = cfg.data.mixes[st.mix]
    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    gbs, steps = int(train.global_batch_size), int(train.steps)
    train_ds, valid_ds = build_gpt_datasets(
        prepared, mix, seq_length,
        train_samples=steps * gbs,
        valid_samples=int(train.eval_iters) * gbs,
        seed=int(cfg.seed),
        split=cfg.data.split,
        cache_dir=data_dir / "cache",
    )

    outcome = train_stage(ctx, tokenizer, train_ds, valid_ds)
    return StageResult(
        checkpoint=outcome.checkpoint,
        steps=outcome.trainer.state.step,
        tokens_seen=outcome.trainer.state.tokens_seen,
        final_metrics=outcome.final_metrics,
        data_fingerprint=data_fingerprint(prepared, mix),
        extra={"data_mix": dict(mix),
               "data_inputs": {source: prepared.fingerprints[source] for source in mix if mix[source] > 0},
               "data_stats": prepared.stats, "expert_lr_scale": outcome.expert_lr_scale},
    )
