"""megatron-core's ``SelfAttention`` with a fixed-shape decode step (the TurboS hybrid's attention layers).

megatron-core's static-batching KV cache is indexed by host-side integers: a decode step writes slot
``sequence_len_offset`` and attends over ``cache[:offset + 1]``, so every step has new shapes and
addresses and cannot be replayed from a CUDA graph. With a
:class:`megatron_ext.decode_graph.StaticDecodeContext` in decode mode (a ``decode_position`` tensor)
this subclass writes K/V with ``index_copy_`` at that device-side position, attends over the whole
cache under the context's key mask, and takes the query's RoPE row with ``index_select``
(megatron-core caches K before RoPE and rotates the whole cache each step; so does this). Everything
else, including the weights and checkpoints, is ``SelfAttention``'s; the cache is zero-initialised
(masked slots must not hold NaNs a zero attention weight would not cancel).
"""

from __future__ import annotations

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.utils import deprecate_inference_params


def _decode_position(ctx):
    return getattr(ctx, "decode_position", None) if ctx is not None else None


class StaticDecodeSelfAttention(SelfAttention):
    """``SelfAttention`` whose one-token inference steps can run at a device-side position."""

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        ctx = kwargs.get("inference_context", kwargs.get("inference_params"))
        if ctx is None and len(args) >= 2:   # positional: (key_value_states, inference_context, ...)
            ctx = args[1]
        if _decode_position(ctx) is not None:
            attention_mask = ctx.decode_key_mask
        return super().forward(hidden_states, attention_mask, *args, **kwargs)

    def _allocate_memory(self, inference_max_sequence_length, batch_size, dim, dtype):
        return super()._allocate_memory(inference_max_sequence_length, batch_size, dim, dtype).zero_()

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb,
                                        rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                                        sequence_len_offset=None, *, inference_params=None):
        ctx = deprecate_inference_params(inference_context, inference_params)
        if _decode_position(ctx) is None or self.layer_number not in ctx.key_value_memory_dict:
            return super()._adjust_key_value_for_inference(
                ctx, query, key, value, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
                sequence_len_offset)
        k_mem, v_mem = ctx.key_value_memory_dict[self.layer_number]
        k_all, v_all = ctx.write_kv(k_mem, v_mem, key, value)
        if rotary_pos_emb is not None:   # K is cached before RoPE: rotate the whole cache
            q_pos_emb, k_pos_emb = rotary_pos_emb
            rotary_pos_emb = (ctx.rope_rows(q_pos_emb), k_pos_emb[:k_mem.size(0)])
        return query, k_all, v_all, rotary_pos_emb, AttnMaskType.arbitrary, None
