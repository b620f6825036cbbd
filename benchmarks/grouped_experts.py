"""Grouped-GEMM experts (our TorchGroupedMLP on torch._grouped_mm) vs SequentialMLP on a GPU.

    python benchmarks/grouped_experts.py [--tokens 4096 --hidden 2048 --experts 16 --topk 1 --ffn 2816]

One MoE layer of issue 10's Hunyuan-style shape (routed SwiGLU experts + a shared expert of the same
width, dropless, allgather dispatcher), built with each expert module (grouped: with the sync-free
dispatcher of :mod:`megatron_ext.models.moe_dispatch`); the bf16 layers share the
weights of an fp32 SequentialMLP layer, the reference (TorchGroupedMLP gets them through its checkpoint,
as a CPU-trained model would reach a GPU run). Records each bf16 layer's largest output and
input-gradient error against the reference (grouped must be no worse than sequential), then the median
forward + backward time of each over 20 runs after 5 warm-up runs. Writes
benchmarks/results/grouped_experts_<device>.json (``grouped_experts_top<k>_<device>.json`` for ``--topk``
other than 1; the hybrid shape's MoE layers: ``--topk 2 --ffn 1408``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.run_record import cuda_seconds, gpu_record, gpu_result_path, single_rank_env, write_result  # noqa: E402,E501


def build(args, grouped: bool, dtype: torch.dtype):
    from megatron.core.transformer import TransformerConfig

    from megatron_ext.mcore_compat import build_spec
    from megatron_ext.models import moe_dispatch, recycle_routing

    config = TransformerConfig(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=16, num_moe_experts=args.experts,
        moe_router_topk=args.topk, moe_router_pre_softmax=args.topk == 1, moe_ffn_hidden_size=args.ffn,
        moe_shared_expert_intermediate_size=args.ffn, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, moe_token_dispatcher_type="allgather", bf16=dtype == torch.bfloat16,
        params_dtype=dtype, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2)
    choose = recycle_routing.use_grouped_gemm
    if grouped and dtype == torch.bfloat16:   # what is measured must be what training picks
        assert choose(config), "use_grouped_gemm did not pick grouped GEMM for bf16 on this GPU"
    recycle_routing.use_grouped_gemm = lambda config: grouped
    try:
        layer = build_spec(recycle_routing.moe_module_spec(config, "dropless"), config=config).cuda()
    finally:
        recycle_routing.use_grouped_gemm = choose
    layer.set_layer_number(1)
    moe_dispatch.install(layer)   # the sync-free dispatcher, as model_builder.build_model installs it
    return layer


def run(layer, x, grad):
    x = x.detach().clone().requires_grad_()
    out, _ = layer(x)
    out.backward(grad)
    return out.detach().float(), x.grad.float()


def timed(layer, x, grad, iters: int = 20, warmup: int = 5) -> float:
    x = x.detach().clone().requires_grad_()
    times = [cuda_seconds(lambda: layer(x)[0].backward(grad)) for _ in range(warmup + iters)]
    return statistics.median(times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=1)
    parser.add_argument("--ffn", type=int, default=2816)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark compares GPU kernels"
    single_rank_env()
    from megatron.core import dist_checkpointing

    from megatron_ext import distributed
    distributed.initialize({"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                            "expert_model_parallel_size": 1}, seed=0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.tokens, 1, args.hidden, generator=gen, device="cuda")
    grad = torch.randn(args.tokens, 1, args.hidden, generator=gen, device="cuda")
    reference = build(args, False, torch.float32)
    ref_out, ref_grad = run(reference, x, grad)
    # the fp32 weights, in each module's layout: TorchGroupedMLP reads SequentialMLP's checkpoint
    fp32 = {False: reference, True: build(args, True, torch.float32)}
    with tempfile.TemporaryDirectory() as ckpt:
        dist_checkpointing.save(reference.sharded_state_dict(), ckpt)
        fp32[True].load_state_dict(dist_checkpointing.load(fp32[True].sharded_state_dict(), ckpt))
    result = {**gpu_record(), "shape": vars(args)}
    for name, grouped in (("sequential_mlp", False), ("grouped_mlp", True)):
        layer = build(args, grouped, torch.bfloat16)
        layer.load_state_dict(fp32[grouped].state_dict())       # same weights, cast to bf16
        result[name] = {"module": type(layer.experts).__name__, "dispatcher": type(layer.token_dispatcher).__name__}
        out, in_grad = run(layer, x.bfloat16(), grad.bfloat16())
        result[name].update({
            "max_abs_err_out": float((out - ref_out).abs().max()),
            "max_abs_err_grad": float((in_grad - ref_grad).abs().max()),
            "fwd_bwd_ms": 1000 * timed(layer, x.bfloat16(), grad.bfloat16()),
        })
        del layer
        torch.cuda.empty_cache()
    result["output_scale"] = float(ref_out.abs().max())
    result["speedup"] = result["sequential_mlp"]["fwd_bwd_ms"] / result["grouped_mlp"]["fwd_bwd_ms"]
    write_result(gpu_result_path(f"grouped_experts{'' if args.topk == 1 else f'_top{args.topk}'}"), result)
    print(result)
    distributed.destroy()


if __name__ == "__main__":
    main()
