"""Every layout megatron-core accepts for a model on a cluster, with its memory and speed, best first.

A layout is kept when validation accepts it (the same checks as ``python -m launch``: divisibility of
heads, groups, layers, experts, sequence chunks) and the stage's global batch splits into its
micro-batches; it *fits* when its fullest pipeline stage's predicted peak (:mod:`launch.plan.memory`)
is within the card's usable memory. Fitting layouts rank by predicted tokens/s (:mod:`launch.plan.cost`);
the rest follow, smallest memory first, so an over-full cluster still shows how far off it is.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from launch.plan.cost import StepTime, step_time
from launch.plan.memory import GIB, Layout, StageMemory, peak_memory
from launch.plan.model_math import flops_per_token, freeze
from launch.validation import divisors, validate_parallel, validate_stage_sequence
from megatron_ext.errors import ConfigError


@dataclass
class Plan:
    layout: Layout
    memory: StageMemory
    time: StepTime
    fits: bool
    tokens_per_s: float
    mfu: float
    days: float
    gpu_hours: float

    def row(self) -> dict[str, Any]:
        return {"layout": self.layout.name(), "fits": self.fits, "memory_gib": self.memory.breakdown_gib(),
                "pipeline_stage": self.memory.stage, "step": self.time.as_dict(),
                "tokens_per_s": self.tokens_per_s, "mfu_datasheet": self.mfu, "days": self.days,
                "gpu_hours": self.gpu_hours}


def usable_gib(gpu: Mapping[str, Any]) -> float:
    """What a layout's predicted peak may take of the card (launch/conf/gpu: ``usable_fraction``)."""
    return float(gpu["memory_gib"]) * float(gpu["usable_fraction"])


def _virtual_stages(model: Mapping[str, Any], pp: int) -> list[int | None]:
    """None, and 2 / 4 virtual stages where they split a pipeline stage's layers (GPT family only)."""
    if pp < 2 or model.get("family") == "turbos_hybrid":
        return [None]
    per_stage = int(model["num_layers"]) // pp
    return [None] + [v for v in (2, 4) if per_stage % v == 0]


def _batch_splits(global_batch: int, micro_batch: int, dp: int, pp: int, vpp: int | None) -> bool:
    """The global batch splits into micro-batches per data-parallel rank (in multiples of PP when
    interleaved, which the schedule needs)."""
    if global_batch % (micro_batch * dp):
        return False
    return not vpp or (global_batch // (micro_batch * dp)) % pp == 0


def candidate_layouts(model: Mapping[str, Any], world: int, gpus_per_node: int, seq: int, global_batch: int,
                      micro_batches=(1, 2, 4), recompute=("none", "full"), distributed_optimizer=(True,),
                      max_pp: int = 16, max_cp: int = 16, min_cp_tokens: int = 4096) -> Iterator[Layout]:
    """Layouts validation accepts: TP within a node, PP / VPP dividing the layers, CP splitting the
    sequence, EP dividing the experts and DP x CP, the global batch a multiple of micro-batch x DP.
    Context parallelism only where each rank keeps ``min_cp_tokens`` of a sequence: below that the
    ring's per-hop latency and the small attention blocks (not in the cost model) make CP a loss
    against data parallelism."""
    experts = int(model.get("num_moe_experts") or 0)
    for tp in divisors(gpus_per_node):
        for pp in divisors(world // tp, max_pp):
            for cp in divisors(world // (tp * pp), max_cp):
                if cp > 1 and seq // cp < min_cp_tokens:
                    continue
                dp = world // (tp * pp * cp)
                parallel = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                            "expert_model_parallel_size": 1, "context_parallel_size": cp,
                            "nproc_per_node": world, "nnodes": 1, "sequence_parallel": tp > 1}
                try:
                    validate_parallel(model, parallel)
                    validate_stage_sequence({**model, "seq_length": seq}, parallel, "stage")
                except ConfigError:
                    continue
                eps = [e for e in divisors(experts) if (dp * cp) % e == 0] if experts else [1]
                for ep in eps:
                    for vpp in _virtual_stages(model, pp):
                        for mb in micro_batches:
                            if not _batch_splits(global_batch, mb, dp, pp, vpp):
                                continue
                            for rc in recompute:
                                for dist_opt in distributed_optimizer:
                                    yield Layout(tp=tp, pp=pp, ep=ep, cp=cp, dp=dp, vpp=vpp, micro_batch=mb,
                                                 recompute=rc, distributed_optimizer=dist_opt)


def evaluate(model: Mapping[str, Any], vocab: int, layout: Layout, seq: int, global_batch: int,
             gpu: Mapping[str, Any], tokens: float) -> Plan:
    memory = peak_memory(model, vocab, layout, seq, global_batch)
    time = step_time(model, vocab, layout, seq, global_batch, gpu)
    tokens_per_s = global_batch * seq / time.total
    mfu = flops_per_token(model, seq, vocab) * tokens_per_s / (layout.world * float(gpu["datasheet_bf16_tflops"]) * 1e12)
    seconds = tokens / tokens_per_s
    return Plan(layout, memory, time, memory.total <= usable_gib(gpu) * GIB, tokens_per_s, mfu, seconds / 86400,
                seconds / 3600 * layout.world)


def plan(model: Mapping[str, Any], vocab: int, world: int, gpu: Mapping[str, Any], seq: int, global_batch: int,
         tokens: float, **limits) -> list[Plan]:
    """Every candidate layout evaluated: fitting ones fastest first, then the rest smallest first."""
    model = freeze(model)
    plans = [evaluate(model, vocab, layout, seq, global_batch, gpu, tokens)
             for layout in candidate_layouts(model, world, int(gpu["gpus_per_node"]), seq, global_batch, **limits)]
    return sorted(plans, key=lambda p: (not p.fits, -p.tokens_per_s if p.fits else p.memory.total))


@dataclass(frozen=True)
class StageSpec:
    """What a pipeline stage asks of a layout: its sequence, batch, token budget, and the context
    parallelism, micro-batch and recomputation it sets for itself (None: the layout's / derived)."""
    name: str
    model: Any            # the stage's model config (model_overrides applied), frozen
    seq: int
    global_batch: int
    tokens: float
    cp: int = 1
    micro_batch: int | None = None
    recompute: str = "none"


@dataclass
class PipelinePlan:
    """One layout for every training stage of a pipeline (the parallel preset is shared)."""
    tp: int
    pp: int
    vpp: int | None
    ep: int
    stages: list[Plan]

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.stages)

    @property
    def days(self) -> float:
        return sum(p.days for p in self.stages)

    @property
    def gpu_hours(self) -> float:
        return sum(p.gpu_hours for p in self.stages)

    def name(self) -> str:
        return f"TP{self.tp} PP{self.pp}{f' VPP{self.vpp}' if self.vpp else ''} EP{self.ep}"

    def row(self) -> dict[str, Any]:
        return {"layout": self.name(), "fits": self.fits, "days": self.days, "gpu_hours": self.gpu_hours,
                "stages": [p.row() for p in self.stages]}


def plan_pipeline(stages: list[StageSpec], vocab: int, world: int, gpu: Mapping[str, Any],
                  max_pp: int = 16) -> list[PipelinePlan]:
    """Every (TP, PP, VPP, EP) that validation accepts for all stages, each stage at its own CP,
    micro-batch and recomputation; layouts that fit every stage first, fewest days first."""
    from megatron_ext.batch_sizes import micro_batch_size

    first = stages[0].model
    experts = int(first.get("num_moe_experts") or 0)
    out = []
    for tp in divisors(int(gpu["gpus_per_node"])):
        for pp in divisors(world // tp, max_pp):
            for ep in ([e for e in divisors(experts) if (world // (tp * pp)) % e == 0] if experts else [1]):
                for vpp in _virtual_stages(first, pp):
                    plans = []
                    for st in stages:
                        parallel = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                                    "expert_model_parallel_size": ep, "context_parallel_size": st.cp,
                                    "nproc_per_node": world, "nnodes": 1, "sequence_parallel": tp > 1,
                                    "virtual_pipeline_model_parallel_size": vpp}
                        try:
                            sizes = validate_parallel(st.model, parallel)
                            validate_stage_sequence(st.model, parallel, "stage")
                            mb = micro_batch_size({"micro_batch_size": st.micro_batch,
                                                   "global_batch_size": st.global_batch}, sizes["dp"], pp)
                        except ConfigError:
                            break
                        if not _batch_splits(st.global_batch, mb, sizes["dp"], pp, vpp):
                            break
                        layout = Layout(tp=tp, pp=pp, ep=ep, cp=st.cp, dp=sizes["dp"], vpp=vpp, micro_batch=mb,
                                        recompute=st.recompute)
                        plans.append(evaluate(st.model, vocab, layout, st.seq, st.global_batch, gpu, st.tokens))
                    else:
                        out.append(PipelinePlan(tp, pp, vpp, ep, plans))
    return sorted(out, key=lambda p: (not p.fits, p.days if p.fits else max(s.memory.total for s in p.stages)))
