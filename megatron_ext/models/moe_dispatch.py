"""MoE token permutation without host syncs, for grouped-GEMM experts with every expert on the rank.

megatron-core's allgather dispatcher copies the per-expert token counts to the host (``.cpu()``) and
permutes with ``masked_select``, whose output size is data-dependent: two host syncs per MoE layer
and micro-batch. Each drains the GPU's queue, and the next kernels wait for Python to launch them; on
one H200 an MoE training step spent a third of its time with the GPU idle that way.

Neither sync is needed when the number of routed rows is known on the host: with dropless top-k
routing every token goes to exactly k experts, so with all experts local (EP 1) the permuted batch
has ``tokens x k`` rows. :class:`DroplessAllGatherDispatcher` then finds the rows with
``torch.nonzero_static`` (same order as megatron-core's ``permute``: expert-major, tokens ascending)
and leaves the counts on the GPU, which the grouped GEMM (:mod:`megatron_ext.models.grouped_experts`)
takes as they are. Knowing each token's rows also turns the combine (megatron-core: a ``scatter_add_``)
and both backward passes into gathers (:class:`_GatherSum`): no atomic adds, the same sums.

:func:`install` puts it into a built model's MoE layers where that holds (grouped-GEMM experts, all
local, allgather); per forward it falls back to megatron-core's own permutation when the row count is
not known (a padding mask, or capacity routing, which generation switches off). Installed after building,
not through a ``MoELayer`` subclass in the spec, so megatron-core's layers still pass their process
groups to ``MoELayer`` (they do so only for ``MoELayer`` itself).
"""

from __future__ import annotations

import types

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher


class _GatherSum(torch.autograd.Function):
    """``y[i] = sum_j x[index[i * k + j]]`` over rows, with the adjoint gather-sum as its backward.

    Permuting tokens to experts (each token copied to its k rows) and combining them back (each token
    the sum of its k rows) are adjoint gathers once both index maps are known: the backward of each is
    the other's forward. Autograd's own backward of ``index_select`` and megatron-core's combine
    (``scatter_add_``) are atomic adds instead, k-way contended in bf16 under top-k routing.
    """

    @staticmethod
    def forward(ctx, x, index, k, back_index, back_k):
        ctx.save_for_backward(back_index)
        ctx.back_k = back_k
        return _gather_sum(x, index, k)

    @staticmethod
    def backward(ctx, grad):
        (back_index,) = ctx.saved_tensors
        return _gather_sum(grad, back_index, ctx.back_k), None, None, None, None


def _gather_sum(x: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    rows = x.index_select(0, index)
    return rows if k == 1 else rows.view(-1, k, x.shape[-1]).sum(dim=1)


class DroplessAllGatherDispatcher(MoEAllGatherTokenDispatcher):
    """megatron-core's allgather dispatcher; with ``rows_known`` (every token routed to exactly top-k
    local experts) its permutation runs without host syncs and both directions are gathers."""

    rows_known: bool = False
    _rows_of_token: torch.Tensor | None = None   # set by a sync-free dispatch for its combine

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        self._rows_of_token = None
        if not self.rows_known:
            return super().dispatch_postprocess(hidden_states, probs)
        self.hidden_shape_before_permute = hidden_states.shape
        self.local_map = self.routing_map.contiguous()          # every expert is local
        num_tokens, k = self.local_map.shape[0], self.router_topk
        # [experts, tokens] flattened: the routed (expert, token) pairs, expert-major, tokens ascending
        pairs = torch.nonzero_static(self.local_map.T.reshape(-1), size=num_tokens * k)
        pairs = pairs.view(-1)
        token_of_row = pairs % num_tokens
        self.reversed_local_input_permutation_mapping = token_of_row
        # each token's k rows, token-major: the inverse of token_of_row, grouped by token
        self._rows_of_token = torch.argsort(token_of_row, stable=True)
        self.local_probs = probs.T.reshape(-1).index_select(0, pairs)
        tokens_per_expert = self.local_map.sum(dim=0)           # stays on the device
        self.routing_map = None
        permuted = _GatherSum.apply(hidden_states, token_of_row, 1, self._rows_of_token, k)
        return permuted, tokens_per_expert, self.local_probs

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        rows_of_token, self._rows_of_token = self._rows_of_token, None
        if rows_of_token is None:
            return super().combine_preprocess(hidden_states)
        return _GatherSum.apply(hidden_states, rows_of_token, self.router_topk,
                                self.reversed_local_input_permutation_mapping, 1)


def applies(layer: MoELayer) -> bool:
    """Whether :class:`DroplessAllGatherDispatcher` can serve ``layer``: grouped-GEMM experts (they take
    device-side counts), allgather dispatch, every expert on this rank, no padding of expert inputs, no
    shared-expert overlap. Capacity routing is fine: those calls take megatron-core's permutation, and
    generation (dropless routing) the sync-free one, which its CUDA-graph decode step needs."""
    from megatron_ext.models.grouped_experts import TorchGroupedMLP

    config = layer.config
    return (isinstance(layer.experts, TorchGroupedMLP)
            and type(layer.token_dispatcher) is MoEAllGatherTokenDispatcher
            and layer.num_local_experts == config.num_moe_experts
            and not config.moe_pad_expert_input_to_capacity
            and not config.moe_shared_expert_overlap)


def _rows_known_for_this_call(layer: MoELayer, args, kwargs) -> None:
    """Forward pre-hook: every token goes to exactly top-k experts in this call (no padding mask; the
    router in dropless mode: generation switches capacity off on the router's config copy)."""
    padding_mask = kwargs.get("padding_mask", args[2] if len(args) > 2 else None)
    layer.token_dispatcher.rows_known = (
        padding_mask is None
        and getattr(layer.router, "routing_mode", "dropless") == "dropless"
        and layer.router.config.moe_expert_capacity_factor is None)


def install(model) -> int:
    """Give every MoE layer of ``model`` (a module or a list of chunks) where :func:`applies` the
    sync-free dispatcher; returns how many layers got it. Idempotent."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    count = 0
    for chunk in chunks:
        for layer in chunk.modules():
            if isinstance(layer, MoELayer) and applies(layer):
                old = layer.token_dispatcher
                groups = types.SimpleNamespace(ep=old.ep_group, expt_tp=old.tp_group, tp_ep=old.tp_ep_group)
                layer.token_dispatcher = DroplessAllGatherDispatcher(
                    layer.num_local_experts, layer.local_expert_indices, config=layer.config,
                    pg_collection=groups)
                layer.register_forward_pre_hook(_rows_known_for_this_call, with_kwargs=True)
                count += 1
    return count
