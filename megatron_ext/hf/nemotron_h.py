"""State-dict adapter: our ``turbos_hybrid`` model <-> transformers' ``nemotron_h`` (checkpoint key names).

Works on one process's (TP1 / PP1 / EP1) parameter names, one layer at a time; the caller streams layers
and does the I/O. Our hybrid pattern has one symbol per layer and ``nemotron_h``'s ``layers_block_type``
one entry per layer, so our layer ``i`` is HF layer ``i``.

What ``nemotron_h`` (transformers 5.24) computes, against our model (megatron-core 0.16.1 ``MambaModel``
with :mod:`megatron_ext.models.hybrid_specs`), layer kind by layer kind:

- Every block: pre-RMSNorm (``layer_norm_epsilon``), mixer, residual; final ``norm_f``; untied embedding
  and ``lm_head``. Same as ours (``share_embeddings_and_output_weights=False``).
- Mamba2 (``M``): ``in_proj`` splits as [z, x, B, C, dt] (ours at TP1, identical), causal depthwise
  conv1d + SiLU over xBC with bias, ``dt = softplus(dt + dt_bias)``, ``A = -exp(A_log)``, one ``D`` per
  head, gated RMSNorm ``norm(y * silu(z))`` over ``n_groups`` groups, ``out_proj``; every tensor maps
  unchanged. Two differences are fixed by the config we write: its prefill clamps dt to
  ``>= time_step_min`` (we never clamp: we export ``time_step_min=0``), and its gated norm uses
  ``layer_norm_epsilon`` where megatron-core hard-codes 1e-5 (we refuse another epsilon).
- Attention (``*``): GQA with ``head_dim``, scale ``head_dim**-0.5``, **no position embedding and no
  QK-norm**. Ours always builds RoPE (``turbos_hybrid.build``); it maps only when megatron-core skips RoPE
  in every attention layer (``model.no_rope_freq=1``) and ``model.qk_layernorm=false``. Our fused
  ``linear_qkv`` (per query group: its query heads, then one key and one value head) splits into
  ``q_proj`` / ``k_proj`` / ``v_proj``.
- MoE (``E``) and dense MLP (``-``): ``nemotron_h`` experts, shared experts and MLPs are *non-gated*
  (``down(act(up(x)))``, ``mlp_hidden_act``, relu2 by default) behind a sigmoid router with
  expert-score bias and group routing. Our builder always builds SwiGLU FFNs (``gated_linear_unit=True``,
  SiLU; ``model.activation`` only takes ``swiglu``): no ``nemotron_h`` activation computes a gated unit,
  so **every FFN layer is refused** (the shipped presets ``tiny_turbos`` / ``hunyuan_turbos`` are
  therefore not exportable; nor are their QK-norm and RoPE).

Vocabulary: the exported ``vocab_size`` is the number of rows of our (padded) embedding, i.e.
``model_builder.padded_vocab_size(vocab, tp)`` of the training run; the extra rows are exported as they
are and a client should never sample them (e.g. ``generate(suppress_tokens=...)``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import torch
from torch import Tensor

from megatron_ext.errors import ConfigError, ExportRefused
from megatron_ext.hf import transformer_config_defaults
from megatron_ext.models.turbos_layout import compile_layout

MODEL_TYPE = "nemotron_h"
ARCHITECTURE = "NemotronHForCausalLM"

# megatron-core constants our model cannot change from the config (MambaMixer's constructor defaults).
MAMBA_CONV_KERNEL = 4
MAMBA_GATED_NORM_EPS = 1e-5
VOCAB_PAD_MULTIPLE = 128  # model_builder.VOCAB_PAD_MULTIPLE (TP1)

# Keys of our model config this adapter reads and maps (or checks); any other key must keep its
# megatron-core default, or export is refused: a knob nobody reviewed here may change the maths.
_MAPPED_KEYS = {
    "family", "hybrid_blocks", "hybrid_block_types", "num_layers", "hidden_size", "num_attention_heads",
    "num_query_groups", "kv_channels", "qk_layernorm", "normalization", "layernorm_epsilon",
    "mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim", "mamba_chunk_size",
    "no_rope_freq", "softmax_scale", "vocab_size", "seq_length", "init_method_std", "attention_dropout",
    "hidden_dropout", "activation",
}
# Keys that change neither the weights' meaning nor the forward maths of the layers we export.
_NEUTRAL_KEYS = {
    "rotary_base",  # RoPE is off in every attention layer (checked)
    "ffn_hidden_size", "num_moe_experts", "moe_routing_mode",  # no FFN layer in the pattern (checked)
    "use_mamba_mem_eff_path",  # both Mamba paths compute the same
    "output_layer_init_method", "init_method", "perform_initialization", "use_cpu_initialization",
    "apply_query_key_layer_scaling", "attention_softmax_in_fp32", "fp32_residual_connection",
    "bf16", "fp16", "params_dtype", "recompute_granularity", "recompute_method", "recompute_num_layers",
    "calculate_per_token_loss",
}
_NEUTRAL_PREFIXES = ("moe_",)  # only used by MoE layers, which are refused


def _get(model_cfg: Mapping, key: str):
    value = model_cfg.get(key)
    return transformer_config_defaults().get(key) if value is None else value


@dataclasses.dataclass(frozen=True)
class _Dims:
    pattern: str
    hidden: int
    heads: int
    groups: int
    head_dim: int
    mamba_heads: int
    mamba_head_dim: int
    mamba_groups: int
    mamba_state: int

    @property
    def d_inner(self) -> int:
        return self.mamba_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.mamba_groups * self.mamba_state


def _refuse(feature: str, fix: str) -> None:
    raise ExportRefused(f"nemotron_h export: {feature}; {fix}")


def _dims(model_cfg: Mapping) -> _Dims:
    """Check that ``model_cfg`` maps exactly onto ``nemotron_h``; return the sizes the mapping needs."""
    family = model_cfg.get("family", "hunyuan_moe")
    if family != "turbos_hybrid":
        _refuse(f"model.family={family!r} is not the hybrid Mamba2 model", "export turbos_hybrid models only")
    pattern = compile_layout(model_cfg["hybrid_blocks"], model_cfg["hybrid_block_types"],
                             moe=bool(model_cfg.get("num_moe_experts")))
    if len(pattern) != int(model_cfg["num_layers"]):
        raise ConfigError(f"model.num_layers={model_cfg['num_layers']} but model.hybrid_blocks compiles to "
                          f"{len(pattern)} layers ({pattern}); make them agree")
    ffn = sorted({i for i, c in enumerate(pattern) if c in "E-"})
    if ffn:
        _refuse(f"FFN layers (MoE 'E' / dense '-') at layers {ffn}: ours are SwiGLU (gated, as model_builder "
                "always builds them) while nemotron_h's experts, shared experts and MLPs are non-gated "
                "down(act(up(x))) with a sigmoid router",
                "only Mamba2 + attention layouts export (no 'F' in model.hybrid_block_types)")
    for key, value in model_cfg.items():
        if key in _MAPPED_KEYS or key in _NEUTRAL_KEYS or key.startswith(_NEUTRAL_PREFIXES) or value is None:
            continue
        default = transformer_config_defaults().get(key, dataclasses.MISSING)
        if default is dataclasses.MISSING or value != default:
            _refuse(f"model.{key}={value!r} is not handled by the nemotron_h mapping",
                    f"remove it (default {default!r}) or extend megatron_ext/hf/nemotron_h.py")
    if _get(model_cfg, "normalization") != "RMSNorm":
        _refuse(f"model.normalization={_get(model_cfg, 'normalization')!r}: nemotron_h uses RMSNorm",
                "set model.normalization=RMSNorm")
    activation = model_cfg.get("activation", "swiglu")
    if activation != "swiglu":
        raise ConfigError(f"model.activation={activation!r}: only 'swiglu' is supported")
    eps = float(_get(model_cfg, "layernorm_epsilon"))
    if "M" in pattern and eps != MAMBA_GATED_NORM_EPS:
        _refuse(f"model.layernorm_epsilon={eps}: nemotron_h's Mamba gated norm uses layer_norm_epsilon, "
                f"megatron-core's is fixed at {MAMBA_GATED_NORM_EPS}", f"set model.layernorm_epsilon={MAMBA_GATED_NORM_EPS}")
    hidden = int(model_cfg["hidden_size"])
    heads = int(model_cfg["num_attention_heads"])
    groups = int(_get(model_cfg, "num_query_groups") or heads)
    head_dim = int(_get(model_cfg, "kv_channels") or hidden // heads)
    if "*" in pattern:
        if _get(model_cfg, "qk_layernorm"):
            _refuse("model.qk_layernorm=true: nemotron_h attention has no QK-norm", "set model.qk_layernorm=false")
        no_rope = model_cfg.get("no_rope_freq")
        attention = [i for i, c in enumerate(pattern) if c == "*"]
        if no_rope is None or isinstance(no_rope, bool):
            roped = attention
        elif isinstance(no_rope, int):
            roped = [i for i in attention if (i + 1) % no_rope != 0]
        else:
            roped = [i for i in attention if i >= len(no_rope) or not no_rope[i]]
        if roped:
            _refuse(f"RoPE in attention layers {roped} (turbos_hybrid always builds rotary embeddings): "
                    "nemotron_h attention has no position embedding",
                    "train with model.no_rope_freq=1 (megatron-core then skips RoPE in every layer)")
        scale = model_cfg.get("softmax_scale")
        if scale is not None and float(scale) != head_dim ** -0.5:
            _refuse(f"model.softmax_scale={scale}: nemotron_h scales by head_dim**-0.5", "remove softmax_scale")
    mamba_head_dim = int(_get(model_cfg, "mamba_head_dim"))
    mamba_heads = int(_get(model_cfg, "mamba_num_heads") or (2 * hidden) // mamba_head_dim)  # expand=2
    return _Dims(pattern=pattern, hidden=hidden, heads=heads, groups=groups, head_dim=head_dim,
                 mamba_heads=mamba_heads, mamba_head_dim=mamba_head_dim,
                 mamba_groups=int(_get(model_cfg, "mamba_num_groups")),
                 mamba_state=int(_get(model_cfg, "mamba_state_dim")))


def check_exportable(model_cfg: Mapping) -> None:
    """Raise :class:`ExportRefused` naming the first feature ``nemotron_h`` cannot compute as we do."""
    _dims(model_cfg)


_SPECIAL = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "pad_token_id"}


def hf_config(model_cfg: Mapping, vocab_size: int, special_tokens: Mapping[str, int]) -> dict:
    """``config.json`` for the export.

    ``vocab_size``: the rows of our embedding (the padded vocabulary of the checkpoint).
    ``special_tokens``: ids keyed ``bos`` / ``eos`` / ``pad`` (or ``bos_token_id`` ...); the ones not
    given are written as null so nemotron_h's defaults (0, 1, 2) do not leak in.
    """
    d = _dims(model_cfg)
    tokens = {v: None for v in _SPECIAL.values()}
    for key, value in special_tokens.items():
        name = _SPECIAL.get(key, key)
        if name not in tokens:
            raise ConfigError(f"special_tokens: unknown key {key!r}; use {sorted(_SPECIAL)}")
        tokens[name] = None if value is None else int(value)
    kinds = {"M": "linear_attention", "*": "full_attention"}
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": int(vocab_size),
        "hidden_size": d.hidden,
        "layers_block_type": [kinds[c] for c in d.pattern],
        "tie_word_embeddings": False,
        "layer_norm_epsilon": float(_get(model_cfg, "layernorm_epsilon")),
        "max_position_embeddings": int(model_cfg.get("seq_length") or 4096),
        "initializer_range": float(_get(model_cfg, "init_method_std")),
        "hidden_dropout": float(_get(model_cfg, "hidden_dropout")),
        # attention
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.groups,
        "head_dim": d.head_dim,
        "attention_bias": False,
        "attention_dropout": float(_get(model_cfg, "attention_dropout")),
        "sliding_window": None,
        # Mamba2
        "mamba_num_heads": d.mamba_heads,
        "mamba_head_dim": d.mamba_head_dim,
        "n_groups": d.mamba_groups,
        "ssm_state_size": d.mamba_state,
        "conv_kernel": MAMBA_CONV_KERNEL,
        "use_conv_bias": True,
        "use_bias": False,
        "mamba_proj_bias": False,
        "mamba_hidden_act": "silu",
        "chunk_size": int(model_cfg.get("mamba_chunk_size") or 128),
        # nemotron_h clamps dt to >= time_step_min in prefill; megatron-core never clamps
        "time_step_min": 0.0,
        "residual_in_fp32": False,
        "num_nextn_predict_layers": 0,
        "use_cache": True,
        **tokens,
    }


def model_config(hf_cfg: Mapping) -> dict:
    """Our ``model/`` preset keys for a ``nemotron_h`` config; refuses what our builder cannot build."""
    def refuse(feature: str, fix: str = "only Mamba2 + attention nemotron_h models import") -> None:
        raise ExportRefused(f"nemotron_h import: {feature}; {fix}")

    if hf_cfg.get("model_type") != MODEL_TYPE:
        refuse(f"model_type={hf_cfg.get('model_type')!r}", f"give a {MODEL_TYPE} config")
    kinds = hf_cfg.get("layers_block_type")
    if kinds is None and hf_cfg.get("hybrid_override_pattern"):
        legacy = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
        kinds = [legacy[c] for c in hf_cfg["hybrid_override_pattern"]]
    if not kinds:
        refuse("no layers_block_type", "give the per-layer pattern")
    ffn = [i for i, k in enumerate(kinds) if k in ("moe", "mlp")]
    if ffn:
        refuse(f"FFN layers (moe / mlp) at {ffn}: non-gated experts and MLPs, our builder builds SwiGLU only")
    bad = sorted(set(kinds) - {"linear_attention", "full_attention"})
    if bad:
        refuse(f"layer types {bad}")

    def need(key: str, wanted, default, fix: str) -> None:
        value = hf_cfg.get(key, default)
        if value != wanted:
            refuse(f"{key}={value!r} (we compute as {key}={wanted!r})", fix)

    need("tie_word_embeddings", False, False, "our hybrid has untied embeddings")
    need("use_bias", False, False, "our Mamba projections have no bias")
    need("attention_bias", False, False, "our attention has no bias")
    need("use_conv_bias", True, True, "our Mamba conv1d has a bias")
    need("conv_kernel", MAMBA_CONV_KERNEL, 4, "megatron-core's Mamba conv width is fixed")
    need("mamba_hidden_act", "silu", "silu", "megatron-core's Mamba uses SiLU")
    need("sliding_window", None, None, "our attention is global")
    if float(hf_cfg.get("time_step_min", 0.001)) != 0.0:
        refuse(f"time_step_min={hf_cfg.get('time_step_min', 0.001)}: nemotron_h clamps dt to >= it in prefill, "
               "megatron-core never clamps", "only time_step_min=0 computes as our Mamba2")
    eps = float(hf_cfg.get("layer_norm_epsilon", 1e-5))
    if "linear_attention" in kinds and eps != MAMBA_GATED_NORM_EPS:
        refuse(f"layer_norm_epsilon={eps}: megatron-core's Mamba gated norm uses {MAMBA_GATED_NORM_EPS}")
    vocab = int(hf_cfg["vocab_size"])
    if vocab % VOCAB_PAD_MULTIPLE:
        refuse(f"vocab_size={vocab} is not a multiple of {VOCAB_PAD_MULTIPLE}: our builder would pad the "
               "embedding", "pad the embedding and lm_head rows first")
    hidden = int(hf_cfg["hidden_size"])
    heads = int(hf_cfg.get("num_attention_heads", 32))
    head_dim = int(hf_cfg.get("head_dim") or hidden // heads)
    pattern = "".join("M" if k == "linear_attention" else "A" for k in kinds)
    # Run-length blocks of one layer each, e.g. "A M*2 A M*2".
    blocks = " ".join(m[0] if len(m) == 1 else f"{m[0]}*{len(m)}" for m in
                      (g.group(0) for g in re.finditer(r"A+|M+", pattern)))
    out = {
        "family": "turbos_hybrid",
        "hybrid_blocks": blocks,
        "hybrid_block_types": {"A": "A", "M": "M"},
        "num_layers": len(kinds),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": int(hf_cfg.get("num_key_value_heads") or heads),
        "qk_layernorm": False,
        "no_rope_freq": 1,
        "normalization": "RMSNorm",
        "layernorm_epsilon": eps,
        "mamba_num_heads": int(hf_cfg.get("mamba_num_heads", 128)),
        "mamba_head_dim": int(hf_cfg.get("mamba_head_dim", 64)),
        "mamba_num_groups": int(hf_cfg.get("n_groups", 8)),
        "mamba_state_dim": int(hf_cfg.get("ssm_state_size", 128)),
        "mamba_chunk_size": int(hf_cfg.get("chunk_size", 128)),
        "num_moe_experts": None,
        "init_method_std": float(hf_cfg.get("initializer_range", 0.02)),
        "hidden_dropout": float(hf_cfg.get("hidden_dropout", 0.0)),
        "attention_dropout": float(hf_cfg.get("attention_dropout", 0.0)),
        "seq_length": int(hf_cfg.get("max_position_embeddings", 4096)),
        "vocab_size": vocab,
    }
    if head_dim != hidden // heads:
        out["kv_channels"] = head_dim
    return out


# ---------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------

_MAMBA = ("A_log", "D", "dt_bias", "in_proj.weight", "conv1d.weight", "conv1d.bias", "norm.weight",
          "out_proj.weight")


def _hf_prefix(layer: int) -> str:
    return f"backbone.layers.{layer}."


def _ours_shapes(d: _Dims, kind: str) -> dict[str, tuple[int, ...]]:
    if kind == "M":
        h = d.mamba_heads
        return {"norm.weight": (d.hidden,), "mixer.A_log": (h,), "mixer.D": (h,), "mixer.dt_bias": (h,),
                "mixer.in_proj.weight": (d.d_inner + d.conv_dim + h, d.hidden),
                "mixer.conv1d.weight": (d.conv_dim, 1, MAMBA_CONV_KERNEL), "mixer.conv1d.bias": (d.conv_dim,),
                "mixer.norm.weight": (d.d_inner,), "mixer.out_proj.weight": (d.hidden, d.d_inner)}
    return {"input_layernorm.weight": (d.hidden,),
            "self_attention.linear_qkv.weight": ((d.heads + 2 * d.groups) * d.head_dim, d.hidden),
            "self_attention.linear_proj.weight": (d.hidden, d.heads * d.head_dim)}


def _check(got: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    if set(got) != set(shapes):
        raise ConfigError(f"{what}: keys {sorted(got)} do not match the config's {sorted(shapes)}; "
                          "is this checkpoint's model config the right one?")
    for key, shape in shapes.items():
        if tuple(got[key].shape) != shape:
            raise ConfigError(f"{what}: {key} has shape {tuple(got[key].shape)}, the config says {shape}")


def _layer_kind(d: _Dims, layer: int) -> str:
    if not 0 <= layer < len(d.pattern):
        raise ConfigError(f"layer {layer} is outside the model's {len(d.pattern)} layers")
    return d.pattern[layer]


def hf_layer_keys(layer: int, model_cfg: Mapping) -> list[str]:
    d = _dims(model_cfg)
    p = _hf_prefix(layer)
    if _layer_kind(d, layer) == "M":
        return [p + "norm.weight"] + [p + "mixer." + k for k in _MAMBA]
    return [p + "norm.weight"] + [p + f"mixer.{n}_proj.weight" for n in "qkvo"]


def layer_to_hf(layer: int, params: Mapping[str, Tensor], model_cfg: Mapping) -> dict[str, Tensor]:
    """Our layer ``layer`` (keys without ``decoder.layers.{layer}.``) -> HF checkpoint keys and tensors."""
    d = _dims(model_cfg)
    kind = _layer_kind(d, layer)
    _check(params, _ours_shapes(d, kind), f"decoder.layers.{layer}")
    p = _hf_prefix(layer)
    if kind == "M":
        return {p + "norm.weight": params["norm.weight"],
                **{p + "mixer." + k: params["mixer." + k] for k in _MAMBA}}
    per_group = d.heads // d.groups
    qkv = params["self_attention.linear_qkv.weight"].view(d.groups, per_group + 2, d.head_dim, d.hidden)
    return {
        p + "norm.weight": params["input_layernorm.weight"],
        p + "mixer.q_proj.weight": qkv[:, :per_group].reshape(d.heads * d.head_dim, d.hidden).clone(),
        p + "mixer.k_proj.weight": qkv[:, per_group].reshape(d.groups * d.head_dim, d.hidden).clone(),
        p + "mixer.v_proj.weight": qkv[:, per_group + 1].reshape(d.groups * d.head_dim, d.hidden).clone(),
        p + "mixer.o_proj.weight": params["self_attention.linear_proj.weight"],
    }


def layer_from_hf(layer: int, tensors: Mapping[str, Tensor], model_cfg: Mapping) -> dict[str, Tensor]:
    """HF layer ``layer`` (full checkpoint keys, as :func:`hf_layer_keys`) -> our keys without
    ``decoder.layers.{layer}.``; the exact inverse of :func:`layer_to_hf`."""
    d = _dims(model_cfg)
    kind = _layer_kind(d, layer)
    keys = hf_layer_keys(layer, model_cfg)
    if set(tensors) != set(keys):
        raise ConfigError(f"nemotron_h layer {layer}: keys {sorted(tensors)} do not match the config's {keys}")
    p = _hf_prefix(layer)
    if kind == "M":
        out = {"norm.weight": tensors[p + "norm.weight"],
               **{"mixer." + k: tensors[p + "mixer." + k] for k in _MAMBA}}
    else:
        per_group = d.heads // d.groups
        q = tensors[p + "mixer.q_proj.weight"].reshape(d.groups, per_group, d.head_dim, d.hidden)
        k = tensors[p + "mixer.k_proj.weight"].reshape(d.groups, 1, d.head_dim, d.hidden)
        v = tensors[p + "mixer.v_proj.weight"].reshape(d.groups, 1, d.head_dim, d.hidden)
        out = {"input_layernorm.weight": tensors[p + "norm.weight"],
               "self_attention.linear_qkv.weight": torch.cat([q, k, v], dim=1).reshape(-1, d.hidden),
               "self_attention.linear_proj.weight": tensors[p + "mixer.o_proj.weight"]}
    _check(out, _ours_shapes(d, kind), f"nemotron_h layer {layer}")
    return out


_OUTER = {"embedding.word_embeddings.weight": "backbone.embeddings.weight",
          "decoder.final_norm.weight": "backbone.norm_f.weight",
          "output_layer.weight": "lm_head.weight"}


def hf_outer_keys(model_cfg: Mapping) -> list[str]:
    _dims(model_cfg)
    return list(_OUTER.values())


def _outer_check(got: Mapping[str, Tensor], names, d: _Dims, what: str) -> None:
    emb, norm, out = names
    if set(got) != set(names):
        raise ConfigError(f"{what}: keys {sorted(got)}, expected {sorted(names)}")
    if got[norm].shape != (d.hidden,) or got[emb].dim() != 2 or got[emb].shape[1] != d.hidden \
            or got[out].shape != got[emb].shape:
        raise ConfigError(f"{what}: shapes {[tuple(got[n].shape) for n in names]} do not fit hidden_size {d.hidden}")


def outer_to_hf(params: Mapping[str, Tensor], model_cfg: Mapping) -> dict[str, Tensor]:
    """Embedding, final norm and output layer (our full names) -> HF keys; rows stay padded."""
    d = _dims(model_cfg)
    _outer_check(params, tuple(_OUTER), d, "outer params")
    return {_OUTER[k]: v for k, v in params.items()}


def outer_from_hf(tensors: Mapping[str, Tensor], model_cfg: Mapping) -> dict[str, Tensor]:
    d = _dims(model_cfg)
    _outer_check(tensors, tuple(_OUTER.values()), d, "nemotron_h outer tensors")
    back = {v: k for k, v in _OUTER.items()}
    return {back[k]: v for k, v in tensors.items()}
