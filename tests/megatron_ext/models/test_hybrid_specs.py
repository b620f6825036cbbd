"""The local hybrid stack spec: what it wires, and the error for an MoE layer without experts."""

import pytest
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import build_module

from megatron_ext.errors import ConfigError
from megatron_ext.models.hybrid_specs import MambaStackWithFinalNormSpec, hybrid_stack_spec
from megatron_ext.models.norms import SequenceParallelTorchNorm


def _config(**overrides):
    return TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                             mamba_num_heads=8, mamba_head_dim=16, mamba_num_groups=2, **overrides)


def test_stack_takes_its_final_norm_and_chunk_size_from_the_spec():
    spec = hybrid_stack_spec(_config(), mamba_chunk_size=64)
    assert spec.module is MambaStackWithFinalNormSpec
    assert spec.params["final_norm"] is SequenceParallelTorchNorm
    assert spec.submodules.mamba_layer.submodules.mixer.params == {"chunk_size": 64}


def test_moe_layer_without_experts_is_a_config_error():
    spec = hybrid_stack_spec(_config())
    with pytest.raises(ConfigError, match="num_moe_experts"):
        build_module(spec.submodules.moe_layer, config=_config(), layer_number=1)
