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
takes as they are. :class:`FastMoELayer` installs it where that holds and, per forward, falls back to
megatron-core's own path when it does not (a padding mask, or capacity routing turned on).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher


class DroplessAllGatherDispatcher(MoEAllGatherTokenDispatcher):
    """megatron-core's allgather dispatcher; with ``rows_known`` (every token routed to exactly top-k
    local experts) its permutation runs without host syncs."""

    rows_known: bool = False

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        if not self.rows_known:
            return super().dispatch_postprocess(hidden_states, probs)
        self.hidden_shape_before_permute = hidden_states.shape
        self.local_map = self.routing_map.contiguous()          # every expert is local
        num_tokens = self.local_map.shape[0]
        # [experts, tokens] flattened: the routed (expert, token) pairs, expert-major, tokens ascending
        pairs = torch.nonzero_static(self.local_map.T.reshape(-1), size=num_tokens * self.router_topk)
        pairs = pairs.view(-1)
        token_of_row = pairs % num_tokens
        self.reversed_local_input_permutation_mapping = token_of_row
        self.local_probs = probs.T.reshape(-1).index_select(0, pairs)
        tokens_per_expert = self.local_map.sum(dim=0)           # stays on the device
        self.routing_map = None
        return hidden_states.index_select(0, token_of_row), tokens_per_expert, self.local_probs


def applies(config, num_local_experts: int) -> bool:
    """Whether :class:`DroplessAllGatherDispatcher` can serve a layer: allgather dispatch, all experts
    on this rank, no capacity (dropless) and no padding of expert inputs."""
    return (config.moe_token_dispatcher_type == "allgather"
            and num_local_experts == config.num_moe_experts
            and config.moe_expert_capacity_factor is None
            and not config.moe_pad_expert_input_to_capacity)


class FastMoELayer(MoELayer):
    """megatron-core's ``MoELayer`` with :class:`DroplessAllGatherDispatcher` where :func:`applies`."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        if pg_collection is None:   # as MoELayer does; the dispatcher needs the same groups
            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection)
        if applies(config, self.num_local_experts):
            self.token_dispatcher = DroplessAllGatherDispatcher(
                self.num_local_experts, self.local_expert_indices, config=self.config,
                pg_collection=pg_collection)

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        if isinstance(self.token_dispatcher, DroplessAllGatherDispatcher):
            # the router's config, not the layer's: generation switches capacity off on the router
            router_config = self.router.config
            self.token_dispatcher.rows_known = (
                padding_mask is None
                and getattr(self.router, "routing_mode", "dropless") == "dropless"
                and router_config.moe_expert_capacity_factor is None)
        return super().forward(hidden_states, intermediate_tensors=intermediate_tensors, padding_mask=padding_mask)
