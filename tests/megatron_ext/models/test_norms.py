"""The sequence-parallel torch norm: parameters in params_dtype, so bf16 models get torch's fused norm."""

import pytest
import torch


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_parameters_follow_params_dtype_and_match_the_fp32_norm(normalization, dtype):
    from megatron.core.transformer import TransformerConfig

    from megatron_ext.models.norms import SequenceParallelTorchNorm

    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, normalization=normalization,
                               bf16=dtype == torch.bfloat16, params_dtype=dtype, sequence_parallel=False)
    norm = SequenceParallelTorchNorm(config, 16)
    assert {p.dtype for p in norm.parameters()} == {dtype}
    assert all(p.sequence_parallel is False for p in norm.parameters())
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    reference = torch.nn.functional.rms_norm(x, (16,), eps=1e-5) if normalization == "RMSNorm" else \
        torch.nn.functional.layer_norm(x, (16,), eps=1e-5)
    torch.testing.assert_close(norm(x.to(dtype)).float(), reference, rtol=2e-2, atol=2e-2)
