"""Hunyuan-style MoE GPT as a megatron-core ``GPTModel`` (Hunyuan-Large, arXiv 2411.02265).

Which classes make a layer (the spec) is decided here; megatron-core wires them. A layer is
pre-norm GQA self-attention with RoPE and QK-norm, then an MoE block of one always-on shared expert
plus ``num_experts`` routed SwiGLU experts (top-k softmax router, load-balancing aux loss).

The spec uses megatron-core's local (no Transformer Engine) modules with a sequence-parallel-capable
torch norm, and SequentialMLP experts: this runs on CPU and on GPUs without TE.
"""

from __future__ import annotations

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from megatron_ext.models.norms import SequenceParallelTorchNorm


def layer_spec(config: TransformerConfig) -> ModuleSpec:
    """One Hunyuan MoE decoder layer (dense MLP when the config has no experts)."""
    backend = LocalSpecProvider()
    qk_norm = SequenceParallelTorchNorm if config.qk_layernorm else IdentityOp
    if config.num_moe_experts:
        mlp = get_moe_module_spec_for_backend(backend, num_experts=config.num_moe_experts)
    else:
        mlp = ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(
                linear_fc1=backend.column_parallel_linear(),
                linear_fc2=backend.row_parallel_linear(),
            ),
        )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=SequenceParallelTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_linear(),
                    core_attention=backend.core_attention(),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=SequenceParallelTorchNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(config: TransformerConfig, vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """Per-layer specs for this rank's pipeline stage, plus the final norm."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec(config)] * num_layers,
        layer_norm=SequenceParallelTorchNorm,
    )


def build(
    config: TransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    rotary_base: float,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None = None,
) -> GPTModel:
    """A Hunyuan MoE GPT for this rank's pipeline stage (untied embeddings, RoPE)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=rotary_base,
        vp_stage=vp_stage,
    )
