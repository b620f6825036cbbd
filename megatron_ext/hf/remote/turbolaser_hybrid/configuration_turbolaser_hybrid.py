"""Configuration of TurboLaser's hybrid Mamba2 / attention / MoE model (``trust_remote_code`` package).

Self-contained (``transformers`` only): shipped next to the weights so that a checkpoint of TurboLaser's
``turbos_hybrid`` family (megatron-core ``MambaModel``) loads with ``AutoModelForCausalLM`` without
TurboLaser installed. ``turbolaser_model`` is the training run's resolved model config (the keys of a
``launch/conf/model/*.yaml`` preset, megatron-core ``TransformerConfig`` field names);
``layer_pattern`` is its compiled hybrid layout, one symbol per layer: ``M`` Mamba2, ``*`` attention,
``E`` MoE FFN, ``-`` dense FFN. The model code reads everything else from ``turbolaser_model`` with
megatron-core 0.16.1's defaults (and TurboLaser's builder's fixed choices: SwiGLU FFNs, no linear
biases, untied embeddings, RoPE, top-1 routing with pre-softmax).
"""

from __future__ import annotations

from transformers import PretrainedConfig

# megatron-core TransformerConfig defaults of the fields the model reads (0.16.1).
_DEFAULTS = {
    "normalization": "LayerNorm",
    "layernorm_epsilon": 1e-5,
    "qk_layernorm": False,
    "kv_channels": None,
    "num_query_groups": None,
    "softmax_scale": None,
    "rotary_base": 10000,
    "rotary_interleaved": False,
    "no_rope_freq": None,
    "mamba_num_heads": None,
    "mamba_head_dim": 64,
    "mamba_num_groups": 8,
    "mamba_state_dim": 128,
    "num_moe_experts": None,
    "moe_router_topk": 2,
    "moe_router_pre_softmax": False,
    "moe_router_score_function": "softmax",
    "moe_router_topk_scaling_factor": None,
    "moe_shared_expert_gate": False,
    "moe_ffn_hidden_size": None,
    "moe_shared_expert_intermediate_size": None,
    "ffn_hidden_size": None,
}

# Settings whose non-default values this package does not compute (refused at config time, not silently
# computed differently).
_UNSUPPORTED = {
    "rotary_interleaved": False,
    "moe_router_num_groups": None,
    "moe_router_group_topk": None,
    "moe_router_enable_expert_bias": False,
    "moe_input_jitter_eps": None,
    "attention_output_gate": False,
    "add_bias_linear": False,
    "add_qkv_bias": False,
    "multi_latent_attention": False,
    "window_size": None,
    "rotary_percent": 1.0,
}


class TurbolaserHybridConfig(PretrainedConfig):
    model_type = "turbolaser_hybrid"

    def __init__(self, turbolaser_model: dict | None = None, layer_pattern: str = "", vocab_size: int = 128,
                 bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings: bool = False,
                 use_cache: bool = False, **kwargs):
        self.turbolaser_model = dict(turbolaser_model or {})
        self.layer_pattern = layer_pattern
        self.vocab_size = vocab_size
        self.use_cache = use_cache
        m = self.turbolaser_model
        if m:
            bad = sorted(set(layer_pattern) - set("M*E-"))
            if bad:
                raise ValueError(f"layer_pattern {layer_pattern!r}: unknown symbols {bad} (use M, *, E, -)")
            if m.get("num_layers") is not None and int(m["num_layers"]) != len(layer_pattern):
                raise ValueError(f"layer_pattern has {len(layer_pattern)} layers, turbolaser_model.num_layers="
                                 f"{m['num_layers']}")
            for key, default in _UNSUPPORTED.items():
                if m.get(key) is not None and m[key] != default:
                    raise ValueError(f"turbolaser_model.{key}={m[key]!r} is not supported by this model code")
            if str(m.get("activation", "swiglu")) != "swiglu":
                raise ValueError(f"turbolaser_model.activation={m['activation']!r}: only swiglu")
            self.hidden_size = int(m["hidden_size"])
            self.num_attention_heads = int(m["num_attention_heads"])
        self.num_hidden_layers = len(layer_pattern)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def setting(self, key: str):
        """``turbolaser_model[key]``, or megatron-core's default when absent or null."""
        value = self.turbolaser_model.get(key)
        return _DEFAULTS.get(key) if value is None else value

    # Derived settings, as megatron-core's TransformerConfig.__post_init__ / TurboLaser's builder derive them.
    @property
    def tl_head_dim(self) -> int:
        return int(self.setting("kv_channels") or self.hidden_size // self.num_attention_heads)

    @property
    def tl_num_query_groups(self) -> int:
        return int(self.setting("num_query_groups") or self.num_attention_heads)

    @property
    def tl_router_pre_softmax(self) -> bool:
        # TurboLaser's model_builder forces pre-softmax for top-1 routing.
        return bool(self.setting("moe_router_pre_softmax")) or int(self.setting("moe_router_topk")) == 1

    @property
    def tl_no_rope_layers(self) -> list[bool]:
        """Per layer (all layers, 0-indexed): whether megatron-core skips RoPE there (``no_rope_freq``)."""
        freq, n = self.setting("no_rope_freq"), len(self.layer_pattern)
        if not freq:
            return [False] * n
        if isinstance(freq, int):
            return [bool(x) for x in ([0] * (freq - 1) + [1]) * (n // freq)]
        return [bool(x) for x in freq]


__all__ = ["TurbolaserHybridConfig"]
