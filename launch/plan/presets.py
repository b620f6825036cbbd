"""Write the real-size ``launch/conf/parallel`` presets the planner chooses.

    python -m launch.plan.presets            # rewrites launch/conf/parallel/{large,turbos}_{h200,h100}_*.yaml

For each model and cluster of :data:`CLUSTERS` the planner's ``plan_stage=all`` search
(:func:`launch.plan.layouts.plan_pipeline` over ``pipeline=turbos_pretrain``: main pretraining,
annealing, 32K and 256K long context, each at its stage preset's context parallelism, micro-batch and
recomputation) picks the layout with the fewest predicted days that fits every stage. Re-run after
the cost or memory model, a GPU preset or a stage preset changes; ``tests/launch/plan/test_planner.py``
fails while a preset differs from the planner's choice.
"""

from __future__ import annotations

import sys

from launch.config import CONFIG_DIR

MODELS = {"large": "hunyuan_large", "turbos": "hunyuan_turbos"}
CLUSTERS = [("h200", 32), ("h200", 128), ("h100", 64), ("h100", 256)]
PIPELINE = "turbos_pretrain"


def preset_name(model: str, gpu: str, nodes: int) -> str:
    return f"{model}_{gpu}_{nodes}nodes"


def choose(model: str, gpu: str, nodes: int):
    """The planner's best layout for every training stage of :data:`PIPELINE` (a PipelinePlan)."""
    from hydra import compose, initialize_config_dir

    from launch.plan.__main__ import planned_pipeline

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="plan", overrides=[f"model={MODELS[model]}", f"gpu={gpu}", f"nodes={nodes}",
                                                     f"pipeline={PIPELINE}", "plan_stage=all"])
    plans, header = planned_pipeline(cfg)
    best = plans[0]
    if not best.fits:
        raise SystemExit(f"{model} on {nodes} x 8 {gpu}: no layout fits every stage")
    return best, header


def render(model: str, gpu: str, nodes: int, best, header) -> str:
    stages = "\n".join(f"#   {header['stages'][i]:<18} {p.layout.name():<34} {p.memory.total / 2**30:5.0f} GiB "
                       f"{p.tokens_per_s:9.3g} tokens/s {p.mfu:6.1%} MFU {p.days:7.1f} days"
                       for i, p in enumerate(best.stages))
    vpp = best.vpp if best.vpp else "null"
    return f"""# {MODELS[model]} on {nodes} nodes x 8 {header['gpu']}: chosen by the scale planner
# (python -m launch.plan.presets; python -m launch.plan model={MODELS[model]} gpu={gpu} nodes={nodes} plan_stage=all
# shows the alternatives). Predicted per stage of pipeline={PIPELINE} (fullest pipeline stage's memory per GPU;
# {header['usable_gib_per_gpu']:.0f} GiB usable):
{stages}
# Use with cluster=slurm cluster.gpu={gpu} model={MODELS[model]} pipeline={PIPELINE}.
nproc_per_node: 8
nnodes: {nodes}
tensor_model_parallel_size: {best.tp}
pipeline_model_parallel_size: {best.pp}
virtual_pipeline_model_parallel_size: {vpp}
expert_model_parallel_size: {best.ep}
context_parallel_size: 1      # the long-context stages set their own (stage presets' parallel_overrides)
sequence_parallel: true
tp_comm_overlap: null        # null: overlap the sequence-parallel collectives on GPUs; true / false force it
use_distributed_optimizer: true
"""


def main() -> int:
    for model in MODELS:
        for gpu, nodes in CLUSTERS:
            best, header = choose(model, gpu, nodes)
            path = CONFIG_DIR / "parallel" / f"{preset_name(model, gpu, nodes)}.yaml"
            path.write_text(render(model, gpu, nodes, best, header))
            print(f"{path.name}: {best.name()}, {best.days:.0f} days")
    return 0


if __name__ == "__main__":
    sys.exit(main())
