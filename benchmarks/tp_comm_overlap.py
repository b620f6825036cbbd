"""Overlapped sequence-parallel linears (:mod:`megatron_ext.models.tp_comm_overlap`) against megatron-core's
own on two GPUs: numerics in bf16, and forward + backward time per layer.

    torchrun --nproc-per-node 2 benchmarks/tp_comm_overlap.py [--seq 4096 --batch 4 --iters 20]

The dense MFU shape's four linears (QKV and SwiGLU fc1 column-parallel, attention proj and fc2
row-parallel; hidden 2048) at one micro-batch of ``--batch`` sequences, tensor parallel 2 with sequence
parallelism, bf16 weights with gradient-accumulation fusion into fp32 ``main_grad`` (as training runs
them). Numerics: megatron-core's bf16 layer and ours both against megatron-core's layer in fp32 on the
same weights and inputs (largest error of the output, input gradient and ``main_grad``; ours must be no
worse) and against each other. Speed: the median of ``--iters`` forward + backward passes of each.
Rank 0 writes benchmarks/results/tp_comm_overlap_<device>.json (``--out`` elsewhere). Without CUDA it
runs on gloo in fp32 (the CPU test's smoke run; no timing claims).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.run_record import command, git_commit, gpu_result_path, machine, write_result  # noqa: E402

# name -> (kind, input features, output features) of the dense shape (benchmarks/train_step_mfu.py)
LAYERS = {"qkv": ("column", 2048, 4096), "proj": ("row", 2048, 2048),
          "fc1": ("column", 2048, 11008), "fc2": ("row", 5504, 2048)}


def build(kind: str, overlapped: bool, fan_in: int, fan_out: int, dtype: torch.dtype):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from megatron_ext.models import tp_comm_overlap

    config = TransformerConfig(num_layers=1, hidden_size=fan_in, num_attention_heads=16, tensor_model_parallel_size=2,
                               sequence_parallel=True, tp_comm_overlap=overlapped, params_dtype=dtype,
                               bf16=dtype == torch.bfloat16, use_cpu_initialization=True,
                               gradient_accumulation_fusion=True, add_bias_linear=False, activation_func=F.silu)
    torch.manual_seed(0)   # the same full weight matrix for every build; each rank keeps its shard
    init = torch.nn.init.xavier_normal_
    if kind == "column":
        cls = tp_comm_overlap.OverlappedColumnParallelLinear if overlapped else ColumnParallelLinear
        layer = cls(fan_in, fan_out, config=config, init_method=init, bias=False, gather_output=False)
    else:
        cls = tp_comm_overlap.OverlappedRowParallelLinear if overlapped else RowParallelLinear
        layer = cls(fan_in, fan_out, config=config, init_method=init, bias=False, input_is_parallel=True,
                    skip_bias_add=True)
    layer = layer.to(device())
    layer.weight.main_grad = torch.zeros_like(layer.weight, dtype=torch.float32)   # as megatron-core's DDP
    layer.weight.grad_added_to_main_grad = False
    return layer


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def inputs(kind: str, fan_in: int, fan_out: int, seq: int, batch: int, dtype: torch.dtype):
    """This rank's input and output gradient (fp32 masters, cast to ``dtype``)."""
    rank = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(1 + rank)
    if kind == "column":   # a sequence block in, the full sequence x half the features out
        x, dy = torch.randn(seq // 2, batch, fan_in, generator=g), torch.randn(seq, batch, fan_out // 2, generator=g)
    else:                  # the full sequence x half the features in, a sequence block out
        x, dy = torch.randn(seq, batch, fan_in // 2, generator=g), torch.randn(seq // 2, batch, fan_out, generator=g)
    return x.to(device(), dtype), dy.to(device(), dtype)


def forward_backward(layer, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    out, _ = layer(x)
    out.backward(dy)
    return out.detach(), x.grad


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(layer, x: torch.Tensor, dy: torch.Tensor, iters: int) -> float:
    for _ in range(3):
        forward_backward(layer, x, dy)
    times = []
    for _ in range(iters):
        torch.distributed.barrier()
        sync()
        t0 = time.perf_counter()
        forward_backward(layer, x, dy)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compare(name: str, seq: int, batch: int, iters: int, low: torch.dtype) -> dict:
    kind, fan_in, fan_out = LAYERS[name]
    ref_layer = build(kind, False, fan_in, fan_out, torch.float32)
    x32, dy32 = inputs(kind, fan_in, fan_out, seq, batch, torch.float32)
    ref_out, ref_dx = forward_backward(ref_layer, x32, dy32)
    ref_wgrad = ref_layer.weight.main_grad
    result = {"kind": kind, "weight": [fan_out, fan_in]}
    runs = {}
    for path, overlapped in (("megatron_core", False), ("overlapped", True)):
        layer = build(kind, overlapped, fan_in, fan_out, low)
        x, dy = inputs(kind, fan_in, fan_out, seq, batch, low)
        out, dx = forward_backward(layer, x, dy)
        runs[path] = (out.float(), dx.float(), layer.weight.main_grad.clone())
        result[path] = {"out_err": float((out.float() - ref_out).abs().max()),
                        "dx_err": float((dx.float() - ref_dx).abs().max()),
                        "main_grad_err": float((layer.weight.main_grad - ref_wgrad).abs().max()),
                        "ms": median_ms(layer, x, dy, iters) if iters else None}
    mine, theirs = runs["overlapped"], runs["megatron_core"]
    result["overlapped_vs_megatron_core"] = {key: float((a - b).abs().max()) for key, a, b in
                                             zip(("out", "dx", "main_grad"), mine, theirs)}
    result["scale"] = {"out": float(ref_out.abs().max()), "dx": float(ref_dx.abs().max()),
                       "main_grad": float(ref_wgrad.abs().max())}
    if iters:
        result["speedup"] = result["megatron_core"]["ms"] / result["overlapped"]["ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch (the TP group's)")
    parser.add_argument("--iters", type=int, default=20, help="timed passes per layer (0: numerics only)")
    parser.add_argument("--layers", nargs="+", choices=sorted(LAYERS), default=list(LAYERS))
    parser.add_argument("--scale", type=int, default=1, help="divide every feature size by this (CPU smoke runs)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    # as train_step_mfu --tp: collectives queued before the GEMMs they hide behind keep that order
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from megatron_ext import distributed
    from megatron_ext.models import grad_accumulation_fusion, tp_comm_overlap
    from megatron_ext.quiet import quiet_known_warnings

    quiet_known_warnings()
    env = distributed.initialize({"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
                                  "expert_model_parallel_size": 1}, seed=0)
    assert torch.distributed.get_world_size() == 2, "run under torchrun --nproc-per-node 2"
    grad_accumulation_fusion.install()
    cuda = torch.cuda.is_available()
    low = torch.bfloat16 if cuda else torch.float32
    if args.scale > 1:
        for name, (kind, fan_in, fan_out) in list(LAYERS.items()):
            LAYERS[name] = (kind, fan_in // args.scale, fan_out // args.scale)
    results = {name: compare(name, args.seq, args.batch, args.iters, low) for name in args.layers}
    if env.is_main:
        record = {"command": command("CUDA_DEVICE_MAX_CONNECTIONS"), "commit": git_commit(), "machine": machine(),
                  "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                  "dtype": str(low), "seq": args.seq, "batch": args.batch, "iters": args.iters,
                  "row_chunks": tp_comm_overlap.ROW_CHUNKS,
                  "layers": results}
        write_result(args.out or gpu_result_path("tp_comm_overlap"), record)
        for name, r in results.items():
            print(name, {k: r[k] for k in ("overlapped_vs_megatron_core", "speedup") if k in r},
                  "errors vs fp32:", r["megatron_core"]["out_err"], r["overlapped"]["out_err"])
    distributed.destroy()


if __name__ == "__main__":
    main()
