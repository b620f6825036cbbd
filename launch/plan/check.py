"""Launch's memory check: refuse, before anything is submitted, a stage whose layout the planner
predicts over the GPU's memory; show the breakdown and the layouts that fit this cluster.

Runs when ``cluster.gpu`` names a card (``launch/conf/gpu``; the SLURM presets do); ``--force``
(``force=true``) skips it. Every training stage of ``pipeline.order`` is checked with its own model
overrides (sequence length), layout (context parallelism) and micro-batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

from launch.config import CONFIG_DIR
from launch.plan.layouts import usable_gib
from launch.plan.memory import GIB, Layout, peak_memory
from megatron_ext.errors import ConfigError

SUGGESTIONS = 3


def gpu_spec(name: str) -> dict[str, Any]:
    path = CONFIG_DIR / "gpu" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONFIG_DIR / "gpu").glob("*.yaml"))
        raise ConfigError(f"cluster.gpu={name!r}: no launch/conf/gpu/{name}.yaml; choose one of {known} "
                          f"(or null to skip the memory check)")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def stage_layout(cfg, name: str) -> tuple[dict, Layout, int, int]:
    """(model, layout, seq_length, global batch) of one training stage, as its worker will run it."""
    from launch.validation import validate_parallel
    from megatron_ext.batch_sizes import micro_batch_size
    from megatron_ext.stage import stage_model_config, stage_parallel_config

    model = OmegaConf.to_container(stage_model_config(cfg, name), resolve=True)
    parallel = stage_parallel_config(cfg, name)
    sizes = validate_parallel(model, parallel)
    train = cfg.stages[name].train
    mb = micro_batch_size(train, sizes["dp"], sizes["pp"], f"stages.{name}.train")
    layout = Layout(tp=sizes["tp"], pp=sizes["pp"], ep=sizes["ep"], cp=sizes["cp"], dp=sizes["dp"],
                    vpp=parallel.get("virtual_pipeline_model_parallel_size"), micro_batch=mb,
                    recompute=model.get("recompute_granularity") or "none",
                    distributed_optimizer=bool(parallel.get("use_distributed_optimizer", True)))
    return model, layout, int(model["seq_length"]), int(train.global_batch_size)


def check_memory(cfg: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for the first stage predicted not to fit ``cluster.gpu``."""
    name = cfg["cluster"].get("gpu")
    if not name or cfg.get("force"):
        return
    gpu = gpu_spec(str(name))
    usable = usable_gib(gpu)
    for stage in cfg["pipeline"]["order"]:
        st = cfg["stages"][stage]
        if st.get("kind") == "evaluate" or "train" not in st:
            continue
        model, layout, seq, gbs = stage_layout(cfg, stage)
        vocab = int(model.get("vocab_size") or 0)
        if vocab <= 0:
            continue   # tokenizer-sized vocab: known only after the data stage; nothing to predict from
        mem = peak_memory(model, vocab, layout, seq, gbs)
        if mem.total / GIB <= usable:
            continue
        parts = ", ".join(f"{k} {v:.1f}" for k, v in mem.breakdown_gib().items() if k != "total")
        raise ConfigError(
            f"stages.{stage}: layout {layout.name()} is predicted to need {mem.total / GIB:.1f} GiB per GPU "
            f"(pipeline stage {mem.stage}: {parts} GiB) but a {gpu['name']} has {usable:.0f} GiB usable "
            f"(launch/plan/memory.py; launch/conf/gpu/{name}.yaml). {suggestions(model, vocab, layout, gpu, seq, gbs)} "
            f"Run `python -m launch.plan model=... gpu={name} nodes={layout.world // int(gpu['gpus_per_node'])} "
            f"plan_stage={stage}` for the full table, or pass --force to submit anyway."
        )


def suggestions(model, vocab: int, layout: Layout, gpu: Mapping[str, Any], seq: int, gbs: int) -> str:
    from launch.plan.layouts import plan

    plans = [p for p in plan(model, vocab, layout.world, gpu, seq, gbs, tokens=1.0) if p.fits][:SUGGESTIONS]
    if not plans:
        return (f"No layout of this model fits {layout.world} GPUs of this kind at seq {seq}: use more nodes "
                f"or a larger card.")
    rows = "; ".join(f"{p.layout.name()} ({p.memory.total / GIB:.0f} GiB, {p.tokens_per_s:.3g} tokens/s)"
                     for p in plans)
    return f"Layouts that fit these {layout.world} GPUs, fastest first: {rows}."
