"""Pure-torch gated, grouped RMSNorm: the stand-in for mamba_ssm's Triton ``layernorm_gated.RMSNorm``.

Mamba-2 normalises the SSM output after gating it with the ``z`` branch, ``RMSNorm(y * silu(z))``:
the extra normalisation layer before the output projection, added for stability (arXiv 2405.21060,
section 7, block design). With tensor parallelism the norm runs over groups of channels
(``group_size = d_inner / ngroups``; section 8, tensor parallelism: a grouped norm whose groups never
straddle two TP ranks), so it needs no communication and gives the same result for every TP size.
megatron-core's ``MambaMixer`` builds it with ``norm_before_gate=False``.

:class:`GatedRMSNorm` has mamba_ssm's constructor and parameter names (``weight``; ``bias`` registered
as ``None``), so state dicts move between this and the Triton module unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
) -> torch.Tensor:
    """``rmsnorm(x * silu(z))`` (or ``rmsnorm(x) * silu(z)`` when ``norm_before_gate``), per group.

    The statistics are taken over each ``group_size`` slice of the last dimension (all of it when
    ``None``), in at least float32; the result has ``x``'s dtype.
    """
    out_dtype = x.dtype
    compute = torch.promote_types(x.dtype, torch.float32)
    x = x.to(compute)
    z = None if z is None else z.to(compute)
    if z is not None and not norm_before_gate:
        x = x * F.silu(z)
    hidden = x.shape[-1]
    group_size = group_size or hidden
    assert hidden % group_size == 0, f"hidden size {hidden} is not a multiple of group_size {group_size}"
    grouped = x.reshape(*x.shape[:-1], hidden // group_size, group_size)
    rstd = torch.rsqrt(grouped.square().mean(dim=-1, keepdim=True) + eps)
    out = (grouped * rstd).reshape(x.shape) * weight.to(compute)
    if bias is not None:
        out = out + bias.to(compute)
    if z is not None and norm_before_gate:
        out = out * F.silu(z)
    return out.to(out_dtype)


class GatedRMSNorm(torch.nn.Module):
    """``mamba_ssm.ops.triton.layernorm_gated.RMSNorm`` in plain torch (same arguments and parameters)."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        group_size: int | None = None,
        norm_before_gate: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate

    def reset_parameters(self):
        torch.nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if z is not None and z.shape != x.shape and z.numel() == x.numel():
            # megatron-core 0.19's torch decode step passes the gate with its sequence axis squeezed
            # and x with it restored ((b, d) vs (b, 1, d)): pair them element for element
            z = z.view_as(x)
        return gated_rms_norm(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                              norm_before_gate=self.norm_before_gate)
