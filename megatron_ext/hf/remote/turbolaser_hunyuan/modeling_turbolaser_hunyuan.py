"""TurboLaser's Hunyuan MoE GPT (``family: hunyuan_moe``) as a transformers model (``trust_remote_code``).

Self-contained (torch + transformers only). Computes what TurboLaser's megatron-core model computes at
inference, with the same parameter names as its single-process ``state_dict()`` (``embedding.*``,
``decoder.layers.N.*``, ``decoder.final_layernorm.*``, ``output_layer.*``), so a checkpoint is an
identity copy of the trained weights.

Per decoder layer (pre-norm, residual after each block):

- attention: ``input_layernorm``; GQA with megatron's fused ``linear_qkv`` layout (rows grouped per
  query group: the group's query heads, then its K head, then its V head); RoPE with megatron's
  non-interleaved rotate-half convention (``rotary_base``); optional QK-norm (norm over head_dim)
  before RoPE (megatron's order) or after it (``qk_norm_after_rope``, Hunyuan's order); causal softmax
  attention scaled by ``head_dim ** -0.5`` (or ``softmax_scale``); ``linear_proj``.
- cross-layer attention (``cla_share_factor`` > 1): in each group of that many adjacent layers the
  first (producer) projects Q, K and V; the others (consumers) have only ``linear_q`` and attend over
  the producer's finished (RoPE'd, normalised) K/V.
- MoE: ``pre_mlp_layernorm``; router ``mlp.router.weight`` (logits in the activation dtype) as
  megatron-core 0.16.1's ``TopKRouter``, dropless: softmax scoring with ``moe_router_pre_softmax``
  (softmax over all experts, then top-k: the chosen experts are weighted by their probability over all
  experts, *not* renormalised; TurboLaser forces this for top-1) or without (top-k logits, softmax
  over the k chosen); optional ``moe_router_topk_scaling_factor`` and ``moe_router_dtype``. Routed SwiGLU experts
  (``linear_fc1`` = [gate; up], the routing weight multiplies silu(gate) * up before ``linear_fc2``,
  as megatron does) plus the shared SwiGLU expert, added ungated (or sigmoid-gated when
  ``moe_shared_expert_gate``).

Then the final norm and the untied ``output_layer``. The vocabulary is the padded embedding.

No KV cache: every forward (and every ``generate`` step) recomputes the whole sequence; ``cache`` /
``past_key_values`` / ``use_cache`` arguments are ignored and ``generate`` always feeds the full
sequence. Position ids: ``position_ids`` if given, else from a 2D ``attention_mask`` (left padding),
else ``0..s-1``; keys where ``attention_mask`` is 0 are masked.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers >= 5: init functions that leave loaded weights alone
    from transformers import initialization as _init
except ImportError:  # pragma: no cover
    _init = nn.init

try:
    from .configuration_turbolaser_hunyuan import TurbolaserHunyuanConfig
except ImportError:  # loaded as a plain module (not through transformers' dynamic module)
    from configuration_turbolaser_hunyuan import TurbolaserHunyuanConfig


# megatron TransformerConfig settings this model does not implement: refused unless at these values
# (training-only settings, e.g. aux loss, capacity, dispatcher, need no entry).
_UNSUPPORTED = {
    "add_qkv_bias": False, "add_bias_linear": False, "rotary_interleaved": False, "rotary_percent": 1.0,
    "moe_router_enable_expert_bias": False, "moe_router_num_groups": None, "moe_router_group_topk": None,
    "moe_layer_freq": 1, "moe_apply_probs_on_input": False, "multi_latent_attention": False,
    "apply_query_key_layer_scaling": False, "activation": "swiglu", "family": "hunyuan_moe",
    "moe_router_load_balancing_type": "aux_loss",  # only sinkhorn changes inference routing
}


def _check_supported(config: TurbolaserHunyuanConfig) -> None:
    m = config.turbolaser_model or {}
    for key, default in _UNSUPPORTED.items():
        value = m.get(key)
        if value is None or value == default:
            continue
        if key == "moe_router_load_balancing_type" and value != "sinkhorn":
            continue
        raise ValueError(f"turbolaser_hunyuan: model setting {key}={value!r} is not implemented")
    if config.moe_router_score_function not in ("softmax", "sigmoid"):
        raise ValueError(f"turbolaser_hunyuan: router score function {config.moe_router_score_function!r}")
    if config.normalization not in ("RMSNorm", "LayerNorm"):
        raise ValueError(f"turbolaser_hunyuan: normalization {config.normalization!r}")


def _norm(config, size: int) -> nn.Module:
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(size, eps=config.layernorm_epsilon)
    return nn.LayerNorm(size, eps=config.layernorm_epsilon)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_freqs(config, positions: torch.Tensor) -> torch.Tensor:
    """[b, s, 1, head_dim] angles, as megatron's RotaryEmbedding (cat(freqs, freqs))."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rotary_base ** (
        torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    freqs = positions.float().unsqueeze(-1) * inv_freq  # [b, s, dim/2]
    return torch.cat((freqs, freqs), dim=-1).unsqueeze(2)


def _apply_rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    return t * cos + _rotate_half(t) * sin


class TurbolaserAttention(nn.Module):
    """A producer (``linear_qkv``) or, under CLA, a consumer (``linear_q``) attention layer."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.heads, self.groups, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                  config.head_dim)
        self.per_group = self.heads // self.groups
        self.producer = layer_idx % config.cla_share_factor == 0
        self.qk_norm_after_rope = config.qk_norm_after_rope
        self.scale = config.softmax_scale if config.softmax_scale is not None else self.head_dim ** -0.5
        hidden, q_size = config.hidden_size, self.heads * self.head_dim
        if self.producer:
            self.linear_qkv = nn.Linear(hidden, q_size + 2 * self.groups * self.head_dim, bias=False)
        else:
            self.linear_q = nn.Linear(hidden, q_size, bias=False)
        self.linear_proj = nn.Linear(q_size, hidden, bias=False)
        if config.qk_layernorm:
            self.q_layernorm = _norm(config, self.head_dim)
            if self.producer:
                self.k_layernorm = _norm(config, self.head_dim)

    def _rope_norm(self, t, freqs, norm):
        if self.qk_norm_after_rope:
            t = _apply_rope(t, freqs)
            return t if norm is None else norm(t)
        t = t if norm is None else norm(t)
        return _apply_rope(t, freqs)

    def forward(self, x, freqs, mask, shared_kv):
        b, s, _ = x.shape
        hd = self.head_dim
        if self.producer:
            mixed = self.linear_qkv(x).view(b, s, self.groups, (self.per_group + 2) * hd)
            q, k, v = torch.split(mixed, [self.per_group * hd, hd, hd], dim=-1)
            q = q.reshape(b, s, self.heads, hd)
        else:
            q = self.linear_q(x).view(b, s, self.heads, hd)
        q = self._rope_norm(q, freqs, getattr(self, "q_layernorm", None))
        if self.producer:
            k = self._rope_norm(k, freqs, getattr(self, "k_layernorm", None))
            shared_kv = (k, v)
        else:
            k, v = shared_kv
        k = k.repeat_interleave(self.per_group, dim=2)
        v = v.repeat_interleave(self.per_group, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.scale
        scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, self.heads * hd)
        return self.linear_proj(out), shared_kv


class TurbolaserSwiGLU(nn.Module):
    def __init__(self, hidden: int, width: int, gate: bool = False):
        super().__init__()
        self.linear_fc1 = nn.Linear(hidden, 2 * width, bias=False)
        self.linear_fc2 = nn.Linear(width, hidden, bias=False)
        if gate:  # megatron SharedExpertMLP's sigmoid gate
            self.gate_weight = nn.Parameter(torch.empty(1, hidden))

    def forward(self, x, scale: torch.Tensor | None = None):
        gate, up = torch.chunk(self.linear_fc1(x), 2, dim=-1)
        h = F.silu(gate) * up
        if scale is not None:
            h = h * scale.unsqueeze(-1)
        out = self.linear_fc2(h)
        if hasattr(self, "gate_weight"):
            out = out * torch.sigmoid(F.linear(x, self.gate_weight))
        return out


class TurbolaserRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.topk = config.moe_topk
        self.pre_softmax = config.moe_router_pre_softmax
        self.score_function = config.moe_router_score_function
        self.scaling = config.moe_router_topk_scaling_factor
        self.router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
            (config.turbolaser_model or {}).get("moe_router_dtype"))

    def forward(self, x):
        """[tokens, hidden] -> (weights [tokens, k], expert ids [tokens, k]), megatron-core 0.16.1's
        ``topk_routing_with_score_function`` (no groups, no expert bias)."""
        dtype = self.router_dtype or x.dtype  # megatron's moe_router_dtype
        logits = F.linear(x.to(dtype), self.weight.to(dtype))
        if self.score_function == "softmax":
            if self.pre_softmax:
                scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
                probs, idx = torch.topk(scores, k=self.topk, dim=1)
            else:
                top, idx = torch.topk(logits, k=self.topk, dim=1)
                probs = torch.softmax(top, dim=-1, dtype=torch.float32).type_as(logits)
        else:
            scores = torch.sigmoid(logits.float()).type_as(logits)
            probs, idx = torch.topk(scores, k=self.topk, dim=1)
            if self.topk > 1:
                probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
        if self.scaling:
            probs = probs * self.scaling
        return probs, idx


class TurbolaserExperts(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.local_experts = nn.ModuleList(
            TurbolaserSwiGLU(config.hidden_size, config.moe_ffn_hidden_size) for _ in range(config.num_experts))


class TurbolaserMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.router = TurbolaserRouter(config)
        self.experts = TurbolaserExperts(config)
        if config.shared_expert_intermediate_size:
            self.shared_experts = TurbolaserSwiGLU(config.hidden_size, config.shared_expert_intermediate_size,
                                                   gate=bool(config.moe_shared_expert_gate))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, idx = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts.local_experts):
            tok, slot = torch.nonzero(idx == e, as_tuple=True)  # dropless: every assignment
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok], probs[tok, slot].to(x.dtype)))
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out.view(shape)


class TurbolaserDenseMLP(TurbolaserSwiGLU):
    pass


class TurbolaserDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.input_layernorm = _norm(config, config.hidden_size)
        self.self_attention = TurbolaserAttention(config, layer_idx)
        self.pre_mlp_layernorm = _norm(config, config.hidden_size)
        self.mlp = (TurbolaserMoE(config) if config.num_experts
                    else TurbolaserDenseMLP(config.hidden_size, config.ffn_hidden_size))

    def forward(self, x, freqs, mask, shared_kv):
        attn, shared_kv = self.self_attention(self.input_layernorm(x), freqs, mask, shared_kv)
        x = x + attn
        x = x + self.mlp(self.pre_mlp_layernorm(x))
        return x, shared_kv


class TurbolaserEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)


class TurbolaserDecoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(TurbolaserDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = _norm(config, config.hidden_size)


class TurbolaserHunyuanPreTrainedModel(PreTrainedModel):
    config_class = TurbolaserHunyuanConfig
    # Parameters sit at the top level (megatron GPTModel names); no base-model wrapper to strip or add.
    base_model_prefix = "turbolaser_base_model"
    _no_split_modules: ClassVar[list[str]] = ["TurbolaserDecoderLayer"]
    supports_gradient_checkpointing = False

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no KV cache: every step recomputes the full sequence

    def _init_weights(self, module):
        std = float((self.config.turbolaser_model or {}).get("init_method_std", 0.02))
        if isinstance(module, (nn.Linear, nn.Embedding)):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
            if module.weight is not None:
                _init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, TurbolaserRouter):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, TurbolaserSwiGLU) and hasattr(module, "gate_weight"):
            _init.normal_(module.gate_weight, mean=0.0, std=std)


class TurbolaserHunyuanForCausalLM(TurbolaserHunyuanPreTrainedModel, GenerationMixin):
    def __init__(self, config: TurbolaserHunyuanConfig):
        super().__init__(config)
        _check_supported(config)
        self.embedding = TurbolaserEmbedding(config)
        self.decoder = TurbolaserDecoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.output_layer

    def set_output_embeddings(self, value):
        self.output_layer = value

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """No KV cache: always the whole sequence so far."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.embedding.word_embeddings(input_ids)
        x = inputs_embeds
        b, s, _ = x.shape
        device = x.device
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(s, device=device).expand(b, -1)
        freqs = _rope_freqs(self.config, position_ids.to(device))
        mask = torch.ones(s, s, dtype=torch.bool, device=device).triu(1).view(1, 1, s, s)
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = mask | (attention_mask == 0).view(b, 1, 1, s)
        shared_kv = None
        for layer in self.decoder.layers:
            x, shared_kv = layer(x, freqs, mask, shared_kv)
        x = self.decoder.final_layernorm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.output_layer(x)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


__all__ = ["TurbolaserHunyuanForCausalLM", "TurbolaserHunyuanPreTrainedModel"]
