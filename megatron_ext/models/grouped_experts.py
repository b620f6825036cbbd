"""Grouped-GEMM MoE experts without the ``grouped_gemm`` package: ``torch._grouped_mm`` stands in.

megatron-core's local MoE spec has two expert modules: ``SequentialMLP`` (one GEMM pair per expert,
a Python loop; what the CPU runs) and the legacy ``GroupedMLP`` (all local experts in two grouped GEMMs
through ``grouped_gemm.ops.gmm``). Without the ``grouped_gemm`` package (or TE) megatron-core asserts
on ``GroupedMLP``, so on GPUs the experts ran as 16 x 2 small GEMMs per layer. torch ships a grouped
GEMM of its own (``torch._grouped_mm``: CUTLASS on sm90+, a loop elsewhere, with autograd), and
:data:`ops` adapts it to ``gmm``'s signature so megatron-core's ``GroupedMLP`` runs unchanged.

:func:`use_grouped_gemm` decides per config: GPUs (not the CPU backend), bf16 (``GroupedMLP`` asserts
it), and only configs ``GroupedMLP`` computes the same way as ``SequentialMLP`` (no bias, SwiGLU/GeGLU
or a plain activation, no latent projection, no FP8). Where the real package is installed it is used.

Checkpoints: ``GroupedMLP``'s weights are saved under the same sharded keys and layout as
``SequentialMLP``'s (megatron-core maps them), so model weights move between GPU and CPU runs; the
distributed optimizer's state does not (megatron-core's limitation: its weights are stored
transposed), so a run resumes with the expert implementation it was saved with.
"""

from __future__ import annotations

import types

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe import grouped_gemm_util


def gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """``grouped_gemm.ops.gmm``: rows ``a[offset_e : offset_e + batch_sizes[e]] @ b[e]`` for each expert e
    (``b[e].T`` with ``trans_b``), concatenated; ``a`` is (tokens, k), ``b`` (experts, k, n)."""
    if trans_b:
        b = b.transpose(1, 2)
    offsets = torch.cumsum(batch_sizes, 0).to(device=a.device, dtype=torch.int32, non_blocking=True)
    return torch._grouped_mm(a, b, offs=offsets)


#: Stands in for the ``grouped_gemm`` package's ``ops`` module (``grouped_gemm_util.ops``).
ops = types.SimpleNamespace(gmm=gmm)


def install() -> bool:
    """Make megatron-core's ``GroupedMLP`` use :data:`ops` when the ``grouped_gemm`` package is absent;
    True when ``GroupedMLP`` can run (the package, or the stand-in now bound). Idempotent; leaves an
    installed package alone."""
    if grouped_gemm_util.grouped_gemm is None:
        grouped_gemm_util.grouped_gemm = types.SimpleNamespace(ops=ops)
        grouped_gemm_util.ops = ops
    return grouped_gemm_util.grouped_gemm_is_available()


def unsupported_reason(config: TransformerConfig) -> str | None:
    """Why ``GroupedMLP`` would not compute what ``SequentialMLP`` computes for this config, or None."""
    import torch.nn.functional as F

    if not config.bf16:
        return "GroupedMLP runs in bf16 only"
    if config.add_bias_linear:
        return "expert biases (add_bias_linear=True)"
    if getattr(config, "moe_latent_size", None) is not None:
        return "MoE latent projection"
    if config.fp8 or getattr(config, "fp4", None):
        return "FP8 / FP4 experts"
    if config.gated_linear_unit and config.activation_func not in (F.silu, F.gelu):
        return f"gated activation {config.activation_func.__name__}"
    ffn = (config.moe_ffn_hidden_size or config.ffn_hidden_size) // config.expert_tensor_parallel_size
    if config.hidden_size % 8 or ffn % 8:
        # torch._grouped_mm needs 16-byte row strides: multiples of 8 bf16 values
        return f"hidden {config.hidden_size} / expert FFN {ffn} per rank not multiples of 8"
    return None


def use_grouped_gemm(config: TransformerConfig) -> bool:
    """Grouped-GEMM experts on GPUs when they compute the same thing; SequentialMLP elsewhere (CPU)."""
    from megatron_ext import cpu_backend

    if not torch.cuda.is_available() or cpu_backend.is_enabled() or unsupported_reason(config) is not None:
        return False
    return install()


def expert_module_name(model) -> str | None:
    """The class name of the model's routed-expert modules (``GroupedMLP`` / ``SequentialMLP``), None
    without MoE layers: checkpoints record it, since the two store optimizer state differently."""
    from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP

    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, (GroupedMLP, SequentialMLP)):
                return type(module).__name__
    return None
