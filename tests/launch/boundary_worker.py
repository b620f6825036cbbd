"""Test worker (one process): every numeric field of the pretraining stage, the tiny_large model and the
parallel preset at its boundary values either runs the stage's first step or is refused by validation.

    boundary_worker.py <out.json> <scratch folder> [model preset, default tiny_large] [sections]

``sections``: comma-separated config sections to walk (default ``stages.pretrain.train,model,parallel``;
the train and parallel fields do not depend on the model family).

For each field: 0, 1, the value of a related field and one past it (``RELATED``; floats: 0, 1 and the
related value). Each candidate config goes through ``launch.validation.validate``; a refused one
records the message, an accepted one runs the real stage code (``megatron_ext.stage_training.
train_stage``: model, optimizer, LR schedule, restore, initial evaluation) through the first iteration of
``Trainer.fit`` (step, log, evaluation, checkpoint) on random tokens. Anything else raised is a crash:
a config that reached a worker though validation should have refused it.
"""

import json
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from launch.config import load_config
from launch.validation import validate
from megatron_ext import distributed
from megatron_ext.errors import ConfigError
from megatron_ext.quiet import quiet_known_warnings
from megatron_ext.stage import StageContext, stage_model_config

COMMON = ["pipeline.order=[pretrain]", "model.seq_length=32",
        "stages.pretrain.train.steps=6", "stages.pretrain.train.warmup_steps=2",
        "stages.pretrain.train.global_batch_size=4", "stages.pretrain.train.eval_iters=1",
        "stages.pretrain.train.eval_interval=3", "stages.pretrain.train.save_interval=3",
        "stages.pretrain.train.log_interval=1"]
TRAIN = "stages.pretrain.train"
# field -> the fields whose value (and one past it) is a boundary for it
RELATED = {
    f"{TRAIN}.warmup_steps": [f"{TRAIN}.steps"],
    f"{TRAIN}.wsd_decay_steps": [f"{TRAIN}.steps"],
    f"{TRAIN}.eval_interval": [f"{TRAIN}.steps"],
    f"{TRAIN}.save_interval": [f"{TRAIN}.steps"],
    f"{TRAIN}.log_interval": [f"{TRAIN}.steps"],
    f"{TRAIN}.micro_batch_size": [f"{TRAIN}.global_batch_size"],
    f"{TRAIN}.min_lr": [f"{TRAIN}.lr"],
    f"{TRAIN}.init_lr": [f"{TRAIN}.lr"],
    "model.num_query_groups": ["model.num_attention_heads"],
    "model.num_attention_heads": ["model.num_query_groups"],
    "model.moe_router_topk": ["model.num_moe_experts"],
    "model.cla_share_factor": ["model.num_layers"],
    "model.num_layers": ["model.cla_share_factor"],
    "model.mamba_num_groups": ["model.mamba_num_heads"],
    "model.mamba_chunk_size": ["model.seq_length"],
}
# fields the walk leaves alone: layout fields needing more processes than this one (their boundaries
# are checked by validation only: nproc_per_node 1 cannot hold them), and YAML-only bookkeeping
NOT_RUN = {"parallel.nnodes"}


def numeric_fields(cfg, sections) -> dict[str, float]:
    from omegaconf import OmegaConf

    out = {}
    for section in sections:
        node = OmegaConf.select(cfg, section)
        for key, value in OmegaConf.to_container(node, resolve=True).items():
            name = f"{section}.{key}"
            if isinstance(value, bool) or name in NOT_RUN:
                continue
            if isinstance(value, (int, float)) or (value is None and name in RELATED):
                out[name] = value
    return out


def candidates(cfg, field: str, value) -> list:
    from omegaconf import OmegaConf

    integer = not isinstance(value, float)
    values = [0, 1]
    for other in RELATED.get(field, []):
        related = OmegaConf.select(cfg, other)
        if isinstance(related, (int, float)) and not isinstance(related, bool):
            values += [related, related + 1] if integer else [related]
    if not integer:
        values = [float(v) for v in values]
    return list(dict.fromkeys(values))


def first_step(cfg, scratch: Path, env) -> float:
    """The stage's real training code up to the end of ``fit``'s first iteration; its loss."""
    from megatron_ext.stage_training import train_stage

    model = stage_model_config(cfg, "pretrain")
    seq, vocab = int(model.seq_length), int(model.vocab_size)
    g = torch.Generator().manual_seed(0)

    def sample():
        t = torch.randint(0, vocab, (seq + 1,), generator=g)
        return {"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(seq), "position_ids": torch.arange(seq)}

    data = [sample() for _ in range(16)]
    losses = []

    class FirstStepDone(Exception):
        pass

    def stop_after_first(trainer):
        real = trainer.train_step

        def step():
            if losses:
                raise FirstStepDone
            out = real()
            losses.append(out["loss"])
            return out

        trainer.train_step = step

    ctx = StageContext(name="pretrain", cfg=cfg, stage_dir=scratch, parent_checkpoint=None, env=env)
    try:
        train_stage(ctx, SimpleNamespace(vocab_size=vocab), data, data, on_trainer=stop_after_first)
    except FirstStepDone:
        pass
    return losses[0]


def main(out: str, scratch: str, model: str = "tiny_large", sections: str = f"{TRAIN},model,parallel") -> None:
    quiet_known_warnings()
    overrides = [f"model={model}", *COMMON]
    base = load_config(overrides)
    env = distributed.initialize(base.parallel, int(base.seed))
    results = []
    n = 0
    for field, value in numeric_fields(base, sections.split(",")).items():
        for candidate in candidates(base, field, value):
            if candidate == value:
                continue
            record = {"field": field, "value": candidate}
            try:
                cfg = load_config([*overrides, f"{field}={candidate}"])
                validate(cfg)
            except ConfigError as err:
                record.update(outcome="refused", message=str(err))
                results.append(record)
                continue
            n += 1
            try:
                loss = first_step(cfg, Path(scratch) / f"run{n}", env)
                record.update(outcome="ran", loss=loss)
            except Exception as err:   # noqa: BLE001 - every other failure is what this test looks for
                record.update(outcome="crashed", message=f"{type(err).__name__}: {err}",
                              where=traceback.format_exc(limit=-3))
            results.append(record)
            print(record["field"], candidate, record["outcome"], flush=True)
    Path(out).write_text(json.dumps(results, indent=1))
    distributed.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
