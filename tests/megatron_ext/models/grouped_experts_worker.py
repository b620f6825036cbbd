"""Test worker (torchrun, 1 or 2 processes; expert parallelism = world size): our TorchGroupedMLP
(:mod:`megatron_ext.models.grouped_experts`) against megatron-core's SequentialMLP.

    grouped_experts_worker.py <tmp_dir> <out.json> [ep|tp]

``tp`` (2 processes): expert tensor parallelism 2 instead; checks only that the checkpoints of the two
modules hold the same global tensors (each rank's SwiGLU halves land where SequentialMLP's do).

Builds one MoE layer (shared expert + 4 routed SwiGLU experts, top-2) with SequentialMLP experts and
megatron-core's allgather dispatcher, saves it with dist_checkpointing, and loads that checkpoint into
the same layer built with TorchGroupedMLP experts (with every expert on the rank, moe_dispatch gives it the
sync-free dispatcher): the weights travel through the sharded keys both modules declare. Both layers,
and bf16 copies of both, then run the same tokens (different per rank); records the largest output,
input-gradient and expert-weight-gradient differences, plus the bf16 errors of both against the fp32
SequentialMLP. The same with capacity routing (drop mode): megatron-core's permutation while tokens
are dropped, the sync-free one under generation's dropless routing.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

from megatron_ext import distributed
from megatron_ext.quiet import quiet_known_warnings

SEQ, BATCH, HIDDEN, EXPERTS, FFN = 6, 3, 32, 4, 48


def build(grouped: bool, dtype: torch.dtype, capacity: float | None = None, tp: int = 1):
    """One MoE layer; with ``capacity``, routed in ``drop`` mode (capacity factor ``capacity``)."""
    from megatron.core.transformer import TransformerConfig
    from megatron_ext.mcore_compat import build_spec

    from megatron_ext.models import moe_dispatch, recycle_routing

    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_moe_experts=EXPERTS,
        moe_router_topk=2, moe_ffn_hidden_size=FFN, moe_shared_expert_intermediate_size=FFN,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        moe_token_dispatcher_type="allgather", use_cpu_initialization=True,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False, params_dtype=dtype,
        bf16=True,   # grouped experts need the flag; params_dtype decides the arithmetic
        expert_model_parallel_size=int(os.environ.get("WORLD_SIZE", 1)) // tp,
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
        moe_router_load_balancing_type="none", init_method_std=0.3, moe_router_dtype="fp32",
        moe_expert_capacity_factor=capacity,
    )
    recycle_routing.use_grouped_gemm = lambda config: grouped
    mode = "dropless" if capacity is None else "drop"
    layer = build_spec(recycle_routing.moe_module_spec(config, mode), config=config)
    layer.set_layer_number(1)
    moe_dispatch.install(layer)   # as model_builder.build_model does
    return layer


def run(layer, x, padding_mask=None):
    x = x.clone().requires_grad_()
    out, _ = layer(x, padding_mask=padding_mask)
    g = torch.Generator().manual_seed(7 + int(os.environ.get("RANK", 0)))
    out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
    return out.detach().float(), x.grad.float()


def expert_grads(layer) -> torch.Tensor:
    """Every local expert's fc1 then fc2 weight gradient, in SequentialMLP's [out, in] layout."""
    experts = layer.experts
    if hasattr(experts, "local_experts"):
        return torch.cat([torch.cat([e.linear_fc1.weight.grad.flatten(), e.linear_fc2.weight.grad.flatten()])
                          for e in experts.local_experts]).float()
    w1, w2 = experts.weight1.grad, experts.weight2.grad   # stacked, each expert [out, in]
    return torch.cat([torch.cat([a.flatten(), b.flatten()]) for a, b in zip(w1, w2)]).float()


def tp_checkpoints(tmp: str, out: str) -> None:
    """Expert TP2: SequentialMLP's checkpoint into TorchGroupedMLP and back, weight for weight."""
    from megatron.core import dist_checkpointing

    distributed.initialize({"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
                            "expert_model_parallel_size": 1}, seed=0)
    rank = torch.distributed.get_rank()
    paths = [os.path.join(tmp, name) for name in ("tp_sequential", "tp_grouped")]
    if rank == 0:
        for path in paths:
            os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    sequential = build(False, torch.float32, tp=2)
    dist_checkpointing.save(sequential.sharded_state_dict(), paths[0])
    grouped = build(True, torch.float32, tp=2)
    grouped.load_state_dict(dist_checkpointing.load(grouped.sharded_state_dict(), paths[0]))
    local = [(e.linear_fc1.weight, e.linear_fc2.weight) for e in sequential.experts.local_experts]
    diff = max(max(float((grouped.experts.weight1[i] - fc1).abs().max()),
                   float((grouped.experts.weight2[i] - fc2).abs().max())) for i, (fc1, fc2) in enumerate(local))
    dist_checkpointing.save(grouped.sharded_state_dict(), paths[1])
    reloaded = build(False, torch.float32, tp=2)
    reloaded.load_state_dict(dist_checkpointing.load(reloaded.sharded_state_dict(), paths[1]))
    back = max(float((a - b).abs().max()) for a, b in
               zip(sequential.state_dict().values(), reloaded.state_dict().values()) if isinstance(a, torch.Tensor))
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"module": type(grouped.experts).__name__, "into_grouped": diff, "round_trip": back,
                       "weight1_shape": list(grouped.experts.weight1.shape)}, f)
    distributed.destroy()


def main(tmp: str, out: str) -> None:
    from megatron.core import dist_checkpointing

    quiet_known_warnings()
    world = int(os.environ.get("WORLD_SIZE", 1))
    distributed.initialize({"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                            "expert_model_parallel_size": world}, seed=0)
    rank = torch.distributed.get_rank()
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(100 + rank))
    results = {"world": world}
    ckpt = os.path.join(tmp, "sequential")
    if rank == 0:
        os.makedirs(ckpt, exist_ok=True)
    torch.distributed.barrier()
    sequential = build(False, torch.float32)
    dist_checkpointing.save(sequential.sharded_state_dict(), ckpt)
    grouped = build(True, torch.float32)
    assert type(grouped.experts).__name__ == "TorchGroupedMLP", type(grouped.experts)
    grouped.load_state_dict(dist_checkpointing.load(grouped.sharded_state_dict(), ckpt))
    # and back: TorchGroupedMLP's checkpoint (what a GPU run saves) into a fresh SequentialMLP layer
    back = os.path.join(tmp, "grouped")
    if rank == 0:
        os.makedirs(back, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(grouped.sharded_state_dict(), back)
    reloaded = build(False, torch.float32)
    reloaded.load_state_dict(dist_checkpointing.load(reloaded.sharded_state_dict(), back))
    results["round_trip"] = max(float((a - b).abs().max()) for a, b in
                                zip(sequential.state_dict().values(), reloaded.state_dict().values())
                                if isinstance(a, torch.Tensor))

    # padded tokens route nowhere: the row count is no longer tokens x k, so the sync-free dispatcher
    # must hand over to megatron-core's permutation for that call
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    padding[0, -2:] = True
    (seq_out, _), (grp_out, _) = run(sequential, x, padding), run(grouped, x, padding)
    results["padded"] = {"out": float((seq_out - grp_out).abs().max()),
                         "rows_known": getattr(grouped.token_dispatcher, "rows_known", None)}

    # capacity routing: the grouped layer keeps megatron-core's permutation while tokens are dropped,
    # and permutes sync-free once generation switches the routers to dropless
    from megatron_ext.models.recycle_routing import dropless_routing

    capped = os.path.join(tmp, "capped")
    if rank == 0:
        os.makedirs(capped, exist_ok=True)
    torch.distributed.barrier()
    seq_cap = build(False, torch.float32, capacity=0.5)
    dist_checkpointing.save(seq_cap.sharded_state_dict(), capped)
    grp_cap = build(True, torch.float32, capacity=0.5)
    grp_cap.load_state_dict(dist_checkpointing.load(grp_cap.sharded_state_dict(), capped))
    (seq_out, _), (grp_out, _) = run(seq_cap, x), run(grp_cap, x)
    results["capacity"] = {"dispatcher": type(grp_cap.token_dispatcher).__name__,
                           "out": float((seq_out - grp_out).abs().max()),
                           "rows_known": getattr(grp_cap.token_dispatcher, "rows_known", None)}
    with dropless_routing([seq_cap, grp_cap]):
        (seq_free, _), (grp_free, _) = run(seq_cap, x), run(grp_cap, x)
    results["capacity"].update(dropless_out=float((seq_free - grp_free).abs().max()),
                               dropless_rows_known=getattr(grp_cap.token_dispatcher, "rows_known", None),
                               dropless_changed=float((seq_free - seq_out).abs().max()))

    from megatron_ext.models.grouped_experts import expert_module_name

    results["modules"] = [expert_module_name(sequential), expert_module_name(grouped)]
    results["dispatchers"] = [type(layer.token_dispatcher).__name__ for layer in (sequential, grouped)]
    layers = {torch.float32: (sequential, grouped)}
    # bf16 copies of the same two layers (load_state_dict casts)
    layers[torch.bfloat16] = tuple(build(kind, torch.bfloat16) for kind in (False, True))
    for fp32_layer, bf16_layer in zip(layers[torch.float32], layers[torch.bfloat16]):
        bf16_layer.load_state_dict(fp32_layer.state_dict())
    reference = None
    for dtype, (sequential, grouped) in layers.items():
        name = str(dtype).removeprefix("torch.")
        (seq_out, seq_grad), (grp_out, grp_grad) = run(sequential, x.to(dtype)), run(grouped, x.to(dtype))
        results.setdefault("rows_known", getattr(grouped.token_dispatcher, "rows_known", None))
        results[name] = {
            "out": float((seq_out - grp_out).abs().max()),
            "grad": float((seq_grad - grp_grad).abs().max()),
            "weight_grad": float((expert_grads(sequential) - expert_grads(grouped)).abs().max()),
            "out_scale": float(seq_out.abs().max()),
        }
        if reference is None:
            reference = seq_out
        else:   # bf16 against the fp32 SequentialMLP: grouped must be no worse than sequential
            results[name]["sequential_vs_fp32"] = float((seq_out - reference).abs().max())
            results[name]["grouped_vs_fp32"] = float((grp_out - reference).abs().max())
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    distributed.destroy()


if __name__ == "__main__":
    if sys.argv[3:] == ["tp"]:
        quiet_known_warnings()
        tp_checkpoints(*sys.argv[1:3])
    else:
        main(*sys.argv[1:3])
