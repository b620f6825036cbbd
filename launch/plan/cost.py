"""Step time of a layout: a cost model calibrated on our own GPU measurements, stated as such.

Compute: each layer part's model FLOPs (:mod:`launch.plan.model_math`) on a rank, at the fraction of
the GPU's measured matmul peak that our training step reaches for that kind of layer (``efficiency`` in
``launch/conf/gpu/*.yaml``: ``dense`` = attention and MLP layers and the output layer, ``moe`` = router,
routed and shared experts, ``mamba`` = Mamba2 mixers), fitted by :func:`calibrate` on the one-GPU
``benchmarks/train_step_mfu.py`` runs (micro-batch 4: host overhead is in the figures, so smaller
micro-batches are predicted optimistic). Recomputation adds the recomputed forward (full: a third of the
layers' FLOPs; selective: a third of the attention core's). Pipeline bubble: ``(pp - 1) / (m x vpp)``.

Communication, at the measured NVLink collective bandwidth inside a node and an assumed network
bandwidth between nodes (``intra_node_gbps`` / ``inter_node_gbps``), none of it assumed hidden behind
compute except the context-parallel ring (it overlaps by construction): sequence-parallel all-gathers /
reduce-scatters (5 per layer part and micro-batch, as counted in the TP2 profile), MoE token dispatch
over TP x EP (4 per MoE layer and micro-batch: megatron-core's all-gather dispatcher), the ring's K/V
hops beyond the attention compute they overlap, pipeline sends, and once per step the distributed
optimizer's gradient reduce-scatter (fp32) and parameter all-gather (bf16) over the data-parallel ranks
(``overlap_grad_reduce`` is off in ``megatron_ext.optim.wrap_ddp``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.plan import model_math
from launch.plan.memory import BF16, FP32, Layout, stage_params, stage_sums

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
CALIBRATION_RUNS = {"dense": "train_step_dense_mb4", "moe": "train_step_moe_mb4", "mamba": "train_step_hybrid_mb4"}
SP_COLLECTIVES_PER_PART = 5      # all-gather before / reduce-scatter after, both ways, inputs re-gathered
DISPATCH_COLLECTIVES = 4         # tokens gathered and reduced, forward and backward


def part_class(part: str) -> str:
    return "dense" if part in ("attention", "attention_shared_kv", "mlp") else part


def part_flops(model_cfg: Mapping[str, Any], part: str, seq: int, vocab: int) -> float:
    """Training FLOPs per token of one layer part (the terms of ``model_math.flops_per_token``)."""
    params = model_math.matmul_params(model_cfg, vocab)
    if part.startswith("attention"):
        return 6 * params["attention"] + model_math.attention_core_flops(model_cfg, seq)
    if part == "mamba":
        return 6 * params["mamba"] + 3 * model_math.ssd_forward_flops(model_cfg)
    return 6 * params[part]


# Layer time with recomputation / without, measured on the dense shape at micro-batch 2 (H200):
# train_step_dense_selective_h200.json 3.682 s, train_step_dense_full_h200.json 4.690 s against
# train_step_dense_h200.json 2.738 s. More than the recomputed FLOPs alone (x1.05 / x1.33): the
# recomputed forward runs at the small-kernel, host-bound end of the step.
RECOMPUTE_TIME = {"none": 1.0, "selective": 3.682 / 2.738, "full": 4.690 / 2.738}


@dataclass
class StepTime:
    compute_s: float
    bubble_s: float
    tp_s: float
    ep_s: float
    cp_s: float
    pp_s: float
    dp_s: float

    @property
    def total(self) -> float:
        return self.compute_s + self.bubble_s + self.tp_s + self.ep_s + self.cp_s + self.pp_s + self.dp_s

    def as_dict(self) -> dict[str, float]:
        return {**{k: round(v, 4) for k, v in vars(self).items()}, "total_s": round(self.total, 4)}


def _bandwidth(gpu: Mapping[str, Any], group_span: int) -> float:
    """Bytes/s for a collective whose ranks lie ``group_span`` ranks apart at most."""
    gbps = gpu["intra_node_gbps"] if group_span <= int(gpu["gpus_per_node"]) else gpu["inter_node_gbps"]
    return float(gbps) * 1e9


def step_time(model_cfg: Mapping[str, Any], vocab: int, layout: Layout, seq: int, global_batch: int,
              gpu: Mapping[str, Any]) -> StepTime:
    """Predicted time of one optimizer step (the slowest pipeline stage's)."""
    model_cfg = model_math.freeze(model_cfg)
    eff, peak = gpu["efficiency"], float(gpu["matmul_tflops"]) * 1e12
    host = float(gpu["host_ms_per_part"]) / 1e3
    m = layout.microbatches(global_batch)
    tokens = layout.micro_batch * seq / layout.cp                      # a micro-batch's tokens on a rank
    h = int(model_cfg["hidden_size"])
    collective = tokens * h * BF16
    worst = None
    for s in range(layout.pp):
        sums = stage_sums(model_cfg, layout.pp, layout.vpp, layout.tp, layout.recompute, s)
        counts = dict(sums.parts)
        parts_n = sum(counts.values())
        attention_n = sum(n for part, n in counts.items() if part.startswith("attention"))
        layers_s = sum(tokens * n * part_flops(model_cfg, part, seq, vocab) / layout.tp
                       / (float(eff[part_class(part)]) * peak) for part, n in counts.items())
        layers_s = (layers_s + parts_n * host) * RECOMPUTE_TIME[layout.recompute]
        if s == layout.pp - 1:
            layers_s += tokens * 6 * h * vocab / layout.tp / (float(eff["dense"]) * peak)
        compute = m * layers_s
        tp = 0.0
        if layout.tp > 1:
            tp = (m * parts_n * SP_COLLECTIVES_PER_PART * collective * (layout.tp - 1) / layout.tp
                  / _bandwidth(gpu, layout.tp))
        ep = 0.0
        group = layout.tp * layout.ep
        if counts.get("moe") and group > 1:
            ep = m * counts["moe"] * DISPATCH_COLLECTIVES * collective * (group - 1) / group / _bandwidth(
                gpu, layout.tp * layout.cp * layout.ep)
        cp = 0.0
        if layout.cp > 1 and attention_n:
            a = model_math.attention_dims(model_cfg)
            kv_bytes = 2 * a["kv"] * tokens * BF16 / layout.tp
            ring = 3 * (layout.cp - 1) * kv_bytes / _bandwidth(gpu, layout.tp * layout.cp)   # K/V out, K/V + dK/dV back
            core = tokens * model_math.attention_core_flops(model_cfg, seq) / layout.tp / (float(eff["dense"]) * peak)
            cp = m * attention_n * max(0.0, ring - core * (layout.cp - 1) / layout.cp)   # hops beside their blocks
        pp = 0.0
        if layout.pp > 1:
            pp = 2 * m * collective / layout.tp / _bandwidth(gpu, layout.world)   # one send each way
        params = stage_params(model_cfg, vocab, layout, s)
        dp = 0.0
        dense_group = layout.dp * layout.cp
        span = layout.tp * layout.cp * layout.dp
        # distributed optimizer: fp32 gradients reduce-scattered, bf16 weights all-gathered; without it
        # the fp32 gradients are all-reduced (twice a reduce-scatter's traffic)
        per_param = FP32 + BF16 if layout.distributed_optimizer else 2 * FP32
        if dense_group > 1:
            dp += params["dense"] * per_param * (dense_group - 1) / dense_group / _bandwidth(gpu, span)
        expert_group = dense_group // layout.ep
        if expert_group > 1:
            dp += params["expert"] * per_param * (expert_group - 1) / expert_group / _bandwidth(gpu, span)
        bubble = compute * (layout.pp - 1) / (m * (layout.vpp or 1))
        t = StepTime(compute, bubble, tp, ep, cp, pp, dp)
        if worst is None or t.total > worst.total:
            worst = t
    return worst


# Same-commit pairs of one-GPU runs at micro-batch 2 and 4 (the mb4 step recorded as the two-GPU
# runs' one-GPU reference): 8 more micro-batches a step cost this much more host time per layer part.
HOST_PAIRS = {"dense": ("train_step_dense_h200", "train_step_dense_tp2_mb4_h200"),
              "moe": ("train_step_moe_mb2_h200", "train_step_moe_ep2_mb4_h200")}


def _parts(cfg) -> list[str]:
    return [part for parts in model_math.layer_parts(cfg) for part in parts]


def calibrate(results: Path = RESULTS, gpu_kind: str = "h200") -> dict[str, float]:
    """``host_ms_per_part`` and ``efficiency`` of ``launch/conf/gpu/<kind>.yaml`` from recorded runs.

    Host time per layer part and micro-batch: the mb2 - mb4 step time of :data:`HOST_PAIRS` over the
    extra micro-batches x parts. Efficiencies, after each run's host time: ``dense`` from the dense
    shape, then ``moe`` from the MoE shape's time left after its attention layers, ``mamba`` from the
    hybrid's left after its attention and MoE layers (each at micro-batch 4)."""
    from benchmarks.train_step_mfu import SEQ, VOCAB, run_layout   # the shapes' definitions
    from launch.config import load_config

    def load(stem):
        path = results / f"{stem}.json"
        return json.loads(path.read_text()) if path.exists() else None

    extra_s = extra_parts = 0
    for shape, (mb2, mb4) in HOST_PAIRS.items():
        small, large = load(mb2), load(mb4)
        if small and large:
            extra_s += small["step_s"] - large["vs_one_gpu"]["step_s"]
            extra_parts += (small["micro_batches_per_rank"] - large["micro_batches_per_rank"]) * len(
                _parts(load_config(run_layout(shape)[0]).model))
    host = extra_s / extra_parts
    out: dict[str, float] = {"host_ms_per_part": host * 1e3}
    eff: dict[str, float] = {}
    for cls, stem in CALIBRATION_RUNS.items():
        run = load(f"{stem}_{gpu_kind}")
        if run is None:
            continue   # not measured on this kind: the YAML says whose figure it uses
        shape = {"dense": "dense", "moe": "moe", "mamba": "hybrid"}[cls]
        cfg = load_config(run_layout(shape)[0]).model
        peak = float(run["matmul_peak_tflops"]) * 1e12
        tokens = run["tokens_per_step"]
        parts = _parts(cfg)
        known = host * len(parts) * run["micro_batches_per_rank"]
        other = 0.0
        for part in parts:
            f = part_flops(cfg, part, SEQ, VOCAB) * tokens
            if part_class(part) == cls:
                other += f
            else:
                known += f / (eff[part_class(part)] * peak)
        if cls == "dense":
            other += 6 * int(cfg["hidden_size"]) * VOCAB * tokens
        else:
            known += 6 * int(cfg["hidden_size"]) * VOCAB * tokens / (eff["dense"] * peak)
        eff[cls] = other / ((run["step_s"] - known) * peak)
    out.update(eff)
    return out


if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else "h200"
    print(json.dumps({k: round(v, 3) for k, v in calibrate(gpu_kind=kind).items()}))
