"""Gradient-accumulation fusion without apex: the weight-gradient GEMM adds straight into ``main_grad``.

With ``gradient_accumulation_fusion`` megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear``
hand their weight gradient to apex's ``fused_weight_gradient_mlp_cuda`` extension, which runs the wgrad
GEMM with the fp32 ``main_grad`` buffer as its accumulator (beta = 1), and return a dummy gradient that
megatron-core's DDP hook skips (``grad_added_to_main_grad``). Without apex the flag is refused, so every
linear weight's bf16 gradient was written out, then read again and added into the fp32 buffer by
a separate kernel, per micro-batch (and rounded to bf16 on the way: benchmarks/wgrad_fusion.py). On an
H200 the fused form is 1.09-1.13x faster for the dense shape's weights and took that shape from 48.8%
to 49.9% MFU (benchmarks/README.md). Routed experts' grouped weights are not linear layers: their
gradients are still added separately.

torch has the fused form itself: ``torch.addmm(main_grad, g.T, x, out_dtype=torch.float32,
out=main_grad)`` (``aten::addmm.dtype_out``: bf16 operands, fp32 accumulator and result, CUDA only).
:data:`ops` adapts it to the extension's two functions, and :func:`install` binds it where megatron-core
looks for the extension; an installed apex is left alone. Elsewhere (CPU, mixed dtypes without the
CUDA kernel) the functions compute the same sum unfused, so they stay correct anywhere, but
:func:`use_gradient_accumulation_fusion` only turns the fusion on for GPU runs, the only place it saves
anything.

Not for tied embedding / output weights: their embedding gradient arrives through autograd into the
same ``param.grad`` the dummy occupies, which megatron-core's hook then skips (both our model families
untie them).
"""

from __future__ import annotations

import sys
import types

import torch
from megatron.core.tensor_parallel import layers


def _accumulate(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output.T @ total_input`` (2-D: [tokens, out] and [tokens, in])."""
    g_t = grad_output.t()
    if g_t.dtype == main_grad.dtype:
        main_grad.addmm_(g_t, total_input)
    elif main_grad.is_cuda:
        torch.addmm(main_grad, g_t, total_input, out_dtype=main_grad.dtype, out=main_grad)
    else:
        main_grad.addmm_(g_t.to(main_grad.dtype), total_input.to(main_grad.dtype))   # as the kernel: in fp32


#: Stands in for apex's ``fused_weight_gradient_mlp_cuda`` extension module (the names megatron-core calls).
ops = types.SimpleNamespace(wgrad_gemm_accum_fp32=_accumulate, wgrad_gemm_accum_fp16=_accumulate,
                            __name__="fused_weight_gradient_mlp_cuda")


def install() -> bool:
    """Bind :data:`ops` as ``fused_weight_gradient_mlp_cuda`` for megatron-core's linear layers unless
    apex's extension is already there. Idempotent; True once the layers accept the flag."""
    if not layers._grad_accum_fusion_available:
        sys.modules.setdefault("fused_weight_gradient_mlp_cuda", ops)
        layers.fused_weight_gradient_mlp_cuda = sys.modules["fused_weight_gradient_mlp_cuda"]
        layers._grad_accum_fusion_available = True
    return layers._grad_accum_fusion_available


def use_gradient_accumulation_fusion() -> bool:
    """On for GPU runs (installing the stand-in when apex is absent), off on the CPU backend."""
    from megatron_ext import cpu_backend

    if not torch.cuda.is_available() or cpu_backend.is_enabled():
        return False
    return install()
