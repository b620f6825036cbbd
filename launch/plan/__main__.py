"""``python -m launch.plan model=hunyuan_turbos gpu=h200 nodes=128``: the scale planner's table.

Same config tree as ``python -m launch`` (``launch/conf/plan.yaml`` adds ``gpu``, ``nodes``, ``stage``,
``tokens``, ``top``, ``json``). Reading the table: ``mem`` is the fullest pipeline stage's predicted peak
per GPU (``weights`` bf16, ``grads`` fp32 buffers, ``optim`` fp32 main weights + Adam moments after the
distributed optimizer's sharding, ``act`` activations of the micro-batches in flight, ``tmp`` the
largest one-off buffer); ``step`` the predicted optimizer step (compute + pipeline bubble + the
communication not hidden); tokens/s for the whole cluster; MFU against the datasheet peak; days and
GPU-hours for the token budget. Layouts that do not fit come last, marked ``no``. ``--json`` (or
``json=true``) prints every layout with its whole breakdown, for scripts.
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from megatron_ext.errors import ConfigError


def planned(cfg: DictConfig) -> tuple[list, dict]:
    from launch.plan.layouts import plan, usable_gib
    from megatron_ext.stage import stage_model_config

    if cfg.plan_stage not in cfg.stages:
        raise ConfigError(f"plan_stage={cfg.plan_stage!r} is not a stage of pipeline {cfg.pipeline.name!r}: "
                          f"choose one of {sorted(cfg.stages)} or all")
    model = OmegaConf.to_container(stage_model_config(cfg, cfg.plan_stage), resolve=True)
    train = cfg.stages[cfg.plan_stage].train
    seq, gbs = int(model["seq_length"]), int(train.global_batch_size)
    tokens = float(cfg.tokens) if cfg.tokens else float(train.steps) * gbs * seq
    gpu = OmegaConf.to_container(cfg.gpu, resolve=True)
    vocab = int(model.get("vocab_size") or 0)
    if vocab <= 0:
        raise ConfigError("model.vocab_size is not set: the planner needs the tokenizer's size")
    world = int(cfg.nodes) * int(gpu["gpus_per_node"])
    plans = plan(model, vocab, world, gpu, seq, gbs, tokens, micro_batches=tuple(cfg.micro_batches),
                 recompute=tuple(cfg.recompute), distributed_optimizer=tuple(cfg.distributed_optimizer),
                 max_pp=int(cfg.max_pp), max_cp=int(cfg.max_cp),
                 min_cp_tokens=int(cfg.min_cp_tokens))
    header = {"model": cfg.model.get("family"), "gpu": gpu["name"], "nodes": int(cfg.nodes), "gpus": world,
              "stage": cfg.plan_stage, "seq_length": seq, "global_batch": gbs, "tokens": tokens,
              "usable_gib_per_gpu": usable_gib(gpu),
              "layouts": len(plans), "fitting": sum(p.fits for p in plans)}
    return plans, header


def stage_specs(cfg: DictConfig) -> list:
    """The pipeline's training stages as the planner sees them (launch.plan.layouts.StageSpec)."""
    from launch.plan.layouts import StageSpec
    from launch.plan.model_math import freeze
    from megatron_ext.stage import stage_model_config

    specs = []
    for name in cfg.pipeline.order:
        st = cfg.stages[name]
        if st.get("kind") == "evaluate" or "train" not in st:
            continue
        model = freeze(stage_model_config(cfg, name))
        seq, gbs = int(model["seq_length"]), int(st.train.global_batch_size)
        cp = (st.get("parallel_overrides") or {}).get("context_parallel_size") or 1
        specs.append(StageSpec(name, model, seq, gbs, float(st.train.steps) * gbs * seq, int(cp),
                               st.train.get("micro_batch_size"), model.get("recompute_granularity") or "none"))
    return specs


def pipeline_table(plans: list, header: dict, top: int) -> str:
    stages = header["stages"]
    lines = [f"{header['gpus']} x {header['gpu']} ({header['nodes']} nodes), pipeline {header['pipeline']}: "
             f"one parallel layout for {len(stages)} stages ({', '.join(stages)}); {header['fitting']} of "
             f"{header['layouts']} layouts fit every stage in {header['usable_gib_per_gpu']:.0f} GiB per GPU",
             f"{'layout':<22}{'fits':>5}" + "".join(f"{s[:18]:>24}" for s in stages) + f"{'days':>8}{'GPU-h':>10}",
             f"{'':<27}" + "".join(f"{'GiB / tok/s / days':>24}" for _ in stages)]
    for p in plans[:top]:
        cells = "".join(f"{s.memory.total / 2**30:>8.0f}{s.tokens_per_s:>9.3g}{s.days:>7.1f}" for s in p.stages)
        lines.append(f"{p.name():<22}{'yes' if p.fits else 'no':>5}{cells}{p.days:>8.1f}{p.gpu_hours:>10.3g}")
    lines.append("each stage at its own context parallelism, micro-batch and recomputation (stage presets); "
                 "memory: the fullest pipeline stage's predicted peak per GPU")
    return "\n".join(lines)


def planned_pipeline(cfg: DictConfig) -> tuple[list, dict]:
    from launch.plan.layouts import plan_pipeline, usable_gib

    specs = stage_specs(cfg)
    if not specs:
        raise ConfigError(f"pipeline {cfg.pipeline.name!r} has no training stage to plan")
    gpu = OmegaConf.to_container(cfg.gpu, resolve=True)
    vocab = int(specs[0].model.get("vocab_size") or 0)
    if vocab <= 0:
        raise ConfigError("model.vocab_size is not set: the planner needs the tokenizer's size")
    world = int(cfg.nodes) * int(gpu["gpus_per_node"])
    plans = plan_pipeline(specs, vocab, world, gpu, max_pp=int(cfg.max_pp))
    header = {"model": cfg.model.get("family"), "gpu": gpu["name"], "nodes": int(cfg.nodes), "gpus": world,
              "pipeline": cfg.pipeline.name, "stages": [s.name for s in specs],
              "usable_gib_per_gpu": usable_gib(gpu),
              "layouts": len(plans), "fitting": sum(p.fits for p in plans)}
    return plans, header


def table(plans: list, header: dict, top: int) -> str:
    lines = [f"{header['gpus']} x {header['gpu']} ({header['nodes']} nodes), stage {header['stage']}: "
             f"seq {header['seq_length']}, global batch {header['global_batch']}, {header['tokens']:.3g} tokens; "
             f"{header['fitting']} of {header['layouts']} layouts fit {header['usable_gib_per_gpu']:.0f} GiB per GPU",
             f"{'layout':<38}{'fits':>5}{'mem':>7}{'weights':>8}{'grads':>7}{'optim':>7}{'act':>7}{'tmp':>6}"
             f"{'step s':>8}{'comm s':>8}{'tok/s':>10}{'MFU':>6}{'days':>8}{'GPU-h':>10}"]
    for p in plans[:top]:
        g, t = p.memory.breakdown_gib(), p.time
        comm = t.tp_s + t.ep_s + t.cp_s + t.pp_s + t.dp_s
        lines.append(f"{p.layout.name():<38}{'yes' if p.fits else 'no':>5}{g['total']:>7.1f}{g['weights']:>8.1f}"
                     f"{g['gradients']:>7.1f}{g['main_weights'] + g['optimizer_state']:>7.1f}{g['activations']:>7.1f}"
                     f"{g['transient']:>6.1f}{t.total:>8.2f}{comm:>8.2f}{p.tokens_per_s:>10.3g}{p.mfu:>6.1%}"
                     f"{p.days:>8.1f}{p.gpu_hours:>10.3g}")
    lines.append("memory in GiB per GPU (fullest pipeline stage); step time from launch/plan/cost.py's model, "
                 "calibrated on benchmarks/results (see launch/conf/gpu/*.yaml for what is measured)")
    return "\n".join(lines)


@hydra.main(config_path="../conf", config_name="plan", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    whole = cfg.plan_stage == "all"
    try:
        plans, header = planned_pipeline(cfg) if whole else planned(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    if cfg.json:
        print(json.dumps({**header, "plans": [p.row() for p in plans]}, indent=1))
    else:
        print((pipeline_table if whole else table)(plans, header, int(cfg.top)))


def main() -> None:
    """``--json`` is ``json=true`` (as ``python -m launch``'s flags); the rest goes to Hydra."""
    if "--json" in sys.argv[1:]:
        sys.argv = [a for a in sys.argv if a != "--json"] + ["json=true"]
    _main()


if __name__ == "__main__":
    main()
