"""Configuration of TurboLaser's Hunyuan MoE models (``trust_remote_code``; needs only torch + transformers).

``turbolaser_model`` is the training run's resolved ``model`` config (megatron-core
``TransformerConfig`` field names plus a few model-level keys: ``family``, ``seq_length``,
``rotary_base``, ``cla_share_factor``, ``qk_norm_after_rope``, ...). It is the source of truth: every
architectural attribute below is derived from it in ``__post_init__``, with megatron-core's defaults
for keys it leaves out, and with the training code's one override (top-1 routing forces
``moe_router_pre_softmax``). ``vocab_size`` is the embedding's (padded) row count.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig


class TurbolaserHunyuanConfig(PreTrainedConfig):
    model_type = "turbolaser_hunyuan"

    vocab_size: int = 128
    turbolaser_model: dict | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Derived from turbolaser_model (recomputed on every construction; values passed here are ignored
    # when turbolaser_model is set).
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    ffn_hidden_size: int | None = None
    num_experts: int | None = None
    moe_topk: int | None = None
    moe_ffn_hidden_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool | None = None
    moe_router_pre_softmax: bool | None = None
    moe_router_score_function: str | None = None
    moe_router_topk_scaling_factor: float | None = None
    cla_share_factor: int | None = None
    qk_layernorm: bool | None = None
    qk_norm_after_rope: bool | None = None
    rotary_base: float | None = None
    layernorm_epsilon: float | None = None
    normalization: str | None = None
    softmax_scale: float | None = None
    max_position_embeddings: int | None = None

    def __post_init__(self, **kwargs: Any):
        m = dict(self.turbolaser_model or {})
        if m:
            heads = int(m["num_attention_heads"])
            hidden = int(m["hidden_size"])
            experts = m.get("num_moe_experts")
            topk = int(m.get("moe_router_topk", 2))
            self.hidden_size = hidden
            self.num_hidden_layers = int(m["num_layers"])
            self.num_attention_heads = heads
            self.num_key_value_heads = int(m.get("num_query_groups") or heads)
            self.head_dim = int(m.get("kv_channels") or hidden // heads)
            self.ffn_hidden_size = int(m.get("ffn_hidden_size") or 4 * hidden)
            self.num_experts = int(experts) if experts else None
            self.moe_topk = topk
            self.moe_ffn_hidden_size = int(m.get("moe_ffn_hidden_size") or self.ffn_hidden_size)
            shared = m.get("moe_shared_expert_intermediate_size")
            self.shared_expert_intermediate_size = int(shared) if shared else None
            self.moe_shared_expert_gate = bool(m.get("moe_shared_expert_gate", False))
            # megatron_ext.model_builder: top-1 routing always uses softmax before top-k.
            self.moe_router_pre_softmax = bool(m.get("moe_router_pre_softmax", False)) or (
                bool(experts) and topk == 1)
            self.moe_router_score_function = str(m.get("moe_router_score_function", "softmax"))
            scale = m.get("moe_router_topk_scaling_factor")
            self.moe_router_topk_scaling_factor = float(scale) if scale else None
            self.cla_share_factor = int(m.get("cla_share_factor") or 1)
            self.qk_layernorm = bool(m.get("qk_layernorm", False))
            self.qk_norm_after_rope = bool(m.get("qk_norm_after_rope", False))
            self.rotary_base = float(m.get("rotary_base", 10000))
            self.layernorm_epsilon = float(m.get("layernorm_epsilon", 1e-5))
            self.normalization = str(m.get("normalization", "LayerNorm"))
            sm = m.get("softmax_scale")
            self.softmax_scale = float(sm) if sm is not None else None
            self.max_position_embeddings = int(m.get("seq_length", 4096))
        super().__post_init__(**kwargs)


__all__ = ["TurbolaserHunyuanConfig"]
