"""One-token decode steps on fixed buffers, captured once per batch and replayed as a CUDA graph.

Why: a decode step of the MoE model launches a few thousand small kernels from Python, and on an H200
the GPU idled between them: about 70 ms a step at batch 1 and at batch 32 alike
(benchmarks/README.md, "RL generation"). A CUDA graph replays all of a step's kernels with one launch.

A step is capturable when its shapes and addresses do not change from one step to the next.
:class:`StaticDecodeContext` is megatron-core's ``StaticInferenceContext`` plus a device-side position
and key mask; our attention layers (Hunyuan's :mod:`~megatron_ext.models.cla_attention`, TurboS'
:mod:`~megatron_ext.models.static_decode_attention`) then write K/V with ``index_copy_`` at that
position, attend over the whole cache under the mask and take their RoPE rows with ``index_select``.
The rest of a decode step already has step-independent shapes (embedding, norms, router, the sync-free
MoE dispatcher, grouped-GEMM experts, megatron-core's Mamba2 step on its in-place states, output layer).
A Mamba step advances its states, so they are saved before the warm-up runs that precede a capture and
restored after them (attention warm-ups only rewrite the step's own cache slot).

Scope (:func:`static_reason`, :func:`graph_reason`): one model chunk without tensor, pipeline or expert
parallelism (no collectives in the graph), every attention layer one of ours. Other models decode
eagerly as before.
"""

from __future__ import annotations

import logging

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_ext.mcore_compat import inference_mode

log = logging.getLogger(__name__)

WARMUP_RUNS = 2   # eager runs before capturing: lazy initialisation and TorchScript's profiling runs


class StaticDecodeContext(StaticInferenceContext):
    """``StaticInferenceContext`` that, after :meth:`start_static_decode`, holds the step's position on
    the device: ``decode_position`` ([1], long) and ``decode_key_mask`` ([1, 1, 1, max_len], True for
    cache slots after the position, megatron's convention)."""

    decode_position: torch.Tensor | None = None
    decode_key_mask: torch.Tensor | None = None

    def start_static_decode(self, device: torch.device) -> None:
        self.decode_position = torch.zeros(1, dtype=torch.long, device=device)
        self.decode_key_mask = torch.ones(1, 1, 1, self.max_sequence_length, dtype=torch.bool, device=device)
        self._slots = torch.arange(self.max_sequence_length, device=device)

    def set_position(self, position: int) -> None:
        """In place, so a captured graph reads the new values (no host sync)."""
        self.decode_position.fill_(position)
        torch.gt(self._slots, self.decode_position, out=self.decode_key_mask.view(-1))

    def write_kv(self, k_mem: torch.Tensor, v_mem: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one step's K/V ([1, b, ...]) into a layer's cache ([max_len, max_batch, ...]) at the
        position; returns the whole cache of these rows (attend to it under ``decode_key_mask``)."""
        if key.size(0) != 1:
            raise RuntimeError(f"a static decode step feeds one token per sequence, got {key.size(0)}")
        rows = slice(self.batch_size_offset, self.batch_size_offset + key.size(1))
        k_all, v_all = k_mem[:, rows], v_mem[:, rows]
        k_all.index_copy_(0, self.decode_position, key)
        v_all.index_copy_(0, self.decode_position, value)
        return k_all, v_all

    def rope_rows(self, table: torch.Tensor | None) -> torch.Tensor | None:
        """The step's rows of a RoPE table indexed by position ([max_len, ...])."""
        return None if table is None else table.index_select(0, self.decode_position)


def static_reason(chunks) -> str | None:
    """Why the static decode step cannot run this model, or None."""
    from megatron.core.transformer.attention import Attention

    from megatron_ext.models.cla_attention import _CLAForward
    from megatron_ext.models.static_decode_attention import StaticDecodeSelfAttention

    if len(chunks) != 1 or parallel_state.get_pipeline_model_parallel_world_size() != 1:
        return "pipeline parallelism"
    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        return "tensor parallelism"
    for module in chunks[0].modules():
        if isinstance(module, Attention) and not isinstance(module, (_CLAForward, StaticDecodeSelfAttention)):
            return f"megatron-core's {type(module).__name__} caches K/V by host-side offsets"
    return None


def _stateful_layers(model) -> list[int]:
    """Layer numbers whose inference cache entries a step advances in place (Mamba conv / SSM states)."""
    from megatron.core.ssm.mamba_mixer import MambaMixer

    return [m.layer_number for m in model.modules() if isinstance(m, MambaMixer)]


def graph_reason(chunks) -> str | None:
    """Why a static decode step of this model cannot be captured as a CUDA graph, or None."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_ext.models.moe_dispatch import DroplessAllGatherDispatcher

    reason = static_reason(chunks)
    if reason is not None:
        return reason
    if not next(chunks[0].parameters()).is_cuda:
        return "not on a GPU"
    if parallel_state.get_expert_model_parallel_world_size() != 1:
        return "expert parallelism"
    for module in chunks[0].modules():
        if isinstance(module, MoELayer) and not isinstance(module.token_dispatcher, DroplessAllGatherDispatcher):
            return "MoE layers without the sync-free dispatcher (megatron-core's copies counts to the host)"
    return None


class DecodeStep:
    """The model's forward for one token per sequence, at a position given per call, over fixed input
    buffers; with ``capture`` the first call records it as a CUDA graph and every call replays it.

    The caller keeps the context's ``sequence_len_offset`` bookkeeping; the position passed is the
    cache slot of the fed token (the context's ``sequence_len_offset``)."""

    def __init__(self, model, ctx: StaticDecodeContext, width: int, device: torch.device, capture: bool):
        self.model, self.ctx, self.capture = model, ctx, capture
        self.tokens = torch.zeros(width, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(width, 1, dtype=torch.long, device=device)
        ctx.start_static_decode(device)
        self.stateful = _stateful_layers(model)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _forward(self) -> torch.Tensor:
        with inference_mode():
            return self.model(self.tokens, self.positions, None, inference_context=self.ctx,
                              runtime_gather_output=True)

    def __call__(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Logits [b, 1, V] of feeding ``tokens`` [b, 1] at ``position``; with capture, a buffer the
        next call overwrites."""
        self.tokens.copy_(tokens)
        self.positions.fill_(position)
        self.ctx.set_position(position)
        if not self.capture:
            return self._forward()
        if self.graph is None:
            self._record()
            if self.graph is None:   # capture failed: eager from here on
                return self._forward()
        self.graph.replay()
        return self.logits

    def _record(self) -> None:
        """Warm up on a side stream, then capture. An attention warm-up rewrites the step's own K/V
        slot; the Mamba states a warm-up advances are put back as they were."""
        saved = [(t, t.clone()) for layer in self.stateful for t in self.ctx.key_value_memory_dict[layer]]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        for state, copy in saved:
            state.copy_(copy)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits = self._forward()
        except Exception as error:   # noqa: BLE001  any capture failure: the eager step still works
            log.warning("decode step not captured as a CUDA graph (%s: %s); decoding eagerly",
                        type(error).__name__, error)
            self.capture = False
            return
        self.graph = graph
