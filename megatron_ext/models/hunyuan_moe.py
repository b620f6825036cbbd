"""Hunyuan-style MoE GPT as a megatron-core ``GPTModel`` (Hunyuan-Large, arXiv 2411.02265).

Which classes make a layer (the spec) is decided here; megatron-core wires them. A layer is pre-norm
GQA self-attention with RoPE and QK-norm, then an MoE block of one always-on shared expert plus
``num_moe_experts`` routed SwiGLU experts (top-k softmax router, load-balancing aux loss). The
Hunyuan-specific parts come from their own modules:

- cross-layer attention: groups of ``cla_share_factor`` layers share one K/V
  (:mod:`megatron_ext.models.cla_attention`; factor 1 is plain self-attention), and
  ``qk_norm_after_rope`` selects Hunyuan's QK-norm order;
- routing: ``moe_routing_mode`` dropless / drop / recycle (:mod:`megatron_ext.models.recycle_routing`).

All modules are megatron-core's local (no Transformer Engine) ones with a sequence-parallel-capable
torch norm: this runs on CPU and on GPUs without TE. On GPUs two fast paths replace modules that
compute the same thing: SDPA core attention (:mod:`megatron_ext.models.sdpa_attention`) and
grouped-GEMM experts (:mod:`megatron_ext.models.grouped_experts`); the CPU keeps SequentialMLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_ext.models.cla_attention import cla_attention_specs
from megatron_ext.models.norms import SequenceParallelTorchNorm
from megatron_ext.models.recycle_routing import moe_module_spec
from megatron_ext.models.sdpa_attention import FastSpecProvider

# Keys of a model preset read here (not TransformerConfig fields).
MODEL_KEYS = ("cla_share_factor", "qk_norm_after_rope", "moe_routing_mode")


@dataclass(frozen=True)
class HunyuanOptions:
    cla_share_factor: int = 1
    qk_norm_after_rope: bool = False
    moe_routing_mode: str = "dropless"

    @classmethod
    def from_model_cfg(cls, model_cfg: Mapping[str, Any]) -> "HunyuanOptions":
        return cls(**{k: model_cfg[k] for k in MODEL_KEYS if model_cfg.get(k) is not None})


def dense_mlp_spec(config: TransformerConfig) -> ModuleSpec:
    backend = FastSpecProvider(config)
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(
        linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear()))


def layer_spec(attention: ModuleSpec, mlp: ModuleSpec) -> ModuleSpec:
    """A pre-norm decoder layer: attention then MLP, each with a residual."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=SequenceParallelTorchNorm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=SequenceParallelTorchNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(config: TransformerConfig, options: HunyuanOptions = HunyuanOptions(),
               vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """Per-layer specs for this rank's pipeline stage, plus the final norm."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    share = options.cla_share_factor
    producer, consumer = cla_attention_specs(config, share, options.qk_norm_after_rope)
    mlp = moe_module_spec(config, options.moe_routing_mode) if config.num_moe_experts else dense_mlp_spec(config)
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec(producer if i % share == 0 else consumer, mlp) for i in range(num_layers)],
        layer_norm=SequenceParallelTorchNorm,
    )


def build(
    config: TransformerConfig,
    model_cfg: Mapping[str, Any],
    vocab_size: int,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None = None,
) -> GPTModel:
    """A Hunyuan MoE GPT for this rank's pipeline stage (untied embeddings, RoPE)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, HunyuanOptions.from_model_cfg(model_cfg), vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=int(model_cfg["seq_length"]),
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=float(model_cfg.get("rotary_base", 10000)),
        vp_stage=vp_stage,
    )
