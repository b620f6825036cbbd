"""Expert capacity for megatron-core's top-k router: dropless, drop, or Hunyuan-Large's recycle routing.

An expert with a capacity (``capacity_factor * tokens * topk / experts``, megatron-core's ``get_capacity``)
must do something with the tokens beyond it. Three modes:

- ``dropless``: no capacity (megatron-core's default).
- ``drop``: megatron-core's own drop path (``moe_expert_capacity_factor``, ``moe_token_drop_policy``);
  routed experts contribute nothing for a dropped (token, expert) assignment. The shared expert still
  sees every token.
- ``recycle`` (Hunyuan-Large, arXiv 2411.02265, "Recycle Routing"): the assignments an
  over-capacity expert would drop are re-assigned at random to experts of the layer that still have
  room, so nothing is lost and every expert stays within capacity.

The capacity factor and drop policy are megatron-core's own ``TransformerConfig`` fields in every
mode; the mode itself travels in the layer spec (:func:`moe_module_spec`), because
``TransformerConfig`` takes no unknown fields and ``MoESubmodules.router`` is a builder called as
``router(config=..., pg_collection=...)``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.tensor_parallel.random import (
    get_cuda_rng_tracker,
    get_data_parallel_rng_tracker_name,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping, get_capacity
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ext.mcore_compat import moe_submodules
from megatron_ext.errors import ConfigError
from megatron_ext.models.grouped_experts import use_grouped_gemm
from megatron_ext.models.sdpa_attention import FastSpecProvider

RoutingMode = Literal["dropless", "drop", "recycle"]
ROUTING_MODES: tuple[str, ...] = ("dropless", "drop", "recycle")


@dataclass
class RoutingStats:
    """What capacity did to one router forward (this rank's tokens; the trainer reads and logs it).

    ``dropped`` and ``recycled`` count (token, expert) assignments, 0-d long tensors on the routing
    device so reading them is the trainer's choice of sync point. With top-1 (Hunyuan-Large) an
    assignment is a token.
    """

    num_tokens: int
    topk: int
    capacity: Optional[int]
    dropped: torch.Tensor
    recycled: torch.Tensor


def check_routing_config(config: TransformerConfig, routing_mode: str) -> None:
    """Reject mode / capacity combinations that cannot mean what the user wants."""
    if routing_mode not in ROUTING_MODES:
        raise ConfigError(
            f"model.moe_routing_mode={routing_mode!r}: choose one of {list(ROUTING_MODES)}"
        )
    capacity_factor = config.moe_expert_capacity_factor
    if routing_mode == "dropless" and capacity_factor is not None:
        raise ConfigError(
            f"model.moe_expert_capacity_factor={capacity_factor} with model.moe_routing_mode=dropless: "
            "remove the capacity factor, or set moe_routing_mode to 'drop' or 'recycle'"
        )
    if routing_mode != "dropless" and capacity_factor is None:
        raise ConfigError(
            f"model.moe_routing_mode={routing_mode} needs model.moe_expert_capacity_factor "
            "(e.g. 1.0; Hunyuan-TurboS uses 1.5)"
        )
    if routing_mode != "dropless" and config.moe_pad_expert_input_to_capacity:
        raise ConfigError(
            "model.moe_pad_expert_input_to_capacity=true: padding experts to a fixed size (alltoall / "
            f"CUDA graphs) is not supported with moe_routing_mode={routing_mode}; set it to false"
        )


def routing_probs_for_map(
    logits: torch.Tensor, routing_map: torch.Tensor, config: TransformerConfig
) -> torch.Tensor:
    """The weights megatron-core's top-k routing would give had it picked ``routing_map``'s experts.

    Mirrors ``topk_routing_with_score_function``: softmax over all experts then select
    (``moe_router_pre_softmax``), softmax over the selected logits, or sigmoid normalised over the
    selection when top-k > 1; then ``moe_router_topk_scaling_factor``. For Hunyuan-Large's top-1
    pre-softmax router a recycled token is weighted by its gate for the new expert, as in Hunyuan's
    released top-1 gating. Rows with no expert give zeros (a finite mask value keeps their gradient
    free of NaN).
    """
    if config.moe_router_score_function == "softmax":
        if config.moe_router_pre_softmax:
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
        else:
            masked = logits.masked_fill(~routing_map, torch.finfo(logits.dtype).min)
            probs = torch.softmax(masked, dim=-1, dtype=torch.float32).type_as(logits)
    elif config.moe_router_score_function == "sigmoid":
        probs = torch.sigmoid(logits.float()).type_as(logits) * routing_map
        if config.moe_router_topk > 1:
            probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        raise ValueError(f"unknown moe_router_score_function {config.moe_router_score_function!r}")
    if config.moe_router_topk_scaling_factor:
        probs = probs * config.moe_router_topk_scaling_factor
    return probs * routing_map


def recycle_assignments(
    routing_map: torch.Tensor, kept_map: torch.Tensor, capacity: int, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-assign the dropped (token, expert) assignments to experts with room; returns (map, left over).

    ``routing_map`` is the router's top-k choice, ``kept_map`` what survives the capacity (each expert
    keeps at most ``capacity`` tokens), ``noise`` uniform [0, 1) of shape [tokens, experts + 1]: the only
    randomness, so the same noise gives the same assignment.

    Each dropped assignment draws a new expert among those with room that the token does not already
    use, with probability proportional to the room left (Gumbel-max over log(room)): the same law as
    Hunyuan's released gating, which shuffles the free capacity slots. Experts offered more tokens
    than they have room for take first the tokens with the fewest alternatives (ties at random), the
    rest draw again. Every round either fills an expert or places one more assignment of every
    token still drawing, so there are at most experts + top-k rounds. With top-1 and capacity factor
    >= 1 everything is placed; with top-k > 1 an assignment whose token already uses every expert
    with room is left over (dropped and counted), as are those beyond the total capacity when the
    capacity factor is below 1.
    """
    num_tokens, num_experts = routing_map.shape
    assert noise.shape == (num_tokens, num_experts + 1), noise.shape
    room = capacity - kept_map.sum(dim=0)
    assert bool((room >= 0).all()), "kept_map exceeds the capacity"
    final_map = kept_map.clone()
    # Only tokens that lost an assignment take part: work on their rows.
    rows = (routing_map & ~kept_map).any(dim=1).nonzero().squeeze(1)
    pending = (routing_map[rows] & ~kept_map[rows]).sum(dim=1)
    taken = kept_map[rows]
    tiny = torch.finfo(noise.dtype).tiny
    gumbel = -torch.log(-torch.log(noise[rows, :num_experts].clamp_min(tiny)))
    tie_break = noise[rows, num_experts]
    max_rounds = num_experts + (int(pending.max()) if rows.numel() else 0)
    for round_ in itertools.count():
        eligible = (room > 0).unsqueeze(0) & ~taken & (pending > 0).unsqueeze(1)
        drawing = eligible.any(dim=1).nonzero().squeeze(1)
        if drawing.numel() == 0:
            break
        assert round_ < max_rounds, "recycle routing did not converge within experts + top-k rounds"
        log_room = torch.log(room.clamp_min(1).to(gumbel.dtype))
        key = torch.where(eligible[drawing], log_room + gumbel[drawing], -math.inf)
        choice = key.argmax(dim=1)
        # Sort offers by (expert, fewest alternatives first, random); each expert takes its first `room`.
        order = eligible[drawing].sum(dim=1).to(torch.float64) - tie_break[drawing].to(torch.float64)
        perm = (choice.to(torch.float64) * (num_experts + 1) + order).argsort(stable=True)
        drawing, choice = drawing[perm], choice[perm]
        offers = torch.bincount(choice, minlength=num_experts)
        rank = torch.arange(choice.numel(), device=choice.device) - (offers.cumsum(0) - offers)[choice]
        accepted = rank < room[choice]
        drawing, choice = drawing[accepted], choice[accepted]
        taken[drawing, choice] = True
        pending[drawing] -= 1
        room = room - torch.bincount(choice, minlength=num_experts)
    final_map[rows] = taken
    return final_map, pending.sum()


class RecycleRouter(TopKRouter):
    """megatron-core's ``TopKRouter`` with a capacity mode (dropless / drop / recycle) and drop statistics.

    Gating, top-k, z-loss and the load-balancing aux loss are megatron-core's, computed on the router's
    original choice in every mode (the aux loss comes from the logits, whatever capacity does later).
    ``drop`` is megatron-core's drop path unchanged. ``recycle`` runs megatron-core's routing
    dropless (this router keeps a config copy without the capacity factor), applies megatron-core's
    ``apply_router_token_dropping`` with the configured capacity factor and drop policy, then
    re-assigns what it dropped (:func:`recycle_assignments`). A recycled token's weights are
    recomputed for its new set of experts (:func:`routing_probs_for_map`). The expert bias, when
    enabled, counts the router's original choice (the demand it is meant to balance).

    Randomness: one [tokens, experts + 1] uniform draw per forward from megatron-core's
    ``data-parallel-rng`` tracker stream (as megatron-core's own ``RandomSTE`` draws from a tracker
    stream). That stream is seeded alike on every tensor-, context- and expert-parallel rank of a
    pipeline stage and advances the same on all of them (same shapes), so ranks that route the same
    tokens (tensor parallel without sequence parallel) draw the same numbers and agree; activation
    recomputation restores the tracker, so a recomputed forward re-draws the same assignment. With the
    ``allgather`` dispatcher each rank routes the tokens of its own TP / sequence shard before the
    gather, so capacity counts that shard's tokens (as in megatron-core's drop path).

    After each forward, :attr:`last_stats` holds a :class:`RoutingStats`.
    """

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection=None,
        routing_mode: RoutingMode = "dropless",
        **mcore_kwargs,   # what this megatron-core's TopKRouter takes besides (e.g. is_mtp_layer, 0.19)
    ) -> None:
        check_routing_config(config, routing_mode)
        capacity_factor = config.moe_expert_capacity_factor
        drop_policy = config.moe_token_drop_policy
        if routing_mode == "recycle":
            # TopKRouter.routing would drop over-capacity assignments itself; recycling needs them.
            config = copy.copy(config)
            config.moe_expert_capacity_factor = None
        super().__init__(config=config, pg_collection=pg_collection, **mcore_kwargs)
        self.routing_mode = routing_mode
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.last_stats: Optional[RoutingStats] = None

    def _apply_expert_bias(self, routing_map: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """megatron-core's expert-bias token count, without its ``jit_fuser`` (torch.compile) decorator:
        one in-place sum has nothing to fuse, and compiling it cost every process that routes a token
        1-4 s (dynamo's import and a compile; profiled in the CPU demo) and every call a guard check."""
        if self.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():
                if padding_mask is not None:
                    routing_map = routing_map & (~padding_mask)
                self.local_tokens_per_expert += routing_map.sum(dim=0)

    def _capacity(self, num_tokens: int) -> int:
        # The capacity apply_router_token_dropping uses (it counts num_tokens * topk assignments).
        return get_capacity(num_tokens * self.topk, self.config.num_moe_experts, self.capacity_factor)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """megatron-core's top-k routing, then this router's capacity mode."""
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        num_tokens = routing_map.shape[0]
        zero = torch.zeros((), dtype=torch.long, device=routing_map.device)
        if self.routing_mode == "dropless":
            self.last_stats = RoutingStats(num_tokens, self.topk, None, zero, zero)
            return probs, routing_map
        capacity = self._capacity(num_tokens)
        if self.routing_mode == "drop":
            # megatron-core dropped inside super().routing(); every token had topk assignments.
            dropped = num_tokens * self.topk - routing_map.sum()
            self.last_stats = RoutingStats(num_tokens, self.topk, capacity, dropped, zero)
            return probs, routing_map
        kept_probs, kept_map = apply_router_token_dropping(
            probs,
            routing_map,
            router_topk=self.topk,
            capacity_factor=self.capacity_factor,
            drop_policy=self.drop_policy,
        )
        with get_cuda_rng_tracker().fork(get_data_parallel_rng_tracker_name()):
            noise = torch.rand(
                num_tokens, self.config.num_moe_experts + 1, device=routing_map.device
            )
        final_map, left_over = recycle_assignments(routing_map, kept_map, capacity, noise)
        recycled_rows = (final_map & ~kept_map).any(dim=1, keepdim=True)
        new_probs = routing_probs_for_map(
            logits.view(-1, self.config.num_moe_experts), final_map, self.config
        )
        final_probs = torch.where(recycled_rows, new_probs, kept_probs)
        recycled = (final_map & ~kept_map).sum()
        self.last_stats = RoutingStats(num_tokens, self.topk, capacity, left_over, recycled)
        return final_probs, final_map


def router_builder(routing_mode: RoutingMode):
    """The ``MoESubmodules.router`` builder for ``routing_mode`` (megatron-core calls it with
    ``config=`` and ``pg_collection=``)."""
    return functools.partial(RecycleRouter, routing_mode=routing_mode)


def moe_module_spec(config: TransformerConfig, routing_mode: RoutingMode = "dropless") -> ModuleSpec:
    """megatron-core's local MoE spec (SharedExpertMLP on :class:`FastSpecProvider`'s linears;
    SequentialMLP experts, or GroupedMLP where :func:`~megatron_ext.models.grouped_experts.use_grouped_gemm`
    picks it) with :class:`RecycleRouter`.
    Built models get the sync-free dispatcher from :func:`megatron_ext.models.moe_dispatch.install`.

    Use in a layer spec in place of ``get_moe_module_spec_for_backend(LocalSpecProvider(), ...)``.
    """
    check_routing_config(config, routing_mode)
    spec = get_moe_module_spec_for_backend(   # the shared expert's linears as the dense layers'
        FastSpecProvider(config), num_experts=config.num_moe_experts, moe_grouped_gemm=use_grouped_gemm(config)
    )
    moe_submodules(spec).router = router_builder(routing_mode)
    return spec


def routing_stats(model: torch.nn.Module) -> dict[int, RoutingStats]:
    """Each MoE layer's last :class:`RoutingStats`, by layer number (for the trainer's logging)."""
    return {
        module.layer_number: module.last_stats
        for module in model.modules()
        if isinstance(module, RecycleRouter) and module.last_stats is not None
    }


@contextlib.contextmanager
def dropless_routing(modules):
    """Route without capacity inside the block (every :class:`RecycleRouter` of ``modules``), whatever
    the trained mode; restored on exit.

    For generation: capacity trades tokens for throughput in training, and with it a token's routing
    would depend on which other sequences share its batch (and differ between a cached decode step and
    a full recompute). ``drop`` mode drops inside megatron-core's ``TopKRouter.routing`` from the
    router's config, so the router gets a config copy without the capacity factor for the duration.
    """
    if isinstance(modules, torch.nn.Module):
        modules = [modules]
    saved = []
    for module in modules:
        for router in module.modules():
            if isinstance(router, RecycleRouter):
                saved.append((router, router.routing_mode, router.config))
                if router.config.moe_expert_capacity_factor is not None:
                    router.config = copy.copy(router.config)
                    router.config.moe_expert_capacity_factor = None
                router.routing_mode = "dropless"
    try:
        yield
    finally:
        for router, mode, config in saved:
            router.routing_mode, router.config = mode, config
