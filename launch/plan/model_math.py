"""A model preset's layers, parameters and training FLOPs, from its config alone (no torch, no build).

The planner enumerates thousands of layouts, so it cannot build models; these formulas are held to the
built model instead: ``tests/launch/plan/test_model_math.py`` compares the parameter counts with the
meta-device build of every preset, and ``tests/benchmarks/test_train_step_mfu.py`` the matmul weights.

A layer is a tuple of parts: ``attention`` (its own K/V), ``attention_shared_kv`` (a cross-layer
attention consumer: queries only), ``mlp`` (dense SwiGLU FFN), ``moe`` (router + routed experts +
shared expert), ``mamba`` (Mamba2 mixer). The GPT family (``hunyuan_moe``) has an attention and an FFN
part in every layer; each layer of the hybrid family is one symbol of its pattern.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from megatron_ext.models.turbos_layout import compile_layout

MAMBA_CONV_WIDTH = 4           # megatron-core MambaMixer's d_conv (not a config field)
# TransformerConfig's defaults, for presets that leave the Mamba2 fields out
MAMBA_DEFAULTS = {"mamba_state_dim": 128, "mamba_head_dim": 64, "mamba_num_groups": 8}


class FrozenModel(dict):
    """A model config the planner's caches can key on: the planner evaluates thousands of layouts of
    one model, and every per-layer sum depends on the model and a few layout sizes only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._hash = hash(json.dumps(self, sort_keys=True, default=str))

    def __hash__(self) -> int:
        return self._hash


def freeze(model_cfg: Mapping[str, Any]) -> FrozenModel:
    if isinstance(model_cfg, FrozenModel):
        return model_cfg
    if hasattr(model_cfg, "_metadata"):   # an OmegaConf node
        from omegaconf import OmegaConf

        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    return FrozenModel(model_cfg)


def is_hybrid(model_cfg: Mapping[str, Any]) -> bool:
    return model_cfg.get("family", "hunyuan_moe") == "turbos_hybrid"


def layer_parts(model_cfg: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Every decoder layer, in order, as its parts (module docstring)."""
    return list(_layer_parts(freeze(model_cfg)))


@lru_cache(maxsize=64)
def _layer_parts(model_cfg: FrozenModel) -> tuple[tuple[str, ...], ...]:
    layers = int(model_cfg["num_layers"])
    moe = bool(model_cfg.get("num_moe_experts"))
    if not is_hybrid(model_cfg):
        share = int(model_cfg.get("cla_share_factor") or 1)
        ffn = "moe" if moe else "mlp"
        return tuple(("attention" if i % share == 0 else "attention_shared_kv", ffn) for i in range(layers))
    pattern = compile_layout(model_cfg["hybrid_blocks"], model_cfg["hybrid_block_types"], moe=moe)
    assert len(pattern) == layers, f"hybrid_blocks compile to {len(pattern)} layers, num_layers={layers}"
    symbol = {"*": "attention", "M": "mamba", "-": "mlp", "E": "moe"}
    return tuple((symbol[c],) for c in pattern)


def layer_counts(model_cfg: Mapping[str, Any]) -> dict[str, int]:
    """Layers by kind: ``attention``, ``mamba``, ``mlp`` (dense FFN), ``moe`` (a GPT-family layer counts
    once as attention and once as its FFN)."""
    out = {"attention": 0, "mamba": 0, "mlp": 0, "moe": 0}
    for parts in layer_parts(model_cfg):
        for part in parts:
            out["attention" if part.startswith("attention") else part] += 1
    return out


def mamba_dims(model_cfg: Mapping[str, Any]) -> dict[str, int]:
    """Mamba2 sizes as megatron-core's MambaMixer derives them: H heads of P, G groups, state N, chunk Q."""
    h = int(model_cfg["hidden_size"])
    p = int(model_cfg.get("mamba_head_dim") or MAMBA_DEFAULTS["mamba_head_dim"])
    heads = int(model_cfg.get("mamba_num_heads") or 2 * h // p)   # else d_inner = expand 2 x hidden
    return {"H": heads, "P": p, "d_inner": heads * p,
            "G": int(model_cfg.get("mamba_num_groups") or MAMBA_DEFAULTS["mamba_num_groups"]),
            "N": int(model_cfg.get("mamba_state_dim") or MAMBA_DEFAULTS["mamba_state_dim"]),
            "Q": int(model_cfg.get("mamba_chunk_size") or 128)}


def attention_dims(model_cfg: Mapping[str, Any]) -> dict[str, int]:
    """Query heads, K/V groups and head dim: ``q`` and ``kv`` widths are heads x head dim."""
    h = int(model_cfg["hidden_size"])
    heads = int(model_cfg["num_attention_heads"])
    groups = int(model_cfg.get("num_query_groups") or heads)
    d = int(model_cfg.get("kv_channels") or h // heads)
    return {"heads": heads, "groups": groups, "head_dim": d, "q": heads * d, "kv": groups * d}


def part_params(model_cfg: Mapping[str, Any], part: str) -> dict[str, int]:
    """One layer part's parameters: ``sharded`` (split over tensor-parallel ranks), ``replicated`` (norm
    weights and the router: whole on every TP rank) and ``expert`` (routed experts: split over expert-
    and expert-tensor-parallel ranks). Linear layers have no biases (``add_bias_linear=False``)."""
    h = int(model_cfg["hidden_size"])
    qk_norm = bool(model_cfg.get("qk_layernorm"))
    if part in ("attention", "attention_shared_kv"):
        a = attention_dims(model_cfg)
        own_kv = part == "attention"
        qkv = h * (a["q"] + (2 * a["kv"] if own_kv else 0))
        norms = a["head_dim"] * (1 + own_kv) if qk_norm else 0
        return {"sharded": qkv + a["q"] * h, "replicated": h + norms, "expert": 0}
    if part == "mlp":
        return {"sharded": 3 * h * int(model_cfg["ffn_hidden_size"]), "replicated": h, "expert": 0}
    if part == "moe":
        experts = int(model_cfg["num_moe_experts"])
        shared = int(model_cfg.get("moe_shared_expert_intermediate_size") or 0)
        return {"sharded": 3 * h * shared, "replicated": h + experts * h,
                "expert": experts * 3 * h * int(model_cfg["moe_ffn_hidden_size"])}
    if part == "mamba":
        m = mamba_dims(model_cfg)
        xbc = m["d_inner"] + 2 * m["G"] * m["N"]                        # conv channels: x, B, C
        sharded = (h * (m["d_inner"] + xbc + m["H"])                     # in_proj: z, x B C, dt
                   + xbc * (MAMBA_CONV_WIDTH + 1)                        # depthwise conv weight + bias
                   + 3 * m["H"] + m["d_inner"]                           # dt_bias, A_log, D; gated norm
                   + m["d_inner"] * h)                                   # out_proj
        return {"sharded": sharded, "replicated": h, "expert": 0}
    raise ValueError(f"unknown layer part {part!r}")


def embedding_params(model_cfg: Mapping[str, Any], vocab: int) -> dict[str, int]:
    """Untied input embedding (first pipeline stage) and output layer + final norm (last stage)."""
    h = int(model_cfg["hidden_size"])
    return {"embedding": vocab * h, "output": vocab * h, "final_norm": h}


def total_params(model_cfg: Mapping[str, Any], vocab: int) -> dict[str, int]:
    """``total`` and ``activated`` (routed experts count top-k / experts), as ``megatron_ext.count_params``."""
    total = routed = 0
    for parts in layer_parts(model_cfg):
        for part in parts:
            p = part_params(model_cfg, part)
            total += p["sharded"] + p["replicated"] + p["expert"]
            routed += p["expert"]
    total += sum(embedding_params(model_cfg, vocab).values())
    experts = int(model_cfg.get("num_moe_experts") or 0)
    activated = total - routed + (routed * int(model_cfg.get("moe_router_topk", 1)) // experts if experts else 0)
    return {"total": total, "activated": activated}


def ssd_forward_flops(model_cfg: Mapping[str, Any]) -> float:
    """Forward FLOPs per token of one Mamba2 layer's chunked SSD scan (Mamba-2, arXiv 2405.21060,
    Sec. 6: the four steps of the SSD algorithm with chunk length Q; H heads of dim P, G groups of B/C
    with state N; a multiply-add is 2 FLOPs):

    1. intra-chunk (diagonal blocks): C B^T inside the chunk (Q x Q x N per group) and its masked
       product with X (Q x Q x P per head), halved by the causal mask as for attention:
       Q x (G x N + H x P) per token;
    2. chunk states B^T X: 2 x N x P x H per token;
    3. state passing between chunks: 2 x N x P x H / Q per token;
    4. state to output, C h: 2 x N x P x H per token.

    The decay exponentials, dt softplus, D skip and gating are elementwise and not counted.
    """
    d = mamba_dims(model_cfg)
    q, n, p, heads, g = d["Q"], d["N"], d["P"], d["H"], d["G"]
    return q * (g * n + heads * p) + 4 * n * p * heads + 2 * n * p * heads / q


def matmul_params(model_cfg: Mapping[str, Any], vocab: int) -> dict[str, int]:
    """Matmul weights one token passes through, per layer kind (routed experts counted top-k times)."""
    h = int(model_cfg["hidden_size"])
    a = attention_dims(model_cfg)
    out = {"attention": h * a["q"] * 2 + h * a["kv"] * 2,                    # q, o and k, v projections
           "mlp": 3 * h * int(model_cfg.get("ffn_hidden_size") or 0),        # SwiGLU
           "output": h * vocab}
    if model_cfg.get("num_moe_experts"):
        experts, topk = int(model_cfg["num_moe_experts"]), int(model_cfg["moe_router_topk"])
        out["moe"] = (h * experts                                            # router
                      + 3 * h * int(model_cfg["moe_ffn_hidden_size"]) * topk  # SwiGLU routed experts
                      + 3 * h * int(model_cfg.get("moe_shared_expert_intermediate_size") or 0))
    else:
        out["moe"] = 0
    if is_hybrid(model_cfg):
        m = mamba_dims(model_cfg)
        xbc = m["d_inner"] + 2 * m["G"] * m["N"]                             # conv channels: x, B, C
        out["mamba"] = (h * (m["d_inner"] + xbc + m["H"])                    # in_proj: z, x B C, dt
                        + m["d_inner"] * h                                   # out_proj
                        + xbc * MAMBA_CONV_WIDTH)                            # depthwise causal conv
    else:
        out["mamba"] = 0
    return out


def attention_core_flops(model_cfg: Mapping[str, Any], seq: int) -> float:
    """Training FLOPs per token of one causal attention core: QK^T and AV are 2 x seq x head_dim each
    per head, halved by the causal mask, times 3 for forward + backward."""
    a = attention_dims(model_cfg)
    return 6 * seq * a["heads"] * a["head_dim"]


def flops_per_token(model_cfg: Mapping[str, Any], seq: int, vocab: int) -> float:
    """Training FLOPs per token: 6 x the matmul parameters a token passes through (forward 2, backward
    4; routed experts counted top-k times, the embedding lookup not at all; :func:`matmul_params`),
    plus per attention layer :func:`attention_core_flops`, plus per Mamba2 layer 3 x the SSD scan's
    forward matmul FLOPs (:func:`ssd_forward_flops`; the backward taken as 2 x forward, as for the
    matmuls). A Mamba2 layer's matmul weights are in_proj (hidden -> z, x, B, C, dt: 2 d_inner + 2 G N
    + H), out_proj (d_inner -> hidden) and the depthwise conv (4 taps on d_inner + 2 G N channels).
    Layer kinds are counted by :func:`layer_counts`.
    """
    counts, params = layer_counts(model_cfg), matmul_params(model_cfg, vocab)
    per_token = sum(counts[kind] * params[kind] for kind in ("attention", "mamba", "mlp", "moe")) + params["output"]
    flops = 6 * per_token + counts["attention"] * attention_core_flops(model_cfg, seq)
    if counts["mamba"]:
        flops += 3 * counts["mamba"] * ssd_forward_flops(model_cfg)
    return flops
