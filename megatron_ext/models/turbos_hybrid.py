"""Hunyuan-TurboS-style hybrid Mamba2 / attention / MoE model as a megatron-core ``HybridModel``.

Hunyuan-TurboS (arXiv 2505.15431) interleaves AMF (attention, Mamba2, FFN) and MF (Mamba2, FFN) blocks.
The preset writes the layout in the block language of :mod:`megatron_ext.models.turbos_layout`, which
compiles to megatron-core's hybrid layer pattern; the layers themselves come from
:func:`megatron_ext.models.hybrid_specs.hybrid_stack_spec` (GQA attention with QK-norm, Mamba2 mixers,
MoE FFNs with a shared expert and the configured routing mode).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from megatron.core.transformer import TransformerConfig

from megatron_ext.errors import ConfigError
from megatron_ext.mcore_compat import hybrid_model_class, hybrid_model_kwargs
from megatron_ext.models.hybrid_specs import hybrid_stack_spec
from megatron_ext.models.turbos_layout import layer_pattern

# Keys of a model preset read here (not TransformerConfig fields).
MODEL_KEYS = ("hybrid_blocks", "hybrid_block_types", "mamba_chunk_size", "moe_routing_mode")


def build(
    config: TransformerConfig,
    model_cfg: Mapping[str, Any],
    vocab_size: int,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None = None,
) -> torch.nn.Module:
    """A TurboS-style hybrid for this rank's pipeline stage (untied embeddings, RoPE in attention)."""
    if vp_stage is not None:
        raise ConfigError("parallel: virtual pipeline stages are not supported for the turbos_hybrid family")
    spec = hybrid_stack_spec(config, mamba_chunk_size=int(model_cfg.get("mamba_chunk_size") or 128),
                             moe_routing_mode=model_cfg.get("moe_routing_mode") or "dropless")
    return hybrid_model_class()(
        config=config,
        **hybrid_model_kwargs(spec, layer_pattern(model_cfg)),
        vocab_size=vocab_size,
        max_sequence_length=int(model_cfg["seq_length"]),
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(model_cfg.get("rotary_base", 10000)),
    )
