"""SwiGLU with megatron-core's activation fusion (``bias_activation_fusion``, our GPU default) vs unfused.

    python benchmarks/swiglu_fusion.py [--tokens 16384 --ffn 5504]

megatron-core's MLP runs SwiGLU unfused unless ``bias_activation_fusion`` is set: ``chunk``, ``silu`` and a
multiply, each a kernel writing a bf16 tensor, and autograd saving two of them. With the flag it runs
``fusions.fused_bias_swiglu`` (``torch.compile``d forward and backward: one kernel each, the input
alone saved; Megatron-LM turns it on with ``--swiglu``). Both get the same bf16 fc1 output [tokens,
2 x ffn] (the dense shape's micro-batch of 4 x 4096 tokens by default) and output gradient; the reference
is the unfused SwiGLU in float64. Records each path's largest output and input-gradient error relative
to the reference's largest value, and the median forward + backward time over 50 runs after 5 warm-up
runs (the first call compiles). Writes benchmarks/results/swiglu_fusion_<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.run_record import cuda_seconds, gpu_record, gpu_result_path, write_result  # noqa: E402


def unfused(y: torch.Tensor) -> torch.Tensor:
    """megatron-core's MLP without the fusion (``glu`` in ``MLP.forward``)."""
    y_glu, y_linear = torch.chunk(y, 2, dim=-1)
    return F.silu(y_glu) * y_linear


def fused(y: torch.Tensor) -> torch.Tensor:
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    return bias_swiglu_impl(y, None, False, False)


def run(fn, y, grad):
    y = y.detach().clone().requires_grad_()
    out = fn(y)
    out.backward(grad.to(out.dtype))
    return out.detach().double(), y.grad.double()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--ffn", type=int, default=5504)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark compares GPU kernels"
    g = torch.Generator(device="cuda").manual_seed(0)
    y = (2 * torch.randn(args.tokens, 2 * args.ffn, device="cuda", generator=g)).bfloat16()
    grad = torch.randn(args.tokens, args.ffn, device="cuda", generator=g).bfloat16()
    ref = run(unfused, y.double(), grad.double())
    scales = [float(t.abs().max()) for t in ref]
    result = {**gpu_record(), "tokens": args.tokens, "ffn": args.ffn}
    for name, fn in (("fused", fused), ("unfused", unfused)):
        got = run(fn, y, grad)
        errors = {f"{part}_rel_error": float((a - b).abs().max()) / s
                  for part, a, b, s in zip(("out", "input_grad"), got, ref, scales)}
        leaf = y.detach().clone().requires_grad_()
        for _ in range(5):
            fn(leaf).backward(grad)
        ms = 1e3 * statistics.median(cuda_seconds(lambda: fn(leaf).backward(grad)) for _ in range(50))
        result[name] = {**errors, "output_dtype": str(fn(y).dtype), "fwd_bwd_ms": ms}
        print(name, result[name])
    result["speedup"] = result["unfused"]["fwd_bwd_ms"] / result["fused"]["fwd_bwd_ms"]
    write_result(gpu_result_path("swiglu_fusion"), result)


if __name__ == "__main__":
    main()
