"""Cross-Layer Attention (CLA) for megatron-core 0.16.1 GPT layers, with Hunyuan's QK-norm order.

CLA (Brandon et al. 2024, "Reducing Transformer Key-Value Cache Size with Cross-Layer Attention",
arXiv 2405.12981) lets ``cla_share_factor`` adjacent layers share one K/V: the first layer of a group
(the *producer*) projects Q, K and V as usual; the other layers (*consumers*) project only Q and
attend over the producer's K/V. K/V projection weights and the KV cache shrink by the share factor.
Hunyuan-Large (arXiv 2411.02265, "KV cache compression") combines it with GQA, share factor 2.

How the K/V gets from producer to consumers. megatron's ``TransformerBlock`` calls its layers one
after another with the same arguments and has no slot for extra per-layer outputs, and we do not
patch it. So the layers of one model chunk share a small :class:`CLAKVStore` (put into every layer's
spec by :func:`cla_attention_specs`): the producer writes its final (RoPE'd, normalised) K/V under its
group id, the group's consumers read it in the same forward, and the group's last consumer drops the
entry so no activation outlives the forward. Nothing is needed from the caller per forward. Autograd
sees an ordinary tensor reuse, so gradients from the consumers reach the producer's K/V projection.
This works because within one model chunk the producer runs before its consumers in one sequential
pass, also under pipeline schedules (each microbatch's forward of a chunk is one sequential pass)
and under full activation recompute *if* every recompute unit holds whole groups (a recompute
replays producer and consumers together); a recompute unit that splits a group would replay a
consumer against a K/V with no autograd history, or another microbatch's, so
:func:`validate_cla_config` rejects it. The group id comes from megatron's global, 1-based
``layer_number``, and a group must not straddle a pipeline (or virtual pipeline) stage:
:func:`validate_cla_layout`.

KV cache for generation. With megatron's static-batching inference context
(``StaticInferenceContext``, the ``inference_context`` argument of ``GPTModel.forward``) the producer
caches its group's K/V in ``inference_context.key_value_memory_dict[producer layer_number]``: one entry
per group, not per layer; consumers read it through the store. Unlike megatron, the cache holds K
*after* RoPE (and after QK-norm in Hunyuan's order), so a decoding step rotates only the new token's
key. :func:`cla_generate_greedy` drives it. A context with a ``decode_position`` tensor
(:class:`megatron_ext.decode_graph.StaticDecodeContext`) switches one-token steps to fixed shapes:
K/V written at that device-side position, attention over the whole cache under a key mask, so the
step can be captured as a CUDA graph. Dynamic batching, flash-decode and packed sequences
(THD) are not supported (they need flash-attn kernels this path does not call); the specs here are
the local (non-TE) ones, whose core attention (SDPA or ``DotProductAttention``) takes the explicit
mask a multi-token step after the prompt needs.

QK-norm order. megatron's ``qk_layernorm`` normalises Q and K before RoPE; Hunyuan's released
modeling code (and transformers' ``hunyuan_v1_moe``) normalises after RoPE. ``qk_norm_after_rope``
selects the order. RoPE rotates pairs of channels, so it preserves the RMS: the two orders agree for
an RMSNorm whose weight is the same on every channel (as at initialisation) and differ once the
weights are learned, so parity with Hunyuan checkpoints needs the right order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.tensor_parallel.mappings import (
    all_gather_last_dim_from_tensor_parallel_region,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import (
    Attention,
    SelfAttention,
    SelfAttentionSubmodules,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.utils import deprecate_inference_params, get_pg_rank
from torch import Tensor

from megatron_ext.mcore_compat import inference_mode, name_kwargs
from megatron_ext.errors import ConfigError
from megatron_ext.models.norms import SequenceParallelTorchNorm
from megatron_ext.models.sdpa_attention import FastSpecProvider

__all__ = [
    "CLAKVStore",
    "CLAProducerSelfAttention",
    "CLAConsumerAttention",
    "CLAConsumerSubmodules",
    "apply_rope_and_qk_norm",
    "validate_cla_layout",
    "validate_cla_config",
    "cla_attention_specs",
    "kv_cache_bytes_per_token",
    "kv_cache_report",
    "cla_generate_greedy",
]


# ----------------------------------------------------------------------------------------------
# Layout checks and KV-cache arithmetic
# ----------------------------------------------------------------------------------------------


def _chunk_layer_counts(
    num_layers: int,
    pipeline_parallel_size: int,
    virtual_pp: Optional[int],
    num_layers_in_first_pipeline_stage: Optional[int],
    num_layers_in_last_pipeline_stage: Optional[int],
) -> list[tuple[str, int]]:
    """(name, layer count) of every model chunk in global layer order, as megatron splits them."""
    pp, vp = pipeline_parallel_size, virtual_pp or 1
    first, last = num_layers_in_first_pipeline_stage, num_layers_in_last_pipeline_stage
    if pp == 1:
        return [("the whole model", num_layers)]
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    per_middle = middle_layers // middle_stages if middle_stages else 0
    if middle_stages and middle_layers % middle_stages:
        raise ConfigError(
            f"num_layers={num_layers} (minus first/last-stage layers) does not split evenly over "
            f"{middle_stages} pipeline stages: fix num_layers or pipeline_model_parallel_size"
        )
    stage_sizes = [per_middle] * pp
    if first is not None:
        stage_sizes[0] = first
    if last is not None:
        stage_sizes[-1] = last
    chunks = []
    for v in range(vp):
        for rank, size in enumerate(stage_sizes):
            if size % vp:
                raise ConfigError(
                    f"pipeline stage {rank} has {size} layers, not divisible by "
                    f"virtual_pipeline_model_parallel_size={vp}: fix num_layers or the pipeline sizes"
                )
            name = f"pipeline stage {rank}" + (f", virtual chunk {v}" if vp > 1 else "")
            chunks.append((name, size // vp))
    return chunks


def validate_cla_layout(
    num_layers: int,
    cla_share_factor: int,
    pipeline_parallel_size: int = 1,
    virtual_pp: Optional[int] = None,
    *,
    num_layers_in_first_pipeline_stage: Optional[int] = None,
    num_layers_in_last_pipeline_stage: Optional[int] = None,
) -> None:
    """Raise :class:`ConfigError` unless every CLA group lies inside one pipeline model chunk.

    A consumer reads its producer's K/V from the same forward pass on the same rank: a group split
    across a (virtual) pipeline stage would need the K/V sent with the activations, which megatron's
    p2p schedule does not do. So every chunk must start at a group boundary.
    """
    if not isinstance(cla_share_factor, int) or cla_share_factor < 1:
        raise ConfigError(f"cla_share_factor={cla_share_factor!r}: must be an integer >= 1 (1 = no CLA)")
    if num_layers % cla_share_factor:
        raise ConfigError(
            f"num_layers={num_layers} is not a multiple of cla_share_factor={cla_share_factor}: "
            f"every CLA group needs {cla_share_factor} layers; change num_layers or cla_share_factor"
        )
    chunks = _chunk_layer_counts(
        num_layers, pipeline_parallel_size, virtual_pp,
        num_layers_in_first_pipeline_stage, num_layers_in_last_pipeline_stage,
    )
    start = 0
    for name, size in chunks:
        if start % cla_share_factor or size % cla_share_factor:
            bad = start + 1 if start % cla_share_factor else start + size + 1
            group = (bad - 1) // cla_share_factor
            raise ConfigError(
                f"cla_share_factor={cla_share_factor} with num_layers={num_layers}, "
                f"pipeline_model_parallel_size={pipeline_parallel_size}, "
                f"virtual_pipeline_model_parallel_size={virtual_pp}: {name} holds {size} layers "
                f"(layers {start + 1}-{start + size}), so CLA group {group} (layers "
                f"{group * cla_share_factor + 1}-{(group + 1) * cla_share_factor}) straddles a "
                f"pipeline stage boundary. Every pipeline stage (and virtual chunk) must hold a "
                f"multiple of cla_share_factor layers: make num_layers a multiple of "
                f"pipeline_model_parallel_size * virtual_pipeline_model_parallel_size * "
                f"cla_share_factor (or set num_layers_in_first/last_pipeline_stage to multiples of it), "
                f"or lower pipeline_model_parallel_size / cla_share_factor"
            )
        start += size


def validate_cla_config(config: TransformerConfig, cla_share_factor: int) -> None:
    """Check a TransformerConfig against CLA: pipeline layout, recompute units, unsupported features."""
    if config.pipeline_model_parallel_layout is not None and cla_share_factor > 1:
        raise ConfigError(
            "pipeline_model_parallel_layout is set together with cla_share_factor > 1: CLA checks only "
            "even or first/last-stage pipeline splits; use num_layers_in_first/last_pipeline_stage"
        )
    validate_cla_layout(
        config.num_layers, cla_share_factor, config.pipeline_model_parallel_size,
        config.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=config.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=config.num_layers_in_last_pipeline_stage,
    )
    if cla_share_factor > 1 and config.recompute_granularity == "full":
        if config.recompute_method == "block":
            raise ConfigError(
                f"recompute_method='block' with cla_share_factor={cla_share_factor}: block recompute "
                "replays single layers, which would replay a CLA consumer without its producer; use "
                f"recompute_method='uniform' with recompute_num_layers a multiple of {cla_share_factor}"
            )
        if config.recompute_num_layers % cla_share_factor:
            raise ConfigError(
                f"recompute_num_layers={config.recompute_num_layers} is not a multiple of "
                f"cla_share_factor={cla_share_factor}: a uniform recompute unit must hold whole CLA "
                f"groups; set recompute_num_layers to a multiple of {cla_share_factor}"
            )
    unsupported = {
        "cuda_graph_impl": config.cuda_graph_impl != "none",
        "flash_decode": config.flash_decode,
        "attention_output_gate": config.attention_output_gate,
        "fused_single_qkv_rope": config.fused_single_qkv_rope,
        "multi_latent_attention": config.multi_latent_attention,
        "no_rope_freq": bool(config.no_rope_freq),
    }
    for field, on in unsupported.items():
        if on:
            raise ConfigError(f"{field}={getattr(config, field)!r} is not supported by CLA attention: "
                              f"turn it off or use cla_share_factor=1 with megatron's own spec")


def kv_cache_bytes_per_token(
    num_layers: int,
    num_query_groups: int,
    head_dim: int,
    cla_share_factor: int = 1,
    bytes_per_element: int = 2,
) -> int:
    """KV-cache bytes per token: 2 (K and V) x KV layers x KV heads x head_dim x bytes.

    GQA stores num_query_groups heads per layer (Ainslie et al. 2023, arXiv 2305.13245); CLA stores
    one K/V per group of ``cla_share_factor`` layers (Brandon et al. 2024), i.e. ceil(num_layers /
    factor) K/V layers. Per token and per sequence; multiply by batch x length for a cache.
    """
    kv_layers = math.ceil(num_layers / cla_share_factor)
    return 2 * kv_layers * num_query_groups * head_dim * bytes_per_element


def kv_cache_report(
    num_layers: int,
    num_query_groups: int,
    head_dim: int,
    cla_share_factor: int,
    bytes_per_element: int = 2,
    num_attention_heads: Optional[int] = None,
) -> dict:
    """KV-cache bytes per token with and without CLA (and plain MHA when the head count is given).

    Hunyuan-Large (arXiv 2411.02265, KV-cache compression) pairs GQA with CLA of factor 2: half the
    GQA cache; ``saving_vs_gqa`` is the fraction saved, ``saving_vs_mha`` the saving over plain MHA.
    """
    gqa = kv_cache_bytes_per_token(num_layers, num_query_groups, head_dim, 1, bytes_per_element)
    cla = kv_cache_bytes_per_token(num_layers, num_query_groups, head_dim, cla_share_factor,
                                   bytes_per_element)
    report = {
        "gqa_bytes_per_token": gqa,
        "gqa_cla_bytes_per_token": cla,
        "cla_share_factor": cla_share_factor,
        "saving_vs_gqa": 1.0 - cla / gqa,
    }
    if num_attention_heads is not None:
        mha = kv_cache_bytes_per_token(num_layers, num_attention_heads, head_dim, 1, bytes_per_element)
        report["mha_bytes_per_token"] = mha
        report["saving_vs_mha"] = 1.0 - cla / mha
    report["summary"] = (
        f"KV cache per token: GQA {gqa} B, GQA+CLA(x{cla_share_factor}) {cla} B "
        f"({100 * report['saving_vs_gqa']:.0f}% less)"
    )
    return report


# ----------------------------------------------------------------------------------------------
# The K/V hand-off
# ----------------------------------------------------------------------------------------------


class CLAKVStore:
    """K/V of the current forward, per CLA group, shared by the layers of one model chunk.

    Producers register at construction (so a consumer can tell at build time that its producer is
    in the same chunk), :meth:`put` their K/V in the forward; consumers :meth:`take` it, and the
    group's last consumer releases it. Not an ``nn.Module``: it has no parameters or state to save.
    """

    def __init__(self, cla_share_factor: int):
        self.cla_share_factor = cla_share_factor
        self.producers: set[int] = set()
        self._kv: dict[int, tuple[Tensor, Tensor]] = {}

    def group_of(self, layer_number: int) -> int:
        """0-based CLA group of a 1-based global megatron layer number."""
        return (layer_number - 1) // self.cla_share_factor

    def is_producer(self, layer_number: int) -> bool:
        return (layer_number - 1) % self.cla_share_factor == 0

    def is_last_in_group(self, layer_number: int) -> bool:
        return (layer_number - 1) % self.cla_share_factor == self.cla_share_factor - 1

    def put(self, group: int, key: Tensor, value: Tensor) -> None:
        self._kv[group] = (key, value)

    def take(self, group: int, release: bool) -> tuple[Tensor, Tensor]:
        if group not in self._kv:
            raise RuntimeError(
                f"CLA group {group}: a consumer ran without its producer's K/V in this forward (the "
                f"producer must run first in the same pass; see validate_cla_config for recompute)"
            )
        return self._kv.pop(group) if release else self._kv[group]

    def clear(self) -> None:
        self._kv.clear()


# ----------------------------------------------------------------------------------------------
# Attention modules
# ----------------------------------------------------------------------------------------------


def apply_rope_and_qk_norm(
    query: Tensor,
    key: Optional[Tensor],
    q_pos_emb: Optional[Tensor],
    k_pos_emb: Optional[Tensor],
    q_norm: Optional[torch.nn.Module],
    k_norm: Optional[torch.nn.Module],
    config: TransformerConfig,
    qk_norm_after_rope: bool,
    cp_group=None,
) -> tuple[Tensor, Optional[Tensor]]:
    """RoPE and QK-norm on [s, b, heads, head_dim] tensors, in megatron's or Hunyuan's order.

    ``qk_norm_after_rope=False``: norm, then RoPE (megatron ``qk_layernorm``).
    ``qk_norm_after_rope=True``: RoPE, then norm (Hunyuan-Large's released attention). ``key`` is
    None for a CLA consumer (it reuses the producer's finished K).
    """
    mscale = _yarn_get_concentration_factor_from_config(config)

    def rope(t, freqs):
        if freqs is None:
            return t
        return apply_rotary_pos_emb(t, freqs, config=config, mscale=mscale, cp_group=cp_group)

    def norm(t, fn):
        return t if fn is None else fn(t)

    if qk_norm_after_rope:
        query = norm(rope(query, q_pos_emb), q_norm)
        key = None if key is None else norm(rope(key, k_pos_emb), k_norm)
    else:
        query = rope(norm(query, q_norm), q_pos_emb)
        key = None if key is None else rope(norm(key, k_norm), k_pos_emb)
    return query, key


def _offset_causal_mask(sq: int, sk: int, offset: int, device) -> Tensor:
    """Boolean mask (True = masked) for ``sq`` new queries at positions offset.. over ``sk`` keys."""
    q_pos = torch.arange(offset, offset + sq, device=device).unsqueeze(1)
    k_pos = torch.arange(sk, device=device).unsqueeze(0)
    return (k_pos > q_pos).view(1, 1, sq, sk)


class _CLAForward:
    """The forward shared by producer and consumer (replaces ``Attention.forward``).

    megatron's ``Attention.forward`` cannot be reused: it applies QK-norm inside the projection
    (before RoPE), always derives K/V from the layer's own input, and caches pre-RoPE K per layer.
    This forward keeps its contract (arguments, ``(output, bias)`` result, selective core-attention
    recompute, static ``inference_context``) for the local (non-TE) path.
    """

    def _init_cla(self, cla_share_factor: int, kv_store: CLAKVStore, qk_norm_after_rope: bool):
        if kv_store.cla_share_factor != cla_share_factor:
            raise ConfigError(f"cla_share_factor={cla_share_factor} differs from the CLA store's "
                              f"{kv_store.cla_share_factor}: build all attention specs with one cla_attention_specs call")
        self.cla_share_factor = cla_share_factor
        self.kv_store = kv_store
        self.qk_norm_after_rope = qk_norm_after_rope
        self.cla_group = kv_store.group_of(self.layer_number)

    def _project(self, hidden_states: Tensor) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        raise NotImplementedError

    # submodules only this kind of layer has (set by the producer / consumer class)
    _CLA_ONLY_CHILDREN: tuple[str, ...] = ()

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Stack producer-only / consumer-only weights over their own layers in checkpoints.

        megatron-core stores each per-layer weight as one tensor with a leading layer axis of length
        ``num_layers`` and expects every layer to fill its slot. Under CLA only producers have K/V
        projections (and K norms) and only consumers have a Q-only projection, so those are stacked
        over the producers (one per group) or the consumers instead; weights every layer has
        (output projection, Q norm) keep megatron's layout.
        """
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            sharded_state_dict_default,
        )

        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.cla_share_factor == 1:
            return state
        share = self.cla_share_factor
        groups = self.config.num_layers // share
        position = (self.layer_number - 1) % share
        if position == 0:
            index, total = self.cla_group, groups
        else:
            index, total = self.cla_group * (share - 1) + position - 1, groups * (share - 1)
        layer_axis = [i for i, (_, idx, n) in enumerate(sharded_offsets)
                      if n == self.config.num_layers and idx == self.layer_number - 1]
        assert len(layer_axis) == 1, f"no layer axis in {sharded_offsets}"
        offsets = list(sharded_offsets)
        offsets[layer_axis[0]] = (sharded_offsets[layer_axis[0]][0], index, total)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        for name in self._CLA_ONLY_CHILDREN:
            child = getattr(self, name, None)
            if child is None:
                continue
            for key in [k for k in state if k.startswith(f"{prefix}{name}.")]:
                del state[key]
            state.update(sharded_state_dict_default(child, f"{prefix}{name}.", tuple(offsets), metadata,
                                                    tp_group=self.tp_group))
        return state


    def _cache_kv(self, ctx: StaticInferenceContext, key: Tensor, value: Tensor, start: int):
        """Write this step's K/V into the group's cache slot; return K/V for all positions so far."""
        end = start + key.size(0)
        b0 = ctx.batch_size_offset
        b1 = b0 + key.size(1)
        if self.layer_number not in ctx.key_value_memory_dict:
            # zeros, not empty: a static decode step attends over the whole buffer (masked), and
            # uninitialised memory could hold NaNs that a zero attention weight does not cancel
            shape = (ctx.max_sequence_length, ctx.max_batch_size) + tuple(key.shape[2:])
            ctx.key_value_memory_dict[self.layer_number] = (
                torch.zeros(shape, dtype=key.dtype, device=key.device),
                torch.zeros(shape, dtype=value.dtype, device=value.device),
            )
        k_mem, v_mem = ctx.key_value_memory_dict[self.layer_number]
        if end > k_mem.size(0) or b1 > k_mem.size(1):
            raise ConfigError(
                f"inference_context holds max_sequence_length={k_mem.size(0)}, max_batch_size="
                f"{k_mem.size(1)}; this step needs {end} positions and {b1} sequences: enlarge them"
            )
        if getattr(ctx, "decode_position", None) is not None:   # static decode: the whole buffer back
            return ctx.write_kv(k_mem, v_mem, key, value)
        k_mem[start:end, b0:b1] = key
        v_mem[start:end, b0:b1] = value
        return k_mem[:end, b0:b1], v_mem[:end, b0:b1]

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor],
        key_value_states: Optional[Tensor] = None,
        inference_context=None,
        rotary_pos_emb: Optional[Union[Tensor, tuple[Tensor, Tensor]]] = None,
        rotary_pos_cos: Optional[Tensor] = None,
        rotary_pos_sin: Optional[Tensor] = None,
        rotary_pos_cos_sin: Optional[Tensor] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
        sequence_len_offset=None,
        *,
        inference_params=None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        ctx = deprecate_inference_params(inference_context, inference_params)
        if key_value_states is not None:
            raise NotImplementedError("CLA attention is self-attention: key_value_states must be None")
        if packed_seq_params is not None:
            raise NotImplementedError("CLA attention does not support packed sequences (THD)")
        if rotary_pos_cos is not None or rotary_pos_sin is not None or rotary_pos_cos_sin is not None:
            raise NotImplementedError("CLA attention does not support flash-decode / flashinfer RoPE")
        if ctx is not None and not ctx.is_static_batching():
            raise NotImplementedError("CLA attention supports only the static inference context")

        if rotary_pos_emb is not None and not isinstance(rotary_pos_emb, tuple):
            rotary_pos_emb = (rotary_pos_emb,) * 2
        q_pos, k_pos = rotary_pos_emb if rotary_pos_emb is not None else (None, None)

        query, key, value = self._project(hidden_states)
        sq = query.size(0)
        start = ctx.sequence_len_offset if ctx is not None else 0
        # static decode (megatron_ext.decode_graph): one token at a position held on the device
        position = getattr(ctx, "decode_position", None) if ctx is not None else None
        if position is not None:
            q_pos, k_pos = ctx.rope_rows(q_pos), ctx.rope_rows(k_pos)
        elif ctx is not None:
            # The context's RoPE table spans max_sequence_length; take this step's positions.
            q_pos = None if q_pos is None else q_pos[start:start + sq]
            k_pos = None if k_pos is None else k_pos[start:start + sq]
        query, key = apply_rope_and_qk_norm(
            query, key, q_pos, k_pos, self.q_layernorm, getattr(self, "k_layernorm", None),
            self.config, self.qk_norm_after_rope, cp_group=self.pg_collection.cp,
        )

        if key is not None:  # producer
            if ctx is not None:
                key, value = self._cache_kv(ctx, key, value, start)
            if self.cla_share_factor > 1:   # consumers take it; with none, holding it would keep every
                self.kv_store.put(self.cla_group, key, value)   # layer's K/V alive after the step
        else:
            key, value = self.kv_store.take(
                self.cla_group, release=self.kv_store.is_last_in_group(self.layer_number)
            )

        attn_mask_type = self.attn_mask_type
        if position is not None:
            # every cache slot is attended but those after the position ([1, 1, 1, max_len], True = masked)
            attention_mask, attn_mask_type = ctx.decode_key_mask, AttnMaskType.arbitrary
        elif ctx is not None and start > 0:
            # Past the prompt: the new queries see every cached key up to their own position.
            if sq == 1:
                attention_mask, attn_mask_type = None, AttnMaskType.no_mask
            else:
                attention_mask = _offset_causal_mask(sq, key.size(0), start, query.device)
                attn_mask_type = AttnMaskType.arbitrary

        if self.checkpoint_core_attention and self.training:
            core_attn_out = self._checkpointed_attention_forward(
                query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                attention_bias=attention_bias,
            )
        else:
            core_attn_out = self.core_attention(
                query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                attention_bias=attention_bias, packed_seq_params=None,
            )
        output, bias = self.linear_proj(core_attn_out)
        return output, bias


class CLAProducerSelfAttention(_CLAForward, SelfAttention):
    """First layer of a CLA group: megatron's fused QKV projection (same weights, layout and
    tensor-parallel split as ``SelfAttention``), publishing its K/V to the group's consumers."""
    _CLA_ONLY_CHILDREN = ("linear_qkv", "k_layernorm")

    def __init__(
        self,
        config: TransformerConfig,
        submodules: SelfAttentionSubmodules,
        layer_number: int,
        *,
        cla_share_factor: int,
        kv_store: CLAKVStore,
        qk_norm_after_rope: bool = False,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        name: str | None = None,
    ):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type,
                         pg_collection=pg_collection, **name_kwargs(name))
        self._init_cla(cla_share_factor, kv_store, qk_norm_after_rope)
        if not kv_store.is_producer(layer_number):
            raise ConfigError(
                f"layer {layer_number} got a CLA producer spec but is not the first layer of its "
                f"group (cla_share_factor={cla_share_factor}): the pipeline stage does not start at a "
                f"group boundary; see validate_cla_layout"
            )
        kv_store.producers.add(self.cla_group)
        if isinstance(self.q_layernorm, IdentityOp):
            self.q_layernorm = None
        if isinstance(self.k_layernorm, IdentityOp):
            self.k_layernorm = None

    def _project(self, hidden_states):
        """megatron's QKV split (``SelfAttention.get_query_key_value_tensors``) without the norms."""
        mixed_qkv, _ = self.linear_qkv(hidden_states)
        ng = self.config.num_query_groups
        if ng < self.world_size:
            # Fewer KV heads than TP ranks: gather the interleaved [q.. k v] blocks, keep ours.
            mixed_qkv = all_gather_last_dim_from_tensor_parallel_region(mixed_qkv, self.tp_group)
            idx = get_pg_rank(self.tp_group) // (self.world_size // ng)
            size = mixed_qkv.size(-1) // ng
            mixed_qkv = mixed_qkv[:, :, idx * size:(idx + 1) * size]
        heads_per_group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        hn = self.hidden_size_per_attention_head
        mixed_qkv = mixed_qkv.view(*mixed_qkv.shape[:2], self.num_query_groups_per_partition,
                                   (heads_per_group + 2) * hn)
        query, key, value = torch.split(mixed_qkv, [heads_per_group * hn, hn, hn], dim=3)
        query = query.reshape(query.size(0), query.size(1), -1, hn)
        if ng < self.world_size:
            ranks_per_group = self.world_size // ng
            size = self.num_attention_heads_per_partition // ranks_per_group
            idx = get_pg_rank(self.tp_group) % ranks_per_group
            query = query[:, :, idx * size:(idx + 1) * size]
        return query, key, value


@dataclass
class CLAConsumerSubmodules:
    """Submodules of a CLA consumer: a Q-only projection (no K/V weights)."""

    linear_q: Union[ModuleSpec, type]
    core_attention: Union[ModuleSpec, type]
    linear_proj: Union[ModuleSpec, type]
    q_layernorm: Union[ModuleSpec, type, None] = None


class CLAConsumerAttention(_CLAForward, Attention):
    """Non-first layer of a CLA group: projects only Q (column-parallel, the same heads per TP rank
    as the producer's) and attends over the producer's K/V from the same forward."""
    _CLA_ONLY_CHILDREN = ("linear_q",)

    def __init__(
        self,
        config: TransformerConfig,
        submodules: CLAConsumerSubmodules,
        layer_number: int,
        *,
        cla_share_factor: int,
        kv_store: CLAKVStore,
        qk_norm_after_rope: bool = False,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        name: str | None = None,
    ):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, attention_type="self",
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection, **name_kwargs(name))
        self._init_cla(cla_share_factor, kv_store, qk_norm_after_rope)
        if kv_store.is_producer(layer_number):
            raise ConfigError(
                f"layer {layer_number} got a CLA consumer spec but is the first layer of its group "
                f"(cla_share_factor={cla_share_factor}): the pipeline stage does not start at a group "
                f"boundary; see validate_cla_layout"
            )
        if self.cla_group not in kv_store.producers:
            raise ConfigError(
                f"layer {layer_number}: its CLA producer (layer "
                f"{self.cla_group * cla_share_factor + 1}) is not in this model chunk, so the group "
                f"straddles a pipeline stage boundary (cla_share_factor={cla_share_factor}, "
                f"pipeline_model_parallel_size={config.pipeline_model_parallel_size}); see "
                f"validate_cla_layout"
            )
        # Q heads: column-parallel over TP like the Q rows of linear_qkv, so each rank's heads are
        # the ones whose KV heads the producer on that rank holds.
        self.linear_q = build_module(
            submodules.linear_q,
            self.config.hidden_size,
            self.query_projection_size,
            config=self.config,
            init_method=self.config.init_method,
            gather_output=False,
            bias=self.config.add_bias_linear or self.config.add_qkv_bias,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="q",
            tp_group=self.pg_collection.tp,
        )
        self.q_layernorm = None
        if submodules.q_layernorm is not None and submodules.q_layernorm is not IdentityOp:
            self.q_layernorm = build_module(submodules.q_layernorm,
                                            hidden_size=self.hidden_size_per_attention_head,
                                            config=self.config, eps=self.config.layernorm_epsilon)

    def _project(self, hidden_states):
        query, _ = self.linear_q(hidden_states)
        query = query.view(*query.shape[:2], -1, self.hidden_size_per_attention_head)
        return query, None, None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False,
                                    split_qkv=True):
        """Attention's abstract hook; the consumer has no K/V of its own (see :meth:`_project`)."""
        raise NotImplementedError("a CLA consumer reads K/V from its group's producer")

    def backward_dw(self) -> None:
        self.linear_q.backward_dw()
        self.linear_proj.backward_dw()


# ----------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------


def cla_attention_specs(
    config: TransformerConfig,
    cla_share_factor: int,
    qk_norm_after_rope: bool = True,
) -> tuple[ModuleSpec, ModuleSpec]:
    """(producer, consumer) attention specs of one model chunk, sharing one :class:`CLAKVStore`.

    Local (non-TE) megatron modules (core attention on torch SDPA); QK-norm when ``config.qk_layernorm`` (norm weights keep
    megatron's names ``q_layernorm`` / ``k_layernorm``, which ``finalize_model_grads`` sums over TP).
    Layer ``i`` of the chunk uses the producer when ``i % cla_share_factor == 0``; with a share factor
    of 1 every layer is a producer, i.e. plain self-attention. Call once per model chunk, so each chunk
    gets its own store; the chunk must start at a group boundary (see :func:`validate_cla_layout`).
    """
    validate_cla_config(config, cla_share_factor)
    backend = FastSpecProvider(config)   # local modules; SDPA core attention
    store = CLAKVStore(cla_share_factor)
    qk_norm = SequenceParallelTorchNorm if config.qk_layernorm else None
    params = {"cla_share_factor": cla_share_factor, "kv_store": store,
              "qk_norm_after_rope": qk_norm_after_rope, "attn_mask_type": AttnMaskType.causal}
    producer = ModuleSpec(
        module=CLAProducerSelfAttention,
        params=params,
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )
    consumer = ModuleSpec(
        module=CLAConsumerAttention,
        params=params,
        submodules=CLAConsumerSubmodules(
            linear_q=backend.column_parallel_linear(),
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=qk_norm,
        ),
    )
    return producer, consumer


# ----------------------------------------------------------------------------------------------
# Greedy generation (single pipeline stage)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def cla_generate_greedy(model, tokens: Tensor, num_new_tokens: int, use_cache: bool = True) -> Tensor:
    """Greedy-decode ``num_new_tokens`` after ``tokens`` [b, s]; returns [b, s + num_new_tokens].

    With ``use_cache`` the prompt is encoded once into a megatron ``StaticInferenceContext`` and each
    step feeds one token (CLA layers cache one K/V per group; megatron's own attention caches per
    layer). Without it every step re-runs the whole sequence: the reference the cache must match.
    For a single pipeline stage (pre_process and post_process on this rank); logits are gathered
    over TP. Puts the model in eval mode.
    """
    model.eval()
    batch, prompt_len = tokens.shape
    ctx = StaticInferenceContext(batch, prompt_len + num_new_tokens) if use_cache else None
    out = tokens
    for step in range(num_new_tokens):
        if use_cache:
            inp = out if step == 0 else out[:, -1:]
            start = ctx.sequence_len_offset
        else:
            inp, start = out, 0
        position_ids = torch.arange(start, start + inp.size(1), device=out.device).expand(batch, -1)
        with inference_mode():
            logits = model(inp, position_ids, None, inference_context=ctx, runtime_gather_output=True)
        if use_cache:
            ctx.sequence_len_offset += inp.size(1)
            ctx.enable_decode_mode()
        out = torch.cat([out, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return out
