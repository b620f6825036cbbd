"""Pure-torch Mamba-2 SSD scan: the stand-in for mamba_ssm's Triton ``mamba_chunk_scan_combined``.

megatron-core's ``MambaMixer`` calls ``mamba_chunk_scan_combined`` from ``mamba_ssm`` (Triton, GPU
only). This module computes the same function with plain torch ops, so Mamba-2 layers train on CPU
(and on GPUs without ``mamba_ssm``); autograd gives the backward pass.

The algorithm is the chunked "SSD minimal" form of Mamba-2 (Dao & Gu, arXiv 2405.21060, section 6,
listing 1): split the sequence into chunks of ``chunk_size`` tokens, then

1. diagonal blocks: inside each chunk the SSM is a masked attention-like product ``(C B^T o L) X``
   with the 1-semiseparable decay matrix ``L[i, j] = exp(sum_{k=j+1..i} dt_k A)``;
2. right factors of the off-diagonal blocks: each chunk's final state from a zero start,
   ``sum_j exp(a_end - a_j) B_j x_j``;
3. centre factors: a short recurrence over chunk boundaries carries the states forward;
4. left factors: each token reads the state entering its chunk through ``C_i exp(a_i)``.

Two details matter for training. The causal mask of the segment sum is applied *before* the
exponential (masked entries become ``-inf``, so ``exp`` gives exact zeros): multiplying ``exp`` by a
0/1 mask afterwards overflows above the diagonal and turns gradients into NaN. And the sequence is
padded to a multiple of the chunk size with ``dt = 0`` (decay 1, no input), which leaves outputs and the
final state unchanged; the padding is cut off again.

:func:`sequential_ssm_reference` is the token-by-token selective SSM recurrence (the paper's
equation 1, with ``A_t = exp(dt_t A)`` and ``B_t`` scaled by ``dt_t`` as in Mamba-2) that the tests
hold the chunked scan to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def discretize_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """The step size as mamba_ssm's kernels use it: ``clamp(softplus(dt + dt_bias), *dt_limit)``.

    The bias is added before the softplus (it is initialised as softplus's inverse of a step in
    ``[dt_min, dt_max]``), and the clamp applies only when a limit is set; softplus is linear above 20,
    as in ``F.softplus``'s default threshold and mamba_ssm's kernel.
    """
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for ``i >= j``, and ``-inf`` above the diagonal.

    ``exp(segment_sum(dt * A))`` is the decay matrix ``L`` of one chunk (arXiv 2405.21060, section 6,
    ``segsum``). Summing masked copies with a cumulative sum, rather than differencing one cumulative
    sum, avoids cancellation; the ``-inf`` fill comes before any ``exp`` (see the module docstring).
    """
    t = a.shape[-1]
    rows = a.unsqueeze(-1).expand(*a.shape, t)  # rows[..., k, j] = a_k
    strictly_below = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(-1)
    out = rows.masked_fill(~strictly_below, 0).cumsum(dim=-2)  # sum of a_k over j < k <= i
    causal = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(0)
    return out.masked_fill(~causal, float("-inf"))


def _heads_from_groups(bc: torch.Tensor, nheads: int) -> torch.Tensor:
    """(b, l, g, n) -> (b, l, h, n): head ``i`` reads group ``i // (h // g)``, as in mamba_ssm."""
    ngroups = bc.shape[2]
    assert nheads % ngroups == 0, f"nheads={nheads} is not a multiple of ngroups={ngroups}"
    return bc.repeat_interleave(nheads // ngroups, dim=2)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_states: torch.Tensor | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD scan on discretised inputs; returns ``(y, final_state)``.

    Shapes: x (b, l, h, p), dt (b, l, h) already discretised, A (h,), B and C (b, l, g, n),
    initial_states (b, h, p, n). ``y`` is (b, l, h, p) without the ``D`` skip or gate; the final state is
    (b, h, p, n). Steps 1-4 are those of the module docstring.

    ``matmul_dtype`` (default: the inputs' dtype): the operands of the large contractions (steps 1, 2
    and 4), as mamba_ssm's kernels feed bf16 to their tensor-core dots; decays, cumulative sums, the
    chunk recurrence (step 3) and every sum of products' results stay in the inputs' dtype.
    """
    batch, seqlen, nheads, _ = x.shape
    B = _heads_from_groups(B, nheads)
    C = _heads_from_groups(C, nheads)
    pad = (-seqlen) % chunk_size
    if pad:  # dt = 0 on padding: decay 1, no input, so outputs and the final state are unchanged
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    nchunks = (seqlen + pad) // chunk_size

    def chunked(t):
        return t.reshape(batch, nchunks, chunk_size, *t.shape[2:])

    xdt = chunked(x * dt.unsqueeze(-1))  # Euler step for B: dt * x
    B, C = chunked(B), chunked(C)
    a = chunked(dt * A).permute(0, 3, 1, 2)  # (b, h, c, l): log-decay per token
    a_cumsum = a.cumsum(dim=-1)

    compute = x.dtype
    mm = matmul_dtype or compute

    def gemm(spec: str, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return torch.einsum(spec, left.to(mm), right.to(mm)).to(compute)

    # 1. within chunks: y = (C B^T o L) (dt x)
    decay = torch.exp(segment_sum(a))  # (b, h, c, l, s)
    scores = gemm("bclhn,bcshn->bhcls", C, B) * decay
    y_diag = gemm("bhcls,bcshp->bclhp", scores, xdt)

    # 2. each chunk's own final state, from a zero start
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # (b, h, c, l)
    chunk_states = gemm("bclhn,bclhp->bchpn", B, decay_to_end.permute(0, 2, 3, 1).unsqueeze(-1) * xdt)

    # 3. recurrence over chunk boundaries (a segment sum over chunks, with the initial state first)
    if initial_states is None:
        initial_states = torch.zeros_like(chunk_states[:, 0])
    states = torch.cat([initial_states.to(chunk_states.dtype).unsqueeze(1), chunk_states], dim=1)
    chunk_decay = torch.exp(segment_sum(F.pad(a_cumsum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    entering, final_state = states[:, :-1], states[:, -1]

    # 4. the state entering each chunk, read out at each token
    y_off = gemm("bclhn,bchpn->bclhp", C, entering) * torch.exp(a_cumsum).permute(0, 2, 3, 1).unsqueeze(-1)

    y = (y_diag + y_off).reshape(batch, nchunks * chunk_size, *x.shape[2:])
    return y[:, :seqlen], final_state


def _skip_and_gate(y, x, D, z):
    """``y + D x``, then ``* silu(z)``: the skip connection and gate of mamba_ssm's chunk scan."""
    if D is not None:
        y = y + x * (D.unsqueeze(-1) if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    return y


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
    state_dtype: torch.dtype | None = None,
):
    """Drop-in for ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`` (same arguments).

    x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n), D (h,) or (h, p), z (b, l, h, p),
    dt_bias (h,), initial_states (b, h, p, n). Returns y (b, l, h, p) in ``x.dtype``, plus the final
    state (b, h, p, n) when ``return_final_states``. Computes in at least float32, with the large
    contractions' operands in ``x.dtype`` when that is bf16 / fp16 (as mamba_ssm's kernels: fp32 operands
    there ran as SIMT GEMMs, an eighth of a hybrid training step on an H200).

    Packed sequences (``seq_idx``) and per-sequence states (``return_varlen_states``) are used only by
    megatron-core's dynamic-batching inference, which also needs ``causal_conv1d``; they are not
    implemented here.
    """
    if seq_idx is not None or return_varlen_states:
        raise NotImplementedError(
            "the pure-torch SSD scan has no packed-sequence support (seq_idx / return_varlen_states); "
            "install mamba_ssm and causal_conv1d for dynamic-batching inference"
        )
    out_dtype = x.dtype
    compute = torch.promote_types(x.dtype, torch.float32)
    dt = discretize_dt(dt.to(compute), dt_bias, dt_softplus, dt_limit)
    x_c = x.to(compute)
    y, final_state = ssd_chunked(
        x_c, dt, A.to(compute), B.to(compute), C.to(compute), chunk_size,
        None if initial_states is None else initial_states.to(compute),
        matmul_dtype=x.dtype if x.dtype in (torch.bfloat16, torch.float16) else None,
    )
    y = _skip_and_gate(y, x_c, None if D is None else D.to(compute), None if z is None else z.to(compute))
    y = y.to(out_dtype)
    if return_final_states:
        return y, final_state.to(state_dtype or C.dtype)
    return y


def sequential_ssm_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective SSM one token at a time (slow; the ground truth for tests).

    ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t + D x_t`` (then ``* silu(z_t)``), with
    ``dt`` already discretised. Shapes as :func:`ssd_chunked`; returns ``(y, final_state)``.
    """
    batch, seqlen, nheads, headdim = x.shape
    B = _heads_from_groups(B, nheads)
    C = _heads_from_groups(C, nheads)
    h = (
        x.new_zeros(batch, nheads, headdim, B.shape[-1])
        if initial_states is None
        else initial_states
    )
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dt[:, t] * A)[..., None, None]  # (b, h, 1, 1)
        inp = (dt[:, t, :, None] * x[:, t]).unsqueeze(-1) * B[:, t].unsqueeze(-2)  # (b, h, p, n)
        h = decay * h + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, dim=1)
    return _skip_and_gate(y, x, D, z), h
