"""The pure-torch gated RMSNorm against the formula, and its mamba_ssm-compatible interface."""

import pytest
import torch

from megatron_ext.models.gated_rmsnorm import GatedRMSNorm


def _formula(x, weight, z, eps, group_size, norm_before_gate):
    """Written out directly: rmsnorm per group of channels, gate before or after."""
    if z is not None and not norm_before_gate:
        x = x * z * torch.sigmoid(z)
    groups = x.split(group_size or x.shape[-1], dim=-1)
    out = torch.cat([g / torch.sqrt((g * g).mean(-1, keepdim=True) + eps) for g in groups], dim=-1) * weight
    if z is not None and norm_before_gate:
        out = out * z * torch.sigmoid(z)
    return out


@pytest.mark.parametrize("group_size", [None, 4, 8])
@pytest.mark.parametrize("gate", ["none", "before_norm", "after_norm"])
def test_matches_the_formula(group_size, gate):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    z = None if gate == "none" else torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    norm_before_gate = gate == "after_norm"  # mamba_ssm's flag: normalise first, then gate
    norm = GatedRMSNorm(16, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=g, dtype=torch.float64))
    torch.testing.assert_close(norm(x, z), _formula(x, norm.weight, z, 1e-5, group_size, norm_before_gate),
                               rtol=1e-12, atol=1e-12)


def test_mamba_ssm_interface_and_parameter_names():
    # megatron-core's MambaMixer: ExtendedRMSNorm(d, eps=, group_size=, norm_before_gate=False, device=, dtype=)
    norm = GatedRMSNorm(8, eps=1e-5, group_size=4, norm_before_gate=False, device="cpu", dtype=torch.float32)
    assert list(norm.state_dict()) == ["weight"] and norm.bias is None
    assert torch.equal(norm.weight, torch.ones(8))


def test_low_precision_input_keeps_its_dtype():
    x = torch.randn(2, 8).to(torch.bfloat16)
    z = torch.randn(2, 8).to(torch.bfloat16)
    out = GatedRMSNorm(8, group_size=4, norm_before_gate=False)(x, z)
    assert out.dtype == torch.bfloat16
    want = _formula(x.double(), torch.ones(8, dtype=torch.float64), z.double(), 1e-5, 4, False)
    torch.testing.assert_close(out.double(), want, rtol=1e-2, atol=1e-2)
