"""GPU memory of one training rank, per pipeline stage, for any layout of a model preset.

Counted the way our trainer allocates it (megatron-core DDP with fp32 gradient buffers, bf16 weights,
Adam, the distributed optimizer by default) and held to measured peaks: ``benchmarks/memory_breakdown.py``
records each term on a GPU, ``benchmarks/train_step_mfu.py`` the whole step's peak, and
``tests/launch/plan/test_memory_model.py`` keeps this model within 10% of every recorded peak.

Terms (bytes per rank):

- **static**: bf16 weights (2 / parameter), fp32 gradient buffers (4; ``grad_reduce_in_fp32``), fp32
  main weights (4) and Adam moments (8), the last two sharded over the data-parallel ranks (x context
  parallel) by the distributed optimizer, routed experts' over the expert-data-parallel ranks;
- **activations**: what each layer part keeps for its backward, per token of a micro-batch
  (:func:`part_activation_bytes`: the tensors our kernels save, e.g. flash attention keeps q, k, v, its
  output and log-sum-exp; the fused SwiGLU its input), times the micro-batches in flight on the
  stage (1F1B: ``pp - stage``; interleaved: Megatron-LM's ``1 + (pp - 1) / (pp x vpp)`` on top);
  sequence parallelism divides by TP, context parallelism the tokens by CP; recomputation keeps less
  (full: each layer's input only; selective keeps as much as none with flash attention);
- **transient**: the largest one-off buffer of a micro-batch's forward / backward: the logits and
  their fp32 loss buffers on the last stage, one layer's re-materialised activations under full
  recomputation, the gradients of the largest layer's activations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from launch.plan import model_math

GIB = 2**30
BF16, FP32 = 2, 4


@dataclass(frozen=True)
class Layout:
    """One way to run the model: parallel sizes, micro-batch, recomputation, optimizer sharding."""
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    dp: int = 1
    vpp: int | None = None
    micro_batch: int = 1
    recompute: str = "none"               # none | selective | full
    distributed_optimizer: bool = True

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def microbatches(self, global_batch: int) -> int:
        """Micro-batches each data-parallel rank runs per step."""
        return max(1, global_batch // (self.micro_batch * self.dp))

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1

    def name(self) -> str:
        vpp = f" VPP{self.vpp}" if self.vpp else ""
        return (f"TP{self.tp} PP{self.pp}{vpp} CP{self.cp} EP{self.ep} DP{self.dp} mb{self.micro_batch}"
                f"{'' if self.recompute == 'none' else ' ' + self.recompute}"
                f"{'' if self.distributed_optimizer else ' no-dist-opt'}")


def stage_layers(model_cfg: Mapping[str, Any], pp: int, vpp: int | None = None) -> list[list[tuple[str, ...]]]:
    """Each pipeline rank's layers (its virtual chunks' layers together), megatron-core's even split."""
    parts = model_math.layer_parts(model_cfg)
    chunks = pp * (vpp or 1)
    per = len(parts) // chunks
    stages: list[list[tuple[str, ...]]] = [[] for _ in range(pp)]
    for c in range(chunks):
        stages[c % pp].extend(parts[c * per:(c + 1) * per])
    return stages


@dataclass(frozen=True)
class StageSums:
    """Per-stage sums the planner needs for every layout with the same model, PP / VPP, TP and
    recomputation (cached: thousands of layouts share a few of them)."""
    dense_params: float             # per TP rank (sharded / TP + replicated)
    expert_params_tp: float         # routed experts / TP (divide by EP for a rank)
    kept_per_token: float           # activations the stage's layers keep, bytes per (CP-local) token
    largest_layer_per_token: float  # the largest layer's activations without recomputation
    parts: tuple[tuple[str, int], ...]   # (part, count)


@lru_cache(maxsize=4096)
def stage_sums(model_cfg: model_math.FrozenModel, pp: int, vpp: int | None, tp: int, recompute: str,
               stage: int) -> StageSums:
    layout = Layout(tp=tp, pp=pp, vpp=vpp, recompute=recompute)
    layers = stage_layers(model_cfg, pp, vpp)[stage]
    dense = expert = kept = largest = 0.0
    counts: dict[str, int] = {}
    for parts in layers:
        for part in parts:
            p = model_math.part_params(model_cfg, part)
            dense += p["sharded"] / tp + p["replicated"]
            expert += p["expert"] / tp
            counts[part] = counts.get(part, 0) + 1
        kept += layer_bytes(model_cfg, parts, layout)
        largest = max(largest, sum(part_activation_bytes(model_cfg, p, layout) for p in parts))
    return StageSums(dense, expert, kept, largest, tuple(sorted(counts.items())))


def stage_params(model_cfg: Mapping[str, Any], vocab: int, layout: Layout, stage: int) -> dict[str, float]:
    """Parameters on one rank of ``stage``: ``dense`` (TP-sharded or replicated) and ``expert``."""
    sums = stage_sums(model_math.freeze(model_cfg), layout.pp, layout.vpp, layout.tp, layout.recompute, stage)
    dense, expert = sums.dense_params, sums.expert_params_tp / layout.ep
    emb = model_math.embedding_params(model_cfg, vocab)
    if stage == 0:
        dense += emb["embedding"] / layout.tp
    if stage == layout.pp - 1:
        dense += emb["output"] / layout.tp + emb["final_norm"]
    return {"dense": dense, "expert": expert}


def static_bytes(params: Mapping[str, float], layout: Layout) -> dict[str, float]:
    n = params["dense"] + params["expert"]
    shard_dense = layout.dp * layout.cp if layout.distributed_optimizer else 1
    shard_expert = max(1, layout.dp * layout.cp // layout.ep) if layout.distributed_optimizer else 1
    sharded = params["dense"] / shard_dense + params["expert"] / shard_expert
    return {"weights": BF16 * n, "gradients": FP32 * n, "main_weights": FP32 * sharded,
            "optimizer_state": 2 * FP32 * sharded}


def part_activation_bytes(model_cfg: Mapping[str, Any], part: str, layout: Layout) -> float:
    """Bytes one layer part keeps for its backward per token of the micro-batch's (CP-local) sequence,
    on one tensor-parallel rank, without recomputation.

    Per token (h = hidden; q / kv = query / K-V widths; f = FFN width; bf16 unless noted): attention
    keeps its norm's input and the QKV projection's input (2h each), q, k, v after RoPE and, with QK
    norms, the norms' inputs (2 (q + 2kv), 2 (q + kv)), the kernel's output and the output projection's
    input copy (2q each) and the fp32 log-sum-exp; an MLP its norm's and fc1's inputs (2h each), fc1's
    output (the fused SwiGLU's input, 4f) and fc2's input (2f); a MoE layer the norm's input and output,
    the fp32 router logits and probabilities, then per routed token copy the expert input and output
    (2h each) and the expert fc1 output / fc2 input (6 f_e), plus a shared expert's 6 f_s; a Mamba2
    layer its norm's and in_proj's inputs, in_proj's output (z, xBC, dt), the conv's output, the scan's
    fp32 chunk states, its output and the gated norm's inputs, out_proj's input.
    """
    h = int(model_cfg["hidden_size"])
    tp = layout.tp
    seq_h = 1 / tp if layout.sequence_parallel else 1.0    # sequence-parallel regions split tokens over TP
    if part in ("attention", "attention_shared_kv"):
        a = model_math.attention_dims(model_cfg)
        own_kv = part == "attention"
        qkv = a["q"] + (2 * a["kv"] if own_kv else 0)
        norms = (a["q"] + (a["kv"] if own_kv else 0)) if model_cfg.get("qk_layernorm") else 0
        inner = BF16 * (qkv + norms + 2 * a["q"]) + FP32 * a["heads"]
        return BF16 * 2 * h * seq_h + inner / tp
    if part == "mlp":
        f = int(model_cfg["ffn_hidden_size"])
        return BF16 * 2 * h * seq_h + BF16 * 3 * f / tp
    if part == "moe":
        experts, topk = int(model_cfg["num_moe_experts"]), int(model_cfg["moe_router_topk"])
        fe = int(model_cfg["moe_ffn_hidden_size"])
        fs = int(model_cfg.get("moe_shared_expert_intermediate_size") or 0)
        routed = topk * moe_load_factor(model_cfg)
        return (BF16 * 2 * h * seq_h + 2 * FP32 * experts * seq_h
                + routed * (BF16 * 2 * h + BF16 * 3 * fe / tp)      # tokens gathered over TP, f_e split
                + BF16 * 3 * fs / tp)
    if part == "mamba":
        m = model_math.mamba_dims(model_cfg)
        di, gn, heads = m["d_inner"], m["G"] * m["N"], m["H"]
        projections = BF16 * ((2 * di + 2 * gn + heads) + (di + 2 * gn) + 3 * di)
        scan = MAMBA_SCAN_UNITS * FP32 * heads * m["Q"]
        return BF16 * 2 * h * seq_h + (projections + scan) / tp
    raise ValueError(f"unknown layer part {part!r}")


# The compiled SSD scan's saved intermediates (per-chunk decay and C B^T matrices, fp32 copies of x, B,
# C, dt, chunk states): not a closed form of torch.compile's choices, so measured and expressed in units
# of one fp32 value per head and chunk position (H x Q per token), which its largest terms scale with:
# memory_hybrid_mb4_layers0.5_h100.json keeps 164,432 bytes per token per Mamba2 layer (H 32, Q 128,
# d_inner 2048, G x N 1024), 123,408 of them beyond the projections' tensors = 7.53 units.
MAMBA_SCAN_UNITS = 7.53


def moe_load_factor(model_cfg: Mapping[str, Any]) -> float:
    """Routed tokens an expert rank holds, relative to a perfectly balanced share: the capacity factor
    where one caps it (recycle / capacity routing), else 1 (dropless, balanced on average)."""
    capacity = model_cfg.get("moe_expert_capacity_factor")
    return float(capacity) if capacity else 1.0


def layer_input_bytes(model_cfg: Mapping[str, Any], layout: Layout) -> float:
    """What full recomputation keeps per layer: its input (sequence-parallel sharded)."""
    return BF16 * int(model_cfg["hidden_size"]) / (layout.tp if layout.sequence_parallel else 1)


def layer_bytes(model_cfg: Mapping[str, Any], parts: tuple[str, ...], layout: Layout) -> float:
    """Per token: what one layer keeps under the layout's recomputation. Selective recomputation keeps
    as much as none on our attention: megatron-core checkpoints the core attention, which then keeps
    its inputs q, k, v, what flash attention keeps anyway (measured: 36.23 vs 36.24 GiB,
    memory_dense_mb2{,_selective}_h100.json); its output is the output projection's saved input."""
    if layout.recompute == "full":
        return layer_input_bytes(model_cfg, layout)
    return sum(part_activation_bytes(model_cfg, part, layout) for part in parts)


def in_flight(layout: Layout, stage: int, microbatches: int) -> float:
    """Micro-batches whose activations a stage holds at once (1F1B; interleaved adds Megatron-LM's
    penalty)."""
    held = min(layout.pp - stage, microbatches)
    if layout.vpp and layout.pp > 1:
        held *= 1 + (layout.pp - 1) / (layout.pp * layout.vpp)
    return held


LOGIT_BYTES = BF16 + 2 * FP32   # bf16 logits, their fp32 copy for the loss and its fp32 gradient


@dataclass
class StageMemory:
    stage: int
    params: dict[str, float]
    static: dict[str, float]
    activations: float
    transient: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.static.values()) + self.activations + max(self.transient.values(), default=0.0)

    def breakdown_gib(self) -> dict[str, float]:
        out = {k: v / GIB for k, v in self.static.items()}
        out["activations"] = self.activations / GIB
        out["transient"] = max(self.transient.values(), default=0.0) / GIB
        out["total"] = self.total / GIB
        return out


def stage_memory(model_cfg: Mapping[str, Any], vocab: int, layout: Layout, seq: int, microbatches: int,
                 stage: int) -> StageMemory:
    model_cfg = model_math.freeze(model_cfg)
    sums = stage_sums(model_cfg, layout.pp, layout.vpp, layout.tp, layout.recompute, stage)
    params = stage_params(model_cfg, vocab, layout, stage)
    static = static_bytes(params, layout)
    tokens = layout.micro_batch * seq / layout.cp
    activations = sums.kept_per_token * tokens * in_flight(layout, stage, microbatches)
    biggest = sums.largest_layer_per_token * tokens
    transient = {"layer_backward": 2 * biggest if layout.recompute == "full" else biggest}
    if stage == layout.pp - 1:
        transient["logits"] = LOGIT_BYTES * tokens * vocab / layout.tp
    return StageMemory(stage, params, static, activations, transient)


def peak_memory(model_cfg: Mapping[str, Any], vocab: int, layout: Layout, seq: int,
                global_batch: int) -> StageMemory:
    """The fullest pipeline stage's memory (the one that runs out first)."""
    stages = [stage_memory(model_cfg, vocab, layout, seq, layout.microbatches(global_batch), s)
              for s in range(layout.pp)]
    return max(stages, key=lambda s: s.total)

