"""What :func:`mamba_torch.apply` binds into megatron-core, and the fused-path stand-in's maths."""

import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.models import mamba_torch
from megatron_ext.models.gated_rmsnorm import GatedRMSNorm
from megatron_ext.models.ssd_scan_reference import sequential_ssm_reference

needs_no_mamba_ssm = pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is not None,
                                        reason="mamba_ssm is installed: megatron-core uses its kernels")


def _causal_conv_by_taps(x, weight, bias):
    """x (b, l, d), weight (d, w): out_t = bias + sum_k weight[:, k] * x_{t-w+1+k}, zeros before the start."""
    width = weight.shape[1]
    out = bias.expand_as(x).clone()
    for k in range(width):
        shift = width - 1 - k
        out[:, shift:] += weight[:, k] * x[:, : x.shape[1] - shift]
    return out


@pytest.mark.parametrize("with_norm_and_outproj", [False, True])
def test_split_conv1d_scan_equals_its_parts_composed_by_hand(with_norm_and_outproj):
    g = torch.Generator().manual_seed(0)
    f64 = dict(dtype=torch.float64)
    batch, seqlen, nheads, headdim, ngroups, dstate, width = 2, 11, 4, 3, 2, 5, 4
    dim = nheads * headdim
    zxbcdt = torch.randn(batch, seqlen, 2 * dim + 2 * ngroups * dstate + nheads, generator=g, **f64)
    conv_w = torch.randn(dim + 2 * ngroups * dstate, width, generator=g, **f64)
    conv_b = torch.randn(dim + 2 * ngroups * dstate, generator=g, **f64)
    dt_bias, D = torch.randn(nheads, generator=g, **f64), torch.randn(nheads, generator=g, **f64)
    A = -torch.rand(nheads, generator=g, **f64) - 0.5
    norm_w = torch.randn(dim, generator=g, **f64) if with_norm_and_outproj else None
    proj_w = torch.randn(7, dim, generator=g, **f64) if with_norm_and_outproj else None

    out = mamba_torch.mamba_split_conv1d_scan_combined(
        zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk_size=4, headdim=headdim, ngroups=ngroups,
        rmsnorm_weight=norm_w, rmsnorm_eps=1e-5, outproj_weight=proj_w, norm_before_gate=False,
    )

    z, xbc, dt = zxbcdt.split([dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xbc = F.silu(_causal_conv_by_taps(xbc, conv_w, conv_b))
    x, B, C = xbc.split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x = x.reshape(batch, seqlen, nheads, headdim)
    z4 = z.reshape(batch, seqlen, nheads, headdim)
    y, _ = sequential_ssm_reference(
        x, F.softplus(dt + dt_bias), A, B.reshape(batch, seqlen, ngroups, dstate),
        C.reshape(batch, seqlen, ngroups, dstate), D=D, z=None if with_norm_and_outproj else z4,
    )
    y = y.reshape(batch, seqlen, dim)
    if with_norm_and_outproj:
        norm = GatedRMSNorm(dim, eps=1e-5, group_size=dim // ngroups, norm_before_gate=False, dtype=torch.float64)
        norm.weight.data.copy_(norm_w)
        y = norm(y, z) @ proj_w.T
    torch.testing.assert_close(out, y, rtol=1e-9, atol=1e-9)


@needs_no_mamba_ssm
def test_apply_binds_the_torch_kernels_into_megatron_core_once():
    assert mamba_torch.apply() is True
    assert mamba_torch.apply() is True  # idempotent
    mamba_mixer = importlib.import_module("megatron.core.ssm.mamba_mixer")
    assert mamba_mixer.HAVE_MAMBA_SSM
    assert mamba_mixer.mamba_chunk_scan_combined is mamba_torch.mamba_chunk_scan_combined
    assert mamba_mixer.mamba_split_conv1d_scan_combined is mamba_torch.mamba_split_conv1d_scan_combined
    assert mamba_mixer.ExtendedRMSNorm is mamba_torch.ShardedGatedRMSNorm
    assert mamba_mixer.causal_conv1d_fn is None  # megatron-core's own nn.Conv1d fallback stays in use


@needs_no_mamba_ssm
def test_dynamic_batching_inference_fails_with_a_clear_error():
    mamba_torch.apply()
    mamba_mixer = importlib.import_module("megatron.core.ssm.mamba_mixer")
    with pytest.raises(NotImplementedError, match="dynamic-batching"):
        mamba_mixer.causal_conv1d_varlen_states(torch.zeros(4, 2), torch.tensor([0, 4]), state_len=3)
    if importlib.util.find_spec("triton") is None:
        with pytest.raises(NotImplementedError, match="dynamic-batching"):
            mamba_mixer.tensor_masked_update(torch.zeros(2, 2), torch.tensor([0]), torch.zeros(1, 2))
