"""Local (no Transformer Engine) ``ModuleSpec`` for megatron-core's hybrid Mamba2/attention/MLP/MoE stack.

megatron-core 0.16.1 ships only a TE spec for ``MambaStack`` (``mamba_layer_specs.mamba_stack_spec``:
norms fused into TE linears, TE attention, grouped-GEMM experts), and ``MambaStack`` builds its final
norm as ``TENorm`` whatever the spec says. This spec uses megatron-core's local modules (column/row
parallel linears, ``DotProductAttention``, SequentialMLP experts) with the sequence-parallel-capable torch
norm, and :class:`MambaStackWithFinalNormSpec` takes the final norm from the spec. It runs on CPU and on
GPUs without TE, with the Mamba kernels of :mod:`megatron_ext.models.mamba_torch` when ``mamba_ssm`` is
missing.

Layer kinds follow the hybrid pattern symbols (``M`` Mamba2, ``*`` attention, ``-`` dense MLP, ``E``
MoE); each layer is pre-norm with a residual, as in megatron-core's TE spec. With the norms unfused, the
parameter names differ from the TE spec's (``norm.weight`` vs ``mixer.in_proj.layer_norm_weight``).
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_ext.errors import ConfigError
from megatron_ext.models import mamba_torch
from megatron_ext.models.norms import SequenceParallelTorchNorm
from megatron_ext.models.recycle_routing import moe_module_spec
from megatron_ext.models.sdpa_attention import FastSpecProvider
from megatron_ext.models.static_decode_attention import StaticDecodeSelfAttention


class MambaStackWithFinalNormSpec(MambaStack):
    """``MambaStack`` whose final norm is built from ``final_norm`` instead of the hard-wired ``TENorm``.

    Same state-dict keys (``final_norm.weight``) and forward as ``MambaStack``.
    """

    def __init__(self, config: TransformerConfig, submodules: MambaStackSubmodules, *args,
                 final_norm=SequenceParallelTorchNorm, post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and self.post_layer_norm:
            self.final_norm = build_module(
                final_norm, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
            )


class _NoMoEConfigured:
    """Stands in for the MoE layer when the config has no experts: an ``E`` in the pattern is an error."""

    def __init__(self, *args, **kwargs):
        raise ConfigError(
            "model.num_moe_experts: the hybrid layer pattern has an 'E' (MoE) layer but the config has no "
            "experts; set num_moe_experts or use '-' (dense MLP) in the pattern"
        )


def _attention(config: TransformerConfig, backend: FastSpecProvider) -> ModuleSpec:
    qk_norm = SequenceParallelTorchNorm if config.qk_layernorm else IdentityOp
    return ModuleSpec(
        module=StaticDecodeSelfAttention,   # SelfAttention + a CUDA-graph-capturable decode step
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def hybrid_stack_spec(config: TransformerConfig, mamba_chunk_size: int = 128,
                      moe_routing_mode: str = "dropless") -> ModuleSpec:
    """The spec for ``MambaModel(mamba_stack_spec=...)``; binds the torch Mamba kernels if needed.

    ``mamba_chunk_size`` is the SSD scan's chunk length (Hunyuan-TurboS and megatron-core use 128);
    ``moe_routing_mode`` is the MoE layers' routing (see :mod:`megatron_ext.models.recycle_routing`).
    """
    mamba_torch.apply()  # before importing mamba_mixer: it needs triton or the stand-in
    from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules

    from megatron_ext.models.mamba_static_decode import static_decode_mixer_class

    backend = FastSpecProvider(config)   # local modules; SDPA core attention
    mamba_layer = ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            norm=SequenceParallelTorchNorm,
            mixer=ModuleSpec(
                module=static_decode_mixer_class(),   # MambaMixer, batch-major static decode steps
                params={"chunk_size": mamba_chunk_size},
                submodules=MambaMixerSubmodules(
                    in_proj=backend.column_parallel_linear(), out_proj=backend.row_parallel_linear()
                ),
            ),
            mamba_bda=get_bias_dropout_add,
        ),
    )
    attention_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=SequenceParallelTorchNorm,
            self_attention=_attention(config, backend),
            self_attn_bda=get_bias_dropout_add,
        ),
    )
    mlp_layer = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=SequenceParallelTorchNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear()
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    if config.num_moe_experts:
        moe_layer = ModuleSpec(
            module=MoETransformerLayer,
            submodules=TransformerLayerSubmodules(
                pre_mlp_layernorm=SequenceParallelTorchNorm,
                mlp=moe_module_spec(config, moe_routing_mode),
                mlp_bda=get_bias_dropout_add,
            ),
        )
    else:
        moe_layer = _NoMoEConfigured
    return ModuleSpec(
        module=MambaStackWithFinalNormSpec,
        params={"final_norm": SequenceParallelTorchNorm},
        submodules=MambaStackSubmodules(
            mamba_layer=mamba_layer,
            attention_layer=attention_layer,
            mlp_layer=mlp_layer,
            moe_layer=moe_layer,
        ),
    )
