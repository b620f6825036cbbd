"""Make megatron-core 0.16.1 MoE code importable and runnable without Transformer Engine.

``megatron.core.transformer.moe.moe_utils`` imports ``te_general_gemm`` and the ``fused_*`` kernels
inside one ``try`` block; when TE is absent the names are never bound, and the router later tests
``te_general_gemm is not None`` / ``fused_x is None`` and dies with ``NameError``. Binding them to
``None`` selects megatron-core's own pure-torch fallbacks, which is exactly what the checks intend.
Needed on CPU and on GPUs without TE alike, so it is separate from the CPU backend.
"""

from __future__ import annotations

_MISSING_WHEN_NO_TE = (
    "te_general_gemm",
    "fused_moe_aux_loss",
    "fused_permute",
    "fused_permute_with_probs",
    "fused_unpermute",
    "fused_sort_chunks_by_index",
    "fused_sort_chunks_by_index_with_probs",
    "fused_topk_with_score_function",
    "fused_compute_score_for_moe_aux_loss",
)


def apply() -> list[str]:
    """Bind the names TE would have provided to ``None``; returns the names that were bound."""
    from megatron.core.transformer.moe import moe_utils

    bound = []
    for name in _MISSING_WHEN_NO_TE:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)
            bound.append(name)
    return bound
