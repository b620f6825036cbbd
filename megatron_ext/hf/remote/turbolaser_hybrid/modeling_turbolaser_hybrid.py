"""TurboLaser's hybrid Mamba2 / attention / MoE language model for ``transformers`` (``trust_remote_code``).

Self-contained (``torch`` + ``transformers``): computes what TurboLaser's ``turbos_hybrid`` model
(megatron-core 0.16.1 ``MambaModel`` with TurboLaser's local layer specs, TP1) computes in inference, layer
by layer following ``config.layer_pattern``; parameter names are that model's single-process
``state_dict()`` names, so a checkpoint is the state dict as it is (``_extra_state`` left out).

Every layer is pre-norm with a residual (``h = h + mixer(norm(h))``); norms are ``torch.nn.RMSNorm`` (or
``LayerNorm``) with ``layernorm_epsilon``:

- ``M`` Mamba2 (``norm``, ``mixer``): ``in_proj`` -> [z, x, B, C, dt]; causal depthwise ``conv1d`` (with
  bias) + SiLU over xBC; ``dt = softplus(dt + dt_bias)`` (no clamp), ``A = -exp(A_log)``; the selective
  scan ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t + D x_t`` with ``mamba_num_groups``
  B/C groups (head ``i`` reads group ``i // (heads / groups)``); then ``y * silu(z)``, a grouped RMSNorm
  (``d_inner / groups`` channels per group, eps 1e-5 as megatron-core hard-codes it) times
  ``mixer.norm.weight``; ``out_proj``. The scan runs token by token in float32 (fine for small models).
- ``*`` attention (``input_layernorm``, ``self_attention``): ``linear_qkv`` laid out per query group as
  [its query heads, one key head, one value head]; QK-norm (``q_layernorm`` / ``k_layernorm`` over
  ``head_dim``) *before* RoPE; RoPE on the whole head (non-interleaved rotate-half, ``rotary_base``,
  positions 0..L-1 as megatron-core's ``MambaModel`` uses them; skipped in layers ``no_rope_freq`` marks);
  GQA causal softmax attention with scale ``head_dim ** -0.5`` (or ``softmax_scale``); ``linear_proj``.
- ``E`` MoE (``pre_mlp_layernorm``, ``mlp``): router logits ``x @ router.weight.T``; softmax top-k as
  megatron-core's ``TopKRouter`` (top-k of the logits then softmax over the k, or softmax then top-k with
  pre-softmax, which TurboLaser forces for top-1; optional scaling factor; ``sigmoid`` scoring supported),
  dropless; the routed SwiGLU experts (``linear_fc1`` = [gate; up], ``silu(gate) * up``, ``linear_fc2``)
  weighted by their probabilities, plus the shared SwiGLU expert (sigmoid-gated by ``gate_weight`` only
  when ``moe_shared_expert_gate``).
- ``-`` dense SwiGLU MLP (``pre_mlp_layernorm``, ``mlp.linear_fc1`` / ``linear_fc2``).

Then ``decoder.final_norm`` and the untied ``output_layer``. Logits cover all ``vocab_size`` rows (the
training run's padded embedding); never sample the padding ids (``generate(suppress_tokens=...)``).

**No cache**: ``generate`` recomputes the whole sequence at every step (``use_cache`` is ignored;
``prepare_inputs_for_generation`` always passes the full ids). Batches must be unpadded (all-ones
``attention_mask``): neither the Mamba scan nor the positions of the original model know padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # shipped next to this file in the checkpoint folder
    from .configuration_turbolaser_hybrid import TurbolaserHybridConfig
except ImportError:  # imported as a top-level module
    from configuration_turbolaser_hybrid import TurbolaserHybridConfig

MAMBA_CONV_KERNEL = 4      # megatron-core MambaMixer d_conv default
MAMBA_GATED_NORM_EPS = 1e-5  # megatron-core MambaMixer hard-codes the gated norm's epsilon


def _norm(config: TurbolaserHybridConfig, size: int) -> nn.Module:
    eps = float(config.setting("layernorm_epsilon"))
    if config.setting("normalization") == "RMSNorm":
        return nn.RMSNorm(size, eps=eps)
    return nn.LayerNorm(size, eps=eps)


def _linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False)


def _swiglu(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
    gate, up = torch.chunk(fc1(x), 2, dim=-1)
    return fc2(F.silu(gate) * up)


class MambaMixer(nn.Module):
    def __init__(self, config: TurbolaserHybridConfig):
        super().__init__()
        hidden = config.hidden_size
        self.head_dim = int(config.setting("mamba_head_dim"))
        self.nheads = int(config.setting("mamba_num_heads") or (2 * hidden) // self.head_dim)
        self.ngroups = int(config.setting("mamba_num_groups"))
        self.d_state = int(config.setting("mamba_state_dim"))
        self.d_inner = self.nheads * self.head_dim
        conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        self.in_proj = _linear(hidden, 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, MAMBA_CONV_KERNEL, groups=conv_dim, bias=True,
                                padding=MAMBA_CONV_KERNEL - 1)
        self.dt_bias = nn.Parameter(torch.zeros(self.nheads))
        self.A_log = nn.Parameter(torch.zeros(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = _linear(self.d_inner, hidden)

    def scan(self, x, dt, A, B, C):
        """x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, h, n) per head -> y (b, l, h, p), float32."""
        b, l, h, p = x.shape
        state = x.new_zeros(b, h, p, self.d_state)
        ys = []
        for t in range(l):
            decay = torch.exp(dt[:, t] * A)  # (b, h)
            state = state * decay[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
            ys.append((state * C[:, t, :, None, :]).sum(-1))
        return torch.stack(ys, dim=1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, l, _ = hidden.shape
        gn = self.ngroups * self.d_state
        z, xbc, dt = torch.split(self.in_proj(hidden), [self.d_inner, self.d_inner + 2 * gn, self.nheads], dim=-1)
        xbc = F.silu(self.conv1d(xbc.transpose(1, 2))[..., :l].transpose(1, 2))
        x, B, C = torch.split(xbc, [self.d_inner, gn, gn], dim=-1)
        f32 = torch.float32
        dt = F.softplus(dt.to(f32) + self.dt_bias.to(f32))
        A = -torch.exp(self.A_log.to(f32))
        heads_per_group = self.nheads // self.ngroups
        B = B.to(f32).reshape(b, l, self.ngroups, self.d_state).repeat_interleave(heads_per_group, dim=2)
        C = C.to(f32).reshape(b, l, self.ngroups, self.d_state).repeat_interleave(heads_per_group, dim=2)
        x = x.to(f32).reshape(b, l, self.nheads, self.head_dim)
        y = self.scan(x, dt, A, B, C) + x * self.D.to(f32)[:, None]
        y = y.reshape(b, l, self.d_inner) * F.silu(z.to(f32))
        groups = y.reshape(b, l, self.ngroups, self.d_inner // self.ngroups)
        groups = groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + MAMBA_GATED_NORM_EPS)
        y = groups.reshape(b, l, self.d_inner) * self.norm.weight.to(f32)
        return self.out_proj(y.to(hidden.dtype))


class SelfAttention(nn.Module):
    def __init__(self, config: TurbolaserHybridConfig, layer: int):
        super().__init__()
        hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.groups = config.tl_num_query_groups
        self.head_dim = config.tl_head_dim
        self.linear_qkv = _linear(hidden, (self.heads + 2 * self.groups) * self.head_dim)
        if config.setting("qk_layernorm"):
            self.q_layernorm = _norm(config, self.head_dim)
            self.k_layernorm = _norm(config, self.head_dim)
        else:
            self.q_layernorm = self.k_layernorm = None
        self.linear_proj = _linear(self.heads * self.head_dim, hidden)
        self.rope = not config.tl_no_rope_layers[layer]
        self.rotary_base = float(config.setting("rotary_base"))
        scale = config.setting("softmax_scale")
        self.scale = float(scale) if scale is not None else self.head_dim ** -0.5

    def _rope(self, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """t (b, l, heads, d); megatron-core's RotaryEmbedding + non-interleaved _apply_rotary_pos_emb_bshd."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=t.device) / dim))
        freqs = positions.to(torch.float32)[..., None] * inv_freq  # (b, l, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        cos, sin = emb.cos().to(t.dtype), emb.sin().to(t.dtype)
        t1, t2 = torch.chunk(t, 2, dim=-1)
        return t * cos + torch.cat((-t2, t1), dim=-1) * sin

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, l, _ = hidden.shape
        per_group = self.heads // self.groups
        qkv = self.linear_qkv(hidden).view(b, l, self.groups, (per_group + 2) * self.head_dim)
        q, k, v = torch.split(qkv, [per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q = q.reshape(b, l, self.heads, self.head_dim)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if self.rope:
            q, k = self._rope(q, positions), self._rope(k, positions)
        k = k.repeat_interleave(per_group, dim=2)
        v = v.repeat_interleave(per_group, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * self.scale
        causal = torch.ones(l, l, dtype=torch.bool, device=hidden.device).triu(1)
        probs = scores.masked_fill(causal, float("-inf")).softmax(-1).to(v.dtype)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, self.heads * self.head_dim)
        return self.linear_proj(out)


class SwiGLUMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.linear_fc1 = _linear(hidden, 2 * ffn)
        self.linear_fc2 = _linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _swiglu(x, self.linear_fc1, self.linear_fc2)


class SharedExpert(SwiGLUMLP):
    def __init__(self, hidden: int, ffn: int, gate: bool):
        super().__init__(hidden, ffn)
        self.gate_weight = nn.Parameter(torch.zeros(1, hidden)) if gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.gate_weight is not None:
            out = out * torch.sigmoid(F.linear(x, self.gate_weight))
        return out


class Router(nn.Module):
    def __init__(self, config: TurbolaserHybridConfig):
        super().__init__()
        self.num_experts = int(config.setting("num_moe_experts"))
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size))
        self.topk = int(config.setting("moe_router_topk"))
        self.pre_softmax = config.tl_router_pre_softmax
        self.score_function = config.setting("moe_router_score_function")
        self.scaling = config.setting("moe_router_topk_scaling_factor")

    def forward(self, x: torch.Tensor):
        """x (tokens, hidden) -> (probs, indices), each (tokens, topk); megatron-core's topk routing."""
        logits = F.linear(x, self.weight)
        if self.score_function == "softmax":
            if self.pre_softmax:
                scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
                probs, idx = torch.topk(scores, k=self.topk, dim=1)
            else:
                scores, idx = torch.topk(logits, k=self.topk, dim=1)
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(logits)
        elif self.score_function == "sigmoid":
            scores, idx = torch.topk(torch.sigmoid(logits.float()).type_as(logits), k=self.topk, dim=1)
            probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if self.topk > 1 else scores
        else:
            raise ValueError(f"moe_router_score_function={self.score_function!r}")
        if self.scaling:
            probs = probs * self.scaling
        return probs, idx


class Experts(nn.Module):
    def __init__(self, hidden: int, ffn: int, num: int):
        super().__init__()
        self.local_experts = nn.ModuleList(SwiGLUMLP(hidden, ffn) for _ in range(num))


class MoE(nn.Module):
    def __init__(self, config: TurbolaserHybridConfig):
        super().__init__()
        hidden = config.hidden_size
        self.router = Router(config)
        ffn = int(config.setting("moe_ffn_hidden_size") or config.setting("ffn_hidden_size"))
        self.experts = Experts(hidden, ffn, self.router.num_experts)
        shared = config.setting("moe_shared_expert_intermediate_size")
        self.shared_experts = (SharedExpert(hidden, int(shared), bool(config.setting("moe_shared_expert_gate")))
                               if shared else None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        probs, idx = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts.local_experts):
            rows, slot = torch.nonzero(idx == e, as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(x[rows]) * probs[rows, slot, None].to(x.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(hidden.shape)


class MambaLayer(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.norm = _norm(config, config.hidden_size)
        self.mixer = MambaMixer(config)

    def forward(self, h, positions):
        return h + self.mixer(self.norm(h))


class AttentionLayer(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.input_layernorm = _norm(config, config.hidden_size)
        self.self_attention = SelfAttention(config, layer)

    def forward(self, h, positions):
        return h + self.self_attention(self.input_layernorm(h), positions)


class MoELayer(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.pre_mlp_layernorm = _norm(config, config.hidden_size)
        self.mlp = MoE(config)

    def forward(self, h, positions):
        return h + self.mlp(self.pre_mlp_layernorm(h))


class MLPLayer(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.pre_mlp_layernorm = _norm(config, config.hidden_size)
        self.mlp = SwiGLUMLP(config.hidden_size, int(config.setting("ffn_hidden_size")))

    def forward(self, h, positions):
        return h + self.mlp(self.pre_mlp_layernorm(h))


LAYERS = {"M": MambaLayer, "*": AttentionLayer, "E": MoELayer, "-": MLPLayer}


class Decoder(nn.Module):
    def __init__(self, config: TurbolaserHybridConfig):
        super().__init__()
        self.layers = nn.ModuleList(LAYERS[s](config, i) for i, s in enumerate(config.layer_pattern))
        self.final_norm = _norm(config, config.hidden_size)


class Embedding(nn.Module):
    def __init__(self, config: TurbolaserHybridConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)


class TurbolaserHybridPreTrainedModel(PreTrainedModel):
    config_class = TurbolaserHybridConfig
    base_model_prefix = "turbolaser"
    supports_gradient_checkpointing = False
    _no_split_modules = ("MambaLayer", "AttentionLayer", "MoELayer", "MLPLayer")

    def _init_weights(self, module):
        std = float(self.config.setting("init_method_std") or 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)


class TurbolaserHybridForCausalLM(TurbolaserHybridPreTrainedModel, GenerationMixin):
    def __init__(self, config: TurbolaserHybridConfig):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.decoder = Decoder(config)
        self.output_layer = _linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.output_layer

    def set_output_embeddings(self, value):
        self.output_layer = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, return_dict=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("turbolaser_hybrid: padded batches are not supported (the Mamba scan has no "
                             "padding mask); run unpadded sequences, e.g. one prompt at a time")
        hidden = self.embedding.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        b, l = hidden.shape[:2]
        # megatron-core's MambaModel ignores position ids and rotates by 0..L-1.
        positions = torch.arange(l, device=hidden.device).expand(b, l)
        for layer in self.decoder.layers:
            hidden = layer(hidden, positions)
        hidden = self.decoder.final_norm(hidden)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif not isinstance(logits_to_keep, int):
            hidden = hidden[:, logits_to_keep]
        logits = self.output_layer(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        # No cache: every step recomputes the whole sequence.
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}


__all__ = ["TurbolaserHybridConfig", "TurbolaserHybridForCausalLM", "TurbolaserHybridPreTrainedModel"]
