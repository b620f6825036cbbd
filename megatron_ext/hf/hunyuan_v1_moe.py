"""Our Hunyuan MoE GPT (``family: hunyuan_moe``) <-> transformers' ``hunyuan_v1_moe`` checkpoints.

Works on a single-process (TP1 / PP1 / EP1) model's parameter names, one decoder layer at a time; the
caller streams layers and does all I/O. Every conversion is a pure reshape / split / concat: no dtype
change, so ``layer_from_hf(layer_to_hf(x)) == x`` bit for bit.

What the exported model computes (transformers 5.x ``HunYuanMoEV1ForCausalLM``): pre-norm decoder
layers of GQA attention (RoPE, then RMSNorm QK-norm over head_dim) and an MoE block of one shared
SwiGLU MLP plus ``num_experts`` routed SwiGLU experts, all of width ``intermediate_size``, routed by
softmax over all experts -> top-k -> weights renormalised over the k chosen. Our model computes the
same when :func:`check_exportable` passes, with two stated differences:

- Routing is *dropless* in transformers. Our ``moe_routing_mode`` drop / recycle (capacity, Hunyuan
  recycle routing) only act during training; generation (``megatron_ext.generation``) runs dropless,
  so the exported model equals our model as our generation runs it.
- The vocabulary is exported padded: HF ``vocab_size`` is our embedding's row count
  (``model_builder.padded_vocab_size``), not the tokenizer's. Logits over the padding ids exist in the
  exported model; a trained model never puts mass there, but a strict client can suppress them
  (``generate(..., suppress_tokens=range(tokenizer_size, vocab_size))``).

Checkpoint keys. transformers 5 keeps routed experts as fused 3D parameters (``mlp.experts.gate_up_proj``
[E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I]), but the *checkpoint* keys are per expert,
``mlp.experts.E.{gate,up,down}_proj.weight``: ``conversion_mapping`` maps ``hunyuan_v1_moe`` to the
``qwen2_moe`` converters, which stack them (gate before up) at load time and split them back in
``save_pretrained``. The router ``mlp.gate.wg`` is a float32 parameter in transformers whatever the
model dtype; a bf16 checkpoint is upcast on load (exact).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

from megatron_ext.errors import ExportRefused
from megatron_ext.hf import transformer_config_defaults

MODEL_TYPE = "hunyuan_v1_moe"
ARCHITECTURE = "HunYuanMoEV1ForCausalLM"

# Keys of our model config that are read and checked here (the rest must be at megatron defaults or
# in _FORWARD_NEUTRAL_KEYS).
_HANDLED_KEYS = {
    "family", "activation", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "ffn_hidden_size", "qk_layernorm", "qk_norm_after_rope", "cla_share_factor",
    "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
    "moe_routing_mode", "moe_expert_capacity_factor", "normalization", "layernorm_epsilon",
    "init_method_std", "attention_dropout", "seq_length", "rotary_base", "vocab_size",
    "moe_router_pre_softmax", "moe_router_score_function", "moe_router_enable_expert_bias",
    "moe_router_num_groups", "moe_router_group_topk", "moe_router_topk_scaling_factor",
    "moe_shared_expert_gate", "moe_layer_freq", "add_qkv_bias", "softmax_scale", "rotary_percent",
    "rotary_interleaved",
}
# Settings that change training (losses, dropout, capacity, parallel layout, numerics of kernels) but
# not the function the trained weights compute at inference.
_FORWARD_NEUTRAL_KEYS = {
    "hidden_dropout", "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_input_jitter_eps",
    "moe_router_load_balancing_type", "moe_token_drop_policy", "moe_pad_expert_input_to_capacity",
    "moe_token_dispatcher_type", "moe_grouped_gemm", "moe_permute_fusion", "moe_router_dtype",
    "moe_router_bias_update_rate", "moe_per_layer_logging", "moe_shared_expert_overlap",
    "recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules",
    "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
    "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split",
    "calculate_per_token_loss", "bf16", "fp16", "params_dtype", "add_bias_linear",
    "gated_linear_unit", "gradient_accumulation_fusion", "bias_dropout_fusion", "apply_rope_fusion",
    "masked_softmax_fusion", "persist_layer_norm", "use_cpu_initialization", "sequence_parallel",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    "virtual_pipeline_model_parallel_size", "pipeline_dtype", "deterministic_mode",
    "output_layer_init_method", "init_method", "perform_initialization",
}


def _refuse(feature: str, fix: str) -> None:
    raise ExportRefused(f"cannot export to {MODEL_TYPE}: {feature}. {fix}")


def _expert_width(cfg: Mapping) -> int:
    # megatron-core: moe_ffn_hidden_size defaults to ffn_hidden_size
    return int(cfg.get("moe_ffn_hidden_size") or cfg["ffn_hidden_size"])


def _head_dim(cfg: Mapping) -> int:
    return int(cfg.get("kv_channels") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _query_groups(cfg: Mapping) -> int:
    return int(cfg.get("num_query_groups") or cfg["num_attention_heads"])


def check_exportable(model_cfg: Mapping) -> None:
    """Raise :class:`ExportRefused` for every feature ``hunyuan_v1_moe`` cannot represent.

    Routing capacity (``moe_routing_mode`` drop / recycle) is allowed: the export computes our
    model's dropless routing, which is what our generation runs (module docstring).
    """
    cfg = dict(model_cfg)
    if cfg.get("family", "hunyuan_moe") != "hunyuan_moe":
        _refuse(f"model.family={cfg['family']!r}", "only family hunyuan_moe maps to hunyuan_v1_moe")
    if cfg.get("activation", "swiglu") != "swiglu":
        _refuse(f"model.activation={cfg['activation']!r}", "hunyuan_v1_moe MLPs are SwiGLU (silu)")
    if int(cfg.get("cla_share_factor") or 1) > 1:
        _refuse(f"cross-layer attention (model.cla_share_factor={cfg['cla_share_factor']}): layers "
                "share their group's K/V", "transformers gives every layer its own K/V (its legacy "
                "use_cla key is ignored); only models trained with cla_share_factor=1 can be exported")
    if not cfg.get("qk_layernorm"):
        _refuse("QK-norm off (model.qk_layernorm=false)",
                "hunyuan_v1_moe always applies RMSNorm to Q and K; export a model with qk_layernorm=true")
    if not cfg.get("qk_norm_after_rope"):
        _refuse("QK-norm before RoPE (model.qk_norm_after_rope=false, megatron's order)",
                "hunyuan_v1_moe normalises Q/K after RoPE; the orders differ once norm weights are "
                "learned, so only models trained with qk_norm_after_rope=true can be exported")
    if cfg.get("normalization", "LayerNorm") != "RMSNorm":
        _refuse(f"model.normalization={cfg.get('normalization', 'LayerNorm')!r}",
                "hunyuan_v1_moe uses RMSNorm everywhere")
    if not cfg.get("num_moe_experts"):
        _refuse("a dense model (model.num_moe_experts unset)", "every hunyuan_v1_moe layer is MoE")
    if cfg.get("moe_layer_freq", 1) != 1:
        _refuse(f"dense layers mixed with MoE (model.moe_layer_freq={cfg['moe_layer_freq']})",
                "every hunyuan_v1_moe layer is MoE; set moe_layer_freq=1")
    shared = cfg.get("moe_shared_expert_intermediate_size")
    if not shared:
        _refuse("no shared expert (model.moe_shared_expert_intermediate_size unset)",
                "every hunyuan_v1_moe layer has one shared MLP")
    if int(shared) != _expert_width(cfg):
        _refuse(f"shared-expert width {shared} != routed expert width {_expert_width(cfg)} "
                "(model.moe_shared_expert_intermediate_size vs moe_ffn_hidden_size)",
                "hunyuan_v1_moe uses intermediate_size for both (one shared expert of expert width)")
    if cfg.get("moe_shared_expert_gate"):
        _refuse("a gated shared expert (model.moe_shared_expert_gate=true)", "hunyuan_v1_moe adds it ungated")
    topk = int(cfg.get("moe_router_topk", 2))
    if topk == 1 or cfg.get("moe_router_pre_softmax"):
        _refuse(f"softmax-before-top-k routing weights (moe_router_topk={topk}; model_builder forces "
                "moe_router_pre_softmax for top-1): our experts' outputs are weighted by their "
                "softmax probability over all experts",
                "hunyuan_v1_moe renormalises the chosen experts' weights to sum to 1 (weight 1 for "
                "top-1); only top-k > 1 without moe_router_pre_softmax computes the same")
    if cfg.get("moe_router_score_function", "softmax") != "softmax":
        _refuse(f"router score function {cfg['moe_router_score_function']!r}",
                "hunyuan_v1_moe routes by softmax")
    if cfg.get("moe_router_enable_expert_bias"):
        _refuse("router expert bias (model.moe_router_enable_expert_bias)", "hunyuan_v1_moe has none")
    if cfg.get("moe_router_num_groups") or cfg.get("moe_router_group_topk"):
        _refuse("group-limited routing (model.moe_router_num_groups / moe_router_group_topk)",
                "hunyuan_v1_moe routes plain top-k")
    if cfg.get("moe_router_topk_scaling_factor") not in (None, 1, 1.0):
        _refuse(f"routing weight scale (model.moe_router_topk_scaling_factor="
                f"{cfg['moe_router_topk_scaling_factor']})", "hunyuan_v1_moe does not scale them")
    if cfg.get("add_qkv_bias"):
        _refuse("QKV biases (model.add_qkv_bias)", "hunyuan_v1_moe's attention_bias would also add an "
                "output-projection bias; export a model without biases")
    scale = cfg.get("softmax_scale")
    if scale is not None and scale != _head_dim(cfg) ** -0.5:
        _refuse(f"attention softmax_scale={scale}", "hunyuan_v1_moe scales by head_dim**-0.5")
    if cfg.get("rotary_percent", 1.0) != 1.0:
        _refuse(f"partial RoPE (model.rotary_percent={cfg['rotary_percent']})",
                "hunyuan_v1_moe rotates the whole head")
    if cfg.get("rotary_interleaved"):
        _refuse("interleaved RoPE (model.rotary_interleaved)", "hunyuan_v1_moe rotates halves")
    defaults = transformer_config_defaults()
    for key, value in cfg.items():
        if key in _HANDLED_KEYS or key in _FORWARD_NEUTRAL_KEYS:
            continue
        if key in defaults and value == defaults[key]:
            continue
        _refuse(f"model.{key}={value!r} is not a setting this exporter knows to be representable",
                "leave it at megatron-core's default, or teach megatron_ext/hf/hunyuan_v1_moe.py what "
                "it means for the exported model")


def hf_config(model_cfg: Mapping, vocab_size: int, special_tokens: Mapping[str, int]) -> dict:
    """``config.json`` content. ``vocab_size``: our embedding's row count (the padded vocab).

    ``special_tokens``: ids by name, ``bos`` / ``eos`` / ``pad`` / ``eod`` / ``sep`` (with or without a
    ``_token_id`` suffix); absent ones are written as null rather than transformers' defaults (0..4),
    which would name arbitrary tokens of our tokenizer. The exporter adds ``dtype``.
    """
    check_exportable(model_cfg)
    cfg = model_cfg
    ids = {name.removesuffix("_token_id"): int(v) for name, v in special_tokens.items()}
    unknown = set(ids) - {"bos", "eos", "pad", "eod", "sep"}
    if unknown:
        raise ExportRefused(f"special token(s) {sorted(unknown)}: hunyuan_v1_moe's config names only "
                            "bos, eos, pad, eod and sep")
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "vocab_size": int(vocab_size),
        "hidden_size": int(cfg["hidden_size"]),
        "intermediate_size": _expert_width(cfg),
        "num_hidden_layers": int(cfg["num_layers"]),
        "num_attention_heads": int(cfg["num_attention_heads"]),
        "num_key_value_heads": _query_groups(cfg),
        "head_dim": _head_dim(cfg),  # always written: transformers reads it with getattr, None breaks
        "hidden_act": "silu",
        "max_position_embeddings": int(cfg["seq_length"]),
        "initializer_range": float(cfg.get("init_method_std", 0.02)),
        "rms_norm_eps": float(cfg.get("layernorm_epsilon", 1e-5)),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.get("rotary_base", 10000))},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": float(cfg.get("attention_dropout") or 0.0),
        "num_experts": int(cfg["num_moe_experts"]),
        "moe_topk": int(cfg.get("moe_router_topk", 2)),
        **{f"{name}_token_id": ids.get(name) for name in ("bos", "eos", "pad", "eod", "sep")},
        "use_cache": True,
    }


def model_config(hf_cfg: Mapping) -> dict:
    """Our ``model/`` preset keys for a ``hunyuan_v1_moe`` config; refuses what we cannot build."""
    cfg = hf_cfg

    def uniform(key):
        value = cfg.get(key)
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ExportRefused(f"{MODEL_TYPE} {key}={value}: per-layer values differ; our "
                                    "hunyuan_moe builds the same MoE in every layer")
            value = value[0]
        return value

    if cfg.get("model_type") != MODEL_TYPE:
        raise ExportRefused(f"model_type={cfg.get('model_type')!r}: this adapter reads {MODEL_TYPE}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ExportRefused(f"{MODEL_TYPE} hidden_act={cfg['hidden_act']!r}: we build SwiGLU (silu) only")
    if cfg.get("attention_bias"):
        raise ExportRefused(f"{MODEL_TYPE} attention_bias=true: our hunyuan_moe has no linear biases")
    if cfg.get("tie_word_embeddings"):
        raise ExportRefused(f"{MODEL_TYPE} tie_word_embeddings=true: our hunyuan_moe has untied embeddings")
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ExportRefused(f"{MODEL_TYPE} rope {rope_type!r} ({rope}): we build plain RoPE only")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    topk = int(uniform("moe_topk"))
    if topk == 1:
        raise ExportRefused(f"{MODEL_TYPE} moe_topk=1 (the chosen expert's weight is 1): our top-1 "
                            "router weights it by its softmax probability (moe_router_pre_softmax)")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    width = int(cfg["intermediate_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    out = {
        "family": "hunyuan_moe",
        "num_layers": int(cfg["num_hidden_layers"]),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": int(cfg.get("num_key_value_heads") or heads),
        "ffn_hidden_size": width,
        "qk_layernorm": True,
        "qk_norm_after_rope": True,
        "cla_share_factor": 1,
        "num_moe_experts": int(uniform("num_experts")),
        "moe_router_topk": topk,
        "moe_ffn_hidden_size": width,
        "moe_shared_expert_intermediate_size": width,
        "moe_routing_mode": "dropless",
        "moe_expert_capacity_factor": None,
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(cfg.get("rms_norm_eps", 1e-5)),
        "init_method_std": float(cfg.get("initializer_range", 0.02)),
        "attention_dropout": float(cfg.get("attention_dropout") or 0.0),
        "hidden_dropout": 0.0,
        "seq_length": int(cfg["max_position_embeddings"]),
        "rotary_base": float(theta),
        "vocab_size": int(cfg["vocab_size"]),
    }
    if head_dim != hidden // heads:
        out["kv_channels"] = head_dim
    return out


# ------------------------------------------------------------------------------------------------
# Tensors
# ------------------------------------------------------------------------------------------------


def _ours_layer_keys(model_cfg: Mapping) -> list[str]:
    keys = ["input_layernorm.weight", "pre_mlp_layernorm.weight",
            "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
            "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight",
            "mlp.router.weight",
            "mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight"]
    for e in range(int(model_cfg["num_moe_experts"])):
        keys += [f"mlp.experts.local_experts.{e}.linear_fc1.weight",
                 f"mlp.experts.local_experts.{e}.linear_fc2.weight"]
    return keys


# our layer key -> HF key (after the layer prefix), for tensors that map one to one
_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.query_layernorm.weight",
    "self_attention.k_layernorm.weight": "self_attn.key_layernorm.weight",
    "mlp.router.weight": "mlp.gate.wg.weight",
    "mlp.shared_experts.linear_fc2.weight": "mlp.shared_mlp.down_proj.weight",
}
_EXPERT_FC2 = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc2\.weight")


def _prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def hf_layer_keys(layer: int, model_cfg: Mapping) -> list[str]:
    p = _prefix(layer)
    keys = [p + k for k in _RENAMES.values()]
    keys += [p + f"self_attn.{n}_proj.weight" for n in ("q", "k", "v")]
    keys += [p + f"mlp.shared_mlp.{n}_proj.weight" for n in ("gate", "up")]
    for e in range(int(model_cfg["num_moe_experts"])):
        keys += [p + f"mlp.experts.{e}.{n}_proj.weight" for n in ("gate", "up", "down")]
    return keys


def _check_keys(got, want, what: str) -> None:
    got, want = set(got), set(want)
    if got != want:
        raise ExportRefused(f"{what}: missing {sorted(want - got)[:5]}, unexpected "
                            f"{sorted(got - want)[:5]}: not the {MODEL_TYPE} layout this adapter maps "
                            "(check the model config passed with the tensors)")


def _qkv_split(cfg: Mapping):
    heads, groups, hd = int(cfg["num_attention_heads"]), _query_groups(cfg), _head_dim(cfg)
    return groups, heads // groups * hd, hd


def layer_to_hf(layer: int, params: Mapping[str, Tensor], model_cfg: Mapping) -> dict[str, Tensor]:
    """Our layer's ``state_dict`` entries (prefix ``decoder.layers.{layer}.`` stripped) -> HF tensors.

    ``_extra_state`` entries are skipped. megatron's ``linear_qkv`` rows are grouped per query group
    ``g``: [the group's Q heads, K_g, V_g]; SwiGLU ``linear_fc1`` rows are [gate; up].
    """
    params = {k: v for k, v in params.items() if not k.endswith("_extra_state")}
    _check_keys(params, _ours_layer_keys(model_cfg), f"layer {layer} parameters")
    p = _prefix(layer)
    out = {p + hf: params[ours] for ours, hf in _RENAMES.items()}
    groups, q_rows, hd = _qkv_split(model_cfg)
    qkv = params["self_attention.linear_qkv.weight"]
    q, k, v = qkv.view(groups, q_rows + 2 * hd, -1).split([q_rows, hd, hd], dim=1)
    hidden = qkv.shape[-1]
    out[p + "self_attn.q_proj.weight"] = q.reshape(groups * q_rows, hidden)
    out[p + "self_attn.k_proj.weight"] = k.reshape(groups * hd, hidden)
    out[p + "self_attn.v_proj.weight"] = v.reshape(groups * hd, hidden)
    gate, up = params["mlp.shared_experts.linear_fc1.weight"].chunk(2, dim=0)
    out[p + "mlp.shared_mlp.gate_proj.weight"], out[p + "mlp.shared_mlp.up_proj.weight"] = gate, up
    for e in range(int(model_cfg["num_moe_experts"])):
        ours = f"mlp.experts.local_experts.{e}."
        gate, up = params[ours + "linear_fc1.weight"].chunk(2, dim=0)
        out[p + f"mlp.experts.{e}.gate_proj.weight"] = gate
        out[p + f"mlp.experts.{e}.up_proj.weight"] = up
        out[p + f"mlp.experts.{e}.down_proj.weight"] = params[ours + "linear_fc2.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def layer_from_hf(layer: int, tensors: Mapping[str, Tensor], model_cfg: Mapping) -> dict[str, Tensor]:
    """The exact inverse of :func:`layer_to_hf` (keys without the ``decoder.layers.{layer}.`` prefix)."""
    p = _prefix(layer)
    tensors = {k: v for k, v in tensors.items() if k.startswith(p)}
    _check_keys(tensors, hf_layer_keys(layer, model_cfg), f"{MODEL_TYPE} layer {layer} tensors")
    out = {ours: tensors[p + hf] for ours, hf in _RENAMES.items()}
    groups, q_rows, hd = _qkv_split(model_cfg)
    q, k, v = (tensors[p + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v"))
    hidden = q.shape[-1]
    out["self_attention.linear_qkv.weight"] = torch.cat(
        [q.reshape(groups, q_rows, hidden), k.reshape(groups, hd, hidden), v.reshape(groups, hd, hidden)],
        dim=1).reshape(groups * (q_rows + 2 * hd), hidden)
    out["mlp.shared_experts.linear_fc1.weight"] = torch.cat(
        [tensors[p + "mlp.shared_mlp.gate_proj.weight"], tensors[p + "mlp.shared_mlp.up_proj.weight"]])
    for e in range(int(model_cfg["num_moe_experts"])):
        hf = p + f"mlp.experts.{e}."
        ours = f"mlp.experts.local_experts.{e}."
        out[ours + "linear_fc1.weight"] = torch.cat([tensors[hf + "gate_proj.weight"],
                                                     tensors[hf + "up_proj.weight"]])
        out[ours + "linear_fc2.weight"] = tensors[hf + "down_proj.weight"]
    return {k: v.contiguous() for k, v in out.items()}


_OUTER = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def hf_outer_keys(model_cfg: Mapping) -> list[str]:
    return list(_OUTER.values())


def outer_to_hf(params: Mapping[str, Tensor], model_cfg: Mapping) -> dict[str, Tensor]:
    """Embedding, final norm and output layer (untied), padded vocab rows kept (module docstring)."""
    params = {k: v for k, v in params.items() if not k.endswith("_extra_state")}
    _check_keys(params, _OUTER, "outer parameters")
    return {hf: params[ours].contiguous() for ours, hf in _OUTER.items()}


def outer_from_hf(tensors: Mapping[str, Tensor], model_cfg: Mapping) -> dict[str, Tensor]:
    """Inverse of :func:`outer_to_hf`; vocab rows as in the HF checkpoint (the caller pads if needed)."""
    tensors = {k: v for k, v in tensors.items() if k in _OUTER.values()}
    _check_keys(tensors, _OUTER.values(), f"{MODEL_TYPE} outer tensors")
    return {ours: tensors[hf].contiguous() for ours, hf in _OUTER.items()}
