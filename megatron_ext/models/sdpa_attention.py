"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` (cuDNN / flash kernels).

megatron-core's local ``DotProductAttention`` materialises the [b, heads, sq, sk] score matrix and runs
an unfused softmax: on an H200 without Transformer Engine it takes most of a dense model's step
(issue 10: SDPA is about 14x faster for one layer forward + backward). This module is a drop-in
``core_attention`` with the same constructor, inputs and output, and no parameters, so checkpoints
do not change. :func:`core_attention_for` picks it wherever it computes the same thing (no sliding
window or softmax offset), on GPUs and CPUs alike: on the CPU its fused kernel made a tiny SFT step
(seq 256) about 30% faster than the local module, with the same losses (1e-7). Under context
parallelism it runs the causal ring of :mod:`megatron_ext.models.ring_attention` (megatron-core's own
CP attention needs Transformer Engine).

Masks follow megatron-core: ``attention_mask`` True marks positions that must not be attended. With
no mask, attention is causal over aligned query / key positions (sq == sk), or unmasked for one new
query token (sq == 1, a decode step): exactly the cases the local module handles without a mask.
One difference, outside what our models produce: a query row whose keys are all masked gets NaN from
SDPA, where the local softmax (masked scores set to -10000) averages every value uniformly.
"""

from __future__ import annotations

import math
from typing import Optional

import torch.nn.functional as F
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide
from torch import Tensor

from megatron_ext.models import tp_comm_overlap
from megatron_ext.models.ring_attention import ring_attention


class SDPAAttention(MegatronModule):
    """``DotProductAttention``'s contract on torch SDPA: [sq, b, np, hn] queries, [sk, b, ng, hn] keys /
    values (grouped-query heads are shared inside the kernel, not copied) -> [sq, b, np * hn]."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        assert unsupported_reason(config) is None, unsupported_reason(config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = pg_collection.cp if config.context_parallel_size > 1 else None
        head_dim = divide(config.kv_channels * config.num_attention_heads, config.num_attention_heads)
        self.heads_per_partition = divide(config.num_attention_heads, pg_collection.tp.size())
        # apply_query_key_layer_scaling divides the scores by the layer number and the softmax
        # multiplies them back: the probabilities only ever see 1 / sqrt(head_dim)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        assert packed_seq_params is None, "packed sequences need Transformer Engine's attention"
        assert attention_bias is None, "attention_bias is not supported by SDPAAttention"
        sq, b, np_, hn = query.shape
        sk = key.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))   # [b, heads, s, hn]
        if self.cp_group is not None:
            return self._ring(q, k, v, attention_mask, attn_mask_type or self.attn_mask_type)
        mask, causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask   # megatron: True = masked out; SDPA: True = attend
        elif (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and sq > 1:
            assert sq == sk, "a multi-token step against a longer cache needs an explicit attention_mask"
            causal = True
        dropout = self.dropout_p if self.training else 0.0

        def attend() -> Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                  scale=self.softmax_scale, enable_gqa=k.shape[1] != np_)

        if dropout > 0 and not self.config.sequence_parallel:
            with get_cuda_rng_tracker().fork():   # as DotProductAttention: TP ranks drop different heads
                out = attend()
        else:
            out = attend()
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    def _ring(self, q: Tensor, k: Tensor, v: Tensor, attention_mask, attn_mask_type) -> Tensor:
        """Context parallelism: this rank's causal rows over the whole sequence, K/V in a ring."""
        if attention_mask is not None or attn_mask_type != AttnMaskType.causal or q.size(2) != k.size(2):
            raise NotImplementedError(
                "context parallelism supports causal training / evaluation forwards only (no explicit mask, "
                "no KV cache): run generation with context_parallel_size=1")
        if self.training and self.dropout_p > 0:
            raise NotImplementedError("attention dropout under context parallelism: set attention_dropout=0")
        out = ring_attention(q, k, v, self.softmax_scale, self.cp_group)
        sq, b = q.size(2), q.size(0)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


def unsupported_reason(config: TransformerConfig) -> str | None:
    """Why SDPA would compute something else than ``DotProductAttention`` for this config, or None."""
    if config.window_size is not None:
        return "sliding-window attention"
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        return f"softmax_type={config.softmax_type}"
    return None


def core_attention_for(config: TransformerConfig) -> type:
    """SDPA when it computes the same attention, else megatron-core's local module."""
    return SDPAAttention if unsupported_reason(config) is None else DotProductAttention


class FastSpecProvider(LocalSpecProvider):
    """megatron-core's local modules, with the core attention :func:`core_attention_for` chooses,
    under ``config.tp_comm_overlap`` linear layers that overlap the sequence-parallel collectives, and
    for ``moe_grouped_gemm`` our grouped-GEMM experts (:mod:`megatron_ext.models.grouped_experts`)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self._core_attention = core_attention_for(config)
        self._column_linear, self._row_linear = tp_comm_overlap.linear_classes(config)

    def core_attention(self) -> type:
        return self._core_attention

    def column_parallel_linear(self) -> type:
        return self._column_linear

    def row_parallel_linear(self) -> type:
        return self._row_linear

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool, *legacy_flag):
        """megatron-core >= 0.17 takes one flag and wants an experts builder; 0.16 passes
        ``moe_use_legacy_grouped_gemm`` too and wants ``(module, submodules)``."""
        if not moe_use_grouped_gemm:
            return super().grouped_mlp_modules(moe_use_grouped_gemm, *legacy_flag)
        from megatron_ext.models.grouped_experts import TorchGroupedMLP

        return (TorchGroupedMLP, None) if legacy_flag else TorchGroupedMLP
