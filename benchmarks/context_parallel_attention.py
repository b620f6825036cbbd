"""Long-context attention on GPUs: SDPA throughput and memory by length, the ring's CUDA block kernels,
and context parallelism's per-GPU throughput.

    python benchmarks/context_parallel_attention.py [--seqs 8192 32768 131072]
    torchrun --nproc-per-node 2 benchmarks/context_parallel_attention.py --cp-seq 32768

One process (one GPU): for each length, our SDPA core attention (bf16, causal; TurboS's attention per
TP2 rank by default: 32 query heads, 4 KV heads, head dim 80, batch 1) forward + backward: median time
of 10 runs after 3 warm-up runs, tokens/s, attention TFLOP/s (causal forward 2 b h s^2 d FLOPs, backward
2.5x the forward: flash attention recomputes the scores) and the peak memory the step adds. Then the
ring's block kernels on CUDA (``megatron_ext.models.ring_attention``: torch's flash attention with its
log-sum-exp) against the plain-torch block in fp32 on the same bf16 inputs, for the three block shapes a
ring step uses. Writes benchmarks/results/context_parallel_attention_<gpu>.json.

Two processes (two GPUs, NCCL): the same layer at ``--cp-seq`` tokens, once whole on each GPU (CP1) and
once split over both (CP2: each GPU holds half the tokens, K/V in a ring); per-GPU throughput of CP2
relative to CP1's (goal >= 0.85). Writes benchmarks/results/context_parallel_attention_cp2_<gpu>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.run_record import cuda_seconds, gpu_record, gpu_result_path, single_rank_env, write_result  # noqa: E402,E501


def attention_flops(batch: int, heads: int, seq: int, head_dim: int) -> float:
    """Causal attention forward + backward FLOPs: forward 2 b h s^2 d (two GEMMs, half the scores
    masked), backward 2.5x (five GEMMs, the scores recomputed)."""
    return 3.5 * 2 * batch * heads * seq * seq * head_dim


def make_module(heads: int, groups: int, head_dim: int, cp: int):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ext.models.sdpa_attention import SDPAAttention

    config = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=head_dim, attention_dropout=0.0, bf16=True,
                               params_dtype=torch.bfloat16, context_parallel_size=cp)
    return SDPAAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self").cuda()


def inputs(seq: int, batch: int, heads: int, groups: int, head_dim: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)

    return (rand(seq, batch, heads, head_dim), rand(seq, batch, groups, head_dim), rand(seq, batch, groups, head_dim),
            rand(seq, batch, heads * head_dim, grad=False))


def time_layer(module, q, k, v, grad, iters: int = 10, warmup: int = 3) -> tuple[float, float]:
    """(median seconds of forward + backward, peak bytes the step adds over its inputs)."""
    def step():
        module(q, k, v, attention_mask=None).backward(grad)
        q.grad = k.grad = v.grad = None

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = [cuda_seconds(step) for _ in range(warmup + iters)]
    return statistics.median(times[warmup:]), peak


def check_block_kernels(heads: int, groups: int, head_dim: int, chunk: int = 2048) -> dict:
    """Flash block kernels on CUDA vs the plain-torch block (fp32 maths on the same bf16 inputs)."""
    from megatron_ext.models import ring_attention as ra

    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, heads, 2 * chunk, head_dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, heads, 2 * chunk, head_dim, generator=gen, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    dout = torch.randn_like(q)
    scale = head_dim ** -0.5
    cases = {"causal_own_chunks": (slice(None), slice(None), True),
             "all_queries_first_kv_half": (slice(None), slice(0, chunk), False),
             "second_query_half_all_kv": (slice(chunk, None), slice(None), False)}
    out = {}
    for name, (rows, cols, causal) in cases.items():
        got = {}
        for kernel in ("flash", "math"):
            os.environ[ra.KERNEL_ENV] = kernel
            o, lse = ra._block_forward(q[:, :, rows], k[:, :, cols], v[:, :, cols], causal, scale)
            grads = ra._block_backward(dout[:, :, rows], q[:, :, rows], k[:, :, cols], v[:, :, cols], o, lse,
                                       causal, scale)
            got[kernel] = (o.float(), lse.float(), [g.float() for g in grads])
        (fo, fl, fg), (mo, ml, mg) = got["flash"], got["math"]
        out[name] = {"out": float((fo - mo).abs().max()), "lse": float((fl - ml).abs().max()),
                     "grads": [float((a - b).abs().max()) for a, b in zip(fg, mg)]}
    os.environ.pop(ra.KERNEL_ENV)
    return out


def one_gpu(args) -> None:
    from megatron_ext import distributed

    single_rank_env()
    distributed.initialize({"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                            "expert_model_parallel_size": 1}, seed=0)
    h, g, d, b = args.heads, args.groups, args.head_dim, args.batch
    module = make_module(h, g, d, cp=1)
    result = {**gpu_record(), "shape": {"batch": b, "heads": h, "groups": g, "head_dim": d}, "by_length": {}}
    for seq in args.seqs:
        q, k, v, grad = inputs(seq, b, h, g, d)
        seconds, peak = time_layer(module, q, k, v, grad)
        result["by_length"][str(seq)] = {
            "fwd_bwd_ms": 1000 * seconds, "tokens_per_s": b * seq / seconds,
            "attention_tflops": attention_flops(b, h, seq, d) / seconds / 1e12,
            "peak_added_gib": peak / 2 ** 30,
            "inputs_gib": sum(t.numel() * t.element_size() for t in (q, k, v, grad)) / 2 ** 30,
        }
        print(seq, result["by_length"][str(seq)], flush=True)
        del q, k, v, grad
        torch.cuda.empty_cache()
    result["block_kernels_vs_fp32_math"] = check_block_kernels(h, g, d)
    write_result(gpu_result_path("context_parallel_attention"), result)
    print(result["block_kernels_vs_fp32_math"])
    distributed.destroy()


def two_gpus(args) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_ext import distributed
    from megatron_ext.mcore_compat import batch_on_this_cp_rank

    h, g, d, b, seq = args.heads, args.groups, args.head_dim, args.batch, args.cp_seq
    env = distributed.initialize({"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                                  "expert_model_parallel_size": 1, "context_parallel_size": 2}, seed=0)
    q, k, v, grad = inputs(seq, b, h, g, d)
    # CP1: the whole sequence on each GPU (the layer built without CP)
    parallel = make_module(h, g, d, cp=2)
    whole = make_module(h, g, d, cp=1)
    t1, peak1 = time_layer(whole, q, k, v, grad)
    group = parallel_state.get_context_parallel_group()
    local = {name: t.detach().transpose(0, 1) for name, t in zip("qkvg", (q, k, v, grad))}   # [b, s, ...]
    local = {name: t.transpose(0, 1).contiguous().requires_grad_(name != "g")
             for name, t in batch_on_this_cp_rank(local, group).items()}
    t2, peak2 = time_layer(parallel, local["q"], local["k"], local["v"], local["g"])
    times = torch.tensor([t1, t2], dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)   # the slower GPU sets the pace
    t1, t2 = times.tolist()
    if env.is_main:
        result = {**gpu_record(), "shape": {"seq": seq, "batch": b, "heads": h, "groups": g, "head_dim": d},
                  "cp1": {"fwd_bwd_ms": 1000 * t1, "tokens_per_s_per_gpu": b * seq / t1, "peak_added_gib": peak1 / 2 ** 30},
                  "cp2": {"fwd_bwd_ms": 1000 * t2, "tokens_per_s_per_gpu": b * seq / 2 / t2,
                          "peak_added_gib": peak2 / 2 ** 30},
                  "cp2_per_gpu_throughput_vs_cp1": t1 / (2 * t2), "goal": 0.85}
        write_result(gpu_result_path("context_parallel_attention_cp2"), result)
        print(result)
    distributed.destroy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--cp-seq", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=80)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark measures GPU kernels"
    (two_gpus if int(os.environ.get("WORLD_SIZE", 1)) == 2 else one_gpu)(args)


if __name__ == "__main__":
    main()
