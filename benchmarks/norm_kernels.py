"""RMSNorm with bf16 weights (our GPU path, :mod:`megatron_ext.models.norms`) vs fp32 weights on a GPU.

    python benchmarks/norm_kernels.py [--tokens 16384 --hidden 2048]

Our norms hold their weight in ``params_dtype`` (bf16 on GPUs, fp32 main weights in the optimizer), so
``torch.rms_norm`` runs its fused bf16 kernel; an fp32 weight under bf16 activations (what the norm
had before) takes torch's unfused fp32 path. Both get the same bf16 input and the same weight values
(1 + 0.3 N(0, 1), rounded to bf16 so that only the arithmetic differs); the reference is the norm in
float64. Records each path's largest output, input-gradient and weight-gradient error relative to the
reference's largest value, and the median forward + backward time over 50 runs after 5 warm-up runs.
Writes benchmarks/results/norm_kernels_<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.run_record import cuda_seconds, gpu_record, gpu_result_path, write_result  # noqa: E402


def build(hidden: int, dtype: torch.dtype, weight: torch.Tensor) -> torch.nn.Module:
    from megatron.core.transformer import TransformerConfig

    from megatron_ext.models.norms import SequenceParallelTorchNorm

    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=16, normalization="RMSNorm",
                               params_dtype=dtype, bf16=True)
    norm = SequenceParallelTorchNorm(config, hidden, eps=1e-5).cuda()
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm


def run(norm, x, grad):
    x = x.detach().clone().requires_grad_()
    norm.weight.grad = None
    out = norm(x)
    out.backward(grad.to(out.dtype))
    return out.detach().double(), x.grad.double(), norm.weight.grad.double()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark compares GPU kernels"
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, device="cuda", generator=g).bfloat16()
    grad = torch.randn(args.tokens, args.hidden, device="cuda", generator=g).bfloat16()
    weight = (1 + 0.3 * torch.randn(args.hidden, device="cuda", generator=g)).bfloat16()
    reference = build(args.hidden, torch.float64, weight.double())
    ref = run(reference, x.double(), grad.double())
    scales = [float(t.abs().max()) for t in ref]
    result = {**gpu_record(), "tokens": args.tokens, "hidden": args.hidden}
    for name, dtype in (("bf16_weight", torch.bfloat16), ("fp32_weight", torch.float32)):
        norm = build(args.hidden, dtype, weight.to(dtype))
        got = run(norm, x, grad)
        errors = {f"{part}_rel_error": float((a - b).abs().max()) / s
                  for part, a, b, s in zip(("out", "input_grad", "weight_grad"), got, ref, scales)}
        inp = x.detach().clone().requires_grad_()
        out_dtype = norm(x).dtype
        g_out = grad.to(out_dtype)
        for _ in range(5):
            norm(inp).backward(g_out)
        ms = 1e3 * statistics.median(cuda_seconds(lambda: norm(inp).backward(g_out)) for _ in range(50))
        result[name] = {**errors, "output_dtype": str(out_dtype), "fwd_bwd_ms": ms}
        print(name, result[name])
    assert all(result["bf16_weight"][k] < 1e-2 for k in ("out_rel_error", "input_grad_rel_error",
                                                          "weight_grad_rel_error")), "bf16 norm off bf16 rounding"
    write_result(gpu_result_path("norm_kernels"), result)


if __name__ == "__main__":
    main()
