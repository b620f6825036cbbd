"""Gradient-accumulation fusion (:mod:`megatron_ext.models.grad_accumulation_fusion`) on a GPU.

    python benchmarks/wgrad_fusion.py [--tokens 8192 --shapes 2048x2048 4096x2048 ...]

For each linear weight shape (out x in) of the MFU shapes: the wgrad GEMM accumulating into an fp32
``main_grad`` in one kernel (``torch.addmm(..., out_dtype=float32, out=main_grad)``, what the stand-in
runs) against what megatron-core does without apex (a bf16 wgrad GEMM, then ``main_grad.add_(grad)``).
Records each path's largest error against an fp64 reference of ``main_grad + dy.T @ x`` (the fused
path keeps the product in fp32, so it must be no worse) and the median time of each over 50 runs.
Writes benchmarks/results/wgrad_fusion_<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.run_record import cuda_seconds, gpu_record, gpu_result_path, write_result  # noqa: E402


def unfused(x: torch.Tensor, dy: torch.Tensor, main_grad: torch.Tensor) -> None:
    main_grad.add_(dy.t() @ x)   # megatron-core without apex: bf16 wgrad, then the DDP hook's add


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--shapes", nargs="+", default=["2048x2048", "4096x2048", "2048x5504", "11008x2048"],
                        help="weight shapes out x in: the MFU shapes' proj, QKV, SwiGLU fc2 and fc1")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark compares GPU kernels"
    from megatron_ext.models import grad_accumulation_fusion

    assert grad_accumulation_fusion.use_gradient_accumulation_fusion(), "training would not pick the fusion here"
    fused = grad_accumulation_fusion.layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for shape in args.shapes:
        out_f, in_f = (int(v) for v in shape.split("x"))
        x = torch.randn(args.tokens, in_f, device="cuda", generator=g).bfloat16()
        dy = torch.randn(args.tokens, out_f, device="cuda", generator=g).bfloat16()
        start = torch.randn(out_f, in_f, device="cuda", generator=g)
        reference = start.double() + dy.double().t() @ x.double()
        row = {"weight": [out_f, in_f], "tokens": args.tokens}
        for name, fn in (("fused", fused), ("unfused", unfused)):
            main_grad = start.clone()
            fn(x, dy, main_grad)
            assert main_grad.dtype == torch.float32
            row[f"{name}_max_error"] = float((main_grad.double() - reference).abs().max())
            for _ in range(5):
                fn(x, dy, main_grad)
            row[f"{name}_ms"] = 1e3 * statistics.median(cuda_seconds(lambda: fn(x, dy, main_grad))
                                                        for _ in range(args.iters))
        row["reference_max_abs"] = float(reference.abs().max())
        row["speedup"] = row["unfused_ms"] / row["fused_ms"]
        rows.append(row)
        print(row)
    assert all(r["fused_max_error"] <= r["unfused_max_error"] * 1.01 for r in rows), "fused less accurate"
    write_result(gpu_result_path("wgrad_fusion"), {**gpu_record(), "rows": rows})


if __name__ == "__main__":
    main()
