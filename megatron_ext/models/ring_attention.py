"""Causal attention under context parallelism (CP) without Transformer Engine: a ring of K/V.

megatron-core's CP attention is Transformer Engine's (its local ``DotProductAttention`` refuses CP);
torch's own ring attention (``torch.distributed.tensor.experimental.context_parallel``) is private,
drives SDPA through DTensor dispatch and has CUDA kernels only. This module is the ring for our SDPA /
CLA core attention, on GPUs and on CPUs (gloo) alike.

Layout: megatron-core's load-balanced causal order (``get_batch_on_this_cp_rank``): the sequence is
cut into 2 x CP chunks of ``c`` tokens and CP rank ``r`` holds chunks ``r`` and ``2CP-1-r``, so every
rank does the same causal work. Each rank's local [2c] queries, keys and values are in that order.

Forward (Liu et al. 2023, "Ring Attention", arXiv 2310.01889, on the load-balanced "zigzag" causal
split that Transformer Engine's p2p CP uses): K/V travel round the ring, one hop per step,
the next hop's send / receive posted before the local block is computed so they overlap it. At step
``i`` rank ``r`` holds the K/V of rank ``s = (r - i) mod CP``; by chunk order:

- ``i = 0`` (own K/V): causal attention over the local 2c tokens (chunk ``r`` precedes ``2CP-1-r``);
- ``s < r``: both local query chunks come after chunk ``s`` and before chunk ``2CP-1-s``: all queries
  against the first half of the K/V, unmasked;
- ``s > r``: query chunk ``r`` precedes both K/V chunks; query chunk ``2CP-1-r`` follows both: the
  second half of the queries against all of the K/V, unmasked.

Block results merge by their log-sum-exp in fp32 (fp64 for fp64 inputs): ``lse = logaddexp(lse_a,
lse_b)``, ``out = out_a exp(lse_a - lse) + out_b exp(lse_b - lse)``. The backward runs the same ring:
each block's gradients come from the final output and log-sum-exp (the flash-attention backward), dQ
stays local, and dK / dV ride the ring with their K/V, accumulated in fp32 by every rank that used
them, and reach their owner after the last hop. GQA: the ring carries the grouped K/V (no copies on
the wire); each block expands them to the query heads and sums their gradients back.

Block kernels: torch's flash attention (``_scaled_dot_product_flash_attention`` on CUDA for fp16 /
bf16, ``..._for_cpu`` on CPUs for every float type), which return the log-sum-exp and take it back in
the backward; else (fp32 on CUDA) a plain-torch block that materialises the scores.
``$TURBOLASER_RING_KERNEL=math`` forces the latter (tests compare the two).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

KERNEL_ENV = "TURBOLASER_RING_KERNEL"   # auto (default) | flash | math


# ----------------------------------------------------------------------------------------------
# One block of attention with its log-sum-exp: [b, h, sq, d] x [b, h, sk, d]
# ----------------------------------------------------------------------------------------------


def _kernel(q: Tensor) -> str:
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "flash", "math"):
        raise ValueError(f"${KERNEL_ENV}={choice!r}: use auto, flash or math")
    if choice != "auto":
        return choice
    if q.is_cuda:
        return "flash" if q.dtype in (torch.float16, torch.bfloat16) else "math"
    return "flash"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(out [b, h, sq, d] in q's dtype, log-sum-exp [b, h, sq] in the accumulation dtype)."""
    kind = _kernel(q)
    if kind == "flash" and q.is_cuda:
        q, k, v = (t.contiguous() for t in (q, k, v))   # ring steps pass half-sequence slices
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    elif kind == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    else:
        acc = _acc_dtype(q.dtype)
        scores = _scores(q, k, causal, scale)
        lse = scores.logsumexp(-1)
        out = ((scores - lse.unsqueeze(-1)).exp() @ v.to(acc)).to(q.dtype)
    return out, lse.to(_acc_dtype(q.dtype))


def _block_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                    scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV of one block, given the *final* output and log-sum-exp of its query rows."""
    kind = _kernel(q)
    if kind == "flash" and q.is_cuda:
        # dense inputs: no cumulative sequence lengths (the forward returns None for them; a tensor,
        # even an empty one, selects the varlen kernel); no dropout, so no philox seed / offset
        dout, q, k, v, out = (t.contiguous() for t in (dout, q, k, v, out))
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse.float().contiguous(), None, None, q.size(2), k.size(2), 0.0, causal,
            None, None, scale=scale)
    if kind == "flash":
        lse = lse.to(torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale)
    acc = _acc_dtype(q.dtype)
    q_, k_, v_, do = (t.to(acc) for t in (q, k, v, dout))
    p = (_scores(q, k, causal, scale) - lse.to(acc).unsqueeze(-1)).exp()
    dv = p.transpose(-1, -2) @ do
    dp = do @ v_.transpose(-1, -2)
    ds = p * (dp - (do * out.to(acc)).sum(-1, keepdim=True))
    return ((ds @ k_) * scale).to(q.dtype), ((ds.transpose(-1, -2) @ q_) * scale).to(k.dtype), dv.to(v.dtype)


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float) -> Tensor:
    acc = _acc_dtype(q.dtype)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    if causal:
        sq, sk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(sk - sq + 1),
                                    float("-inf"))
    return scores


# ----------------------------------------------------------------------------------------------
# The ring
# ----------------------------------------------------------------------------------------------


class _Ring:
    """Neighbours of this rank in the CP group; one hop = send to the next rank, receive from the previous."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def hop(self, tensor: Tensor) -> tuple[Tensor, list]:
        """Post the send of ``tensor`` to the next rank and the receive of the previous rank's; returns
        the receive buffer and the handles to wait on before reading it (or reusing ``tensor``)."""
        received = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, self.next, self.group),
               dist.P2POp(dist.irecv, received, self.prev, self.group)]
        return received, dist.batch_isend_irecv(ops)

    def blocks(self, step: int, c: int) -> tuple[slice, slice, bool]:
        """(query rows, key rows, causal) of ``step``, which holds the K/V of rank ``(rank - step) mod
        size`` (the module docstring's three cases)."""
        everything = slice(None)
        if step == 0:
            return everything, everything, True
        if (self.rank - step) % self.size < self.rank:
            return everything, slice(0, c), False
        return slice(c, None), everything, False


def _wait(handles: list) -> None:
    for handle in handles:
        handle.wait()


def _expand(kv: Tensor, cols: slice, heads: int) -> tuple[Tensor, Tensor]:
    """K and V rows ``cols`` of a stacked [2, b, groups, s, d] K/V, as [b, heads, rows, d] each
    (query head j reads group j // (heads / groups))."""
    k, v = kv[0][:, :, cols], kv[1][:, :, cols]
    if k.size(1) == heads:
        return k, v
    return k.repeat_interleave(heads // k.size(1), dim=1), v.repeat_interleave(heads // v.size(1), dim=1)


def _reduce_groups(grad: Tensor, groups: int) -> Tensor:
    """Sum the expanded heads' gradients back onto their K/V group."""
    b, heads, s, d = grad.shape
    return grad if heads == groups else grad.view(b, groups, heads // groups, s, d).sum(2)


class _RingAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, group) -> Tensor:
        ring = _Ring(group)
        heads, c = q.size(1), q.size(2) // 2
        acc = _acc_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
        kv = torch.stack([k, v])
        for step in range(ring.size):
            pending = ring.hop(kv) if step < ring.size - 1 else None
            rows, cols, causal = ring.blocks(step, c)
            o, l = _block_forward(q[:, :, rows], *_expand(kv, cols, heads), causal, scale)
            merged = torch.logaddexp(lse[:, :, rows], l)
            out[:, :, rows] = (out[:, :, rows] * (lse[:, :, rows] - merged).exp().unsqueeze(-1)
                               + o.to(acc) * (l - merged).exp().unsqueeze(-1))
            lse[:, :, rows] = merged
            if pending is not None:
                kv, handles = pending
                _wait(handles)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.group = scale, group
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        heads, groups, c = q.size(1), k.size(1), q.size(2) // 2
        acc = _acc_dtype(q.dtype)
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)   # dK / dV of the K/V held this step
        incoming = None   # the previous rank's dK / dV of the next step's K/V, in flight
        for step in range(ring.size):
            pending = ring.hop(kv) if step < ring.size - 1 else None
            rows, cols, causal = ring.blocks(step, c)
            dq_b, dk_b, dv_b = _block_backward(dout[:, :, rows], q[:, :, rows], *_expand(kv, cols, heads),
                                               out[:, :, rows], lse[:, :, rows], causal, ctx.scale)
            dq[:, :, rows] += dq_b
            if incoming is not None:
                dkv, handles = incoming
                _wait(handles)
            dkv[0][:, :, cols] += _reduce_groups(dk_b, groups)
            dkv[1][:, :, cols] += _reduce_groups(dv_b, groups)
            # this K/V's gradient goes on with it; after the last step that hop takes it home
            incoming = ring.hop(dkv)
            if pending is not None:
                kv, handles = pending
                _wait(handles)
        dkv, handles = incoming
        _wait(handles)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, group) -> Tensor:
    """Causal attention of this CP rank's queries over the whole sequence's keys.

    ``q`` [b, heads, 2c, d], ``k`` / ``v`` [b, groups, 2c, d] (heads a multiple of groups): the local
    tokens of chunks ``r`` and ``2CP-1-r`` (megatron-core's ``get_batch_on_this_cp_rank``). Returns
    [b, heads, 2c, d], the rows of causal attention over the full sequence that belong to these tokens.
    """
    if q.size(2) % 2:
        raise ValueError(f"ring attention needs an even local sequence (two chunks), got {q.size(2)}")
    if dist.get_world_size(group) == 1:
        raise ValueError("ring_attention needs a context-parallel group of two or more ranks")
    return _RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale, group)
