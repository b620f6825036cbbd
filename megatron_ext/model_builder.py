"""Resolved Hydra ``model`` + ``parallel`` config -> megatron-core ``TransformerConfig`` and model.

The ``model/`` presets use ``TransformerConfig`` field names directly, plus a few model-level keys
(:data:`MODEL_LEVEL_KEYS`), so there is one name for each setting from YAML to megatron-core.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

from megatron_ext import cpu_backend
from megatron_ext.errors import ConfigError
from megatron_ext.models import grad_accumulation_fusion, hunyuan_moe, moe_dispatch, tp_comm_overlap, turbos_hybrid

FAMILIES = {"hunyuan_moe": hunyuan_moe, "turbos_hybrid": turbos_hybrid}

# Keys of a model preset that are not TransformerConfig fields.
MODEL_LEVEL_KEYS = {"family", "seq_length", "rotary_base", "vocab_size", "activation",
                    *hunyuan_moe.MODEL_KEYS, *turbos_hybrid.MODEL_KEYS}

VOCAB_PAD_MULTIPLE = 128  # as Megatron-LM's make_vocab_size_divisible_by, times TP below


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    multiple = VOCAB_PAD_MULTIPLE * tp
    return -(-vocab_size // multiple) * multiple


def model_vocab_size(model_cfg, tokenizer) -> int:
    """The preset's vocab_size (room for tokens a later stage adds) or else the tokenizer's."""
    wanted = model_cfg.get("vocab_size") or tokenizer.vocab_size
    if tokenizer.vocab_size > wanted:
        raise ConfigError(
            f"model.vocab_size={wanted} is smaller than the tokenizer's {tokenizer.vocab_size} tokens; "
            f"raise model.vocab_size or use a smaller tokenizer (data.tokenizer)"
        )
    return wanted


class ModelConfigError(ConfigError):
    """A model preset names a field megatron-core does not know, or an unsupported value."""


def transformer_config(model_cfg: Mapping[str, Any], parallel_cfg: Mapping[str, Any]) -> TransformerConfig:
    """Build the TransformerConfig for this machine (CPU-safe flags when the CPU backend is active)."""
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    fields = {k: v for k, v in model_cfg.items() if k not in MODEL_LEVEL_KEYS}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ModelConfigError(
            f"model.{unknown[0]}: not a megatron-core TransformerConfig field; fix the name or remove it "
            f"(model-level keys are {sorted(MODEL_LEVEL_KEYS)})"
        )
    activation = model_cfg.get("activation", "swiglu")
    if activation != "swiglu":
        raise ModelConfigError(f"model.activation={activation!r}: only 'swiglu' is supported")
    tp = int(parallel_cfg["tensor_model_parallel_size"])
    pp = int(parallel_cfg["pipeline_model_parallel_size"])
    cpu = cpu_backend.is_enabled()
    sequence_parallel = bool(parallel_cfg.get("sequence_parallel") or False) and tp > 1
    fields.update(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=parallel_cfg.get("virtual_pipeline_model_parallel_size"),
        pipeline_dtype=(torch.float32 if cpu else torch.bfloat16) if pp > 1 else None,
        expert_model_parallel_size=int(parallel_cfg["expert_model_parallel_size"]),
        context_parallel_size=int(parallel_cfg.get("context_parallel_size") or 1),
        sequence_parallel=sequence_parallel,
        # sequence-parallel all-gathers / reduce-scatters behind the GEMMs (GPU runs unless set)
        tp_comm_overlap=tp_comm_overlap.wanted(parallel_cfg.get("tp_comm_overlap"), sequence_parallel),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        params_dtype=torch.float32 if cpu else torch.bfloat16,
        bf16=not cpu,
        use_cpu_initialization=True,
        # wgrad GEMMs accumulate into the fp32 main_grad on GPUs (apex's kernel, or torch's stand-in)
        gradient_accumulation_fusion=grad_accumulation_fusion.use_gradient_accumulation_fusion(),
        bias_dropout_fusion=False,
        # SwiGLU as one compiled kernel forward and backward on GPUs (Megatron-LM's --swiglu default;
        # benchmarks/swiglu_fusion.py); the CPU path keeps the unfused ops (no compiler needed)
        bias_activation_fusion=not cpu,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )
    if fields.get("num_moe_experts"):
        fields.setdefault("moe_token_dispatcher_type", "allgather")
        fields.setdefault("moe_router_load_balancing_type", "aux_loss")
        # Router logits and softmax in fp32 under bf16 activations, as Hunyuan's gate and transformers'
        # HunYuanMoEV1Gate compute them: in bf16, near-tied experts flip with rounding.
        fields.setdefault("moe_router_dtype", "fp32")
        fields["moe_grouped_gemm"] = False
        if int(fields.get("moe_router_topk", 2)) == 1:
            # megatron-core: top-1 routing only gives a gradient to the router with pre-softmax.
            fields["moe_router_pre_softmax"] = True
    return TransformerConfig(**fields)


def build_model(model_cfg: Mapping[str, Any], config: TransformerConfig, vocab_size: int) -> list[torch.nn.Module]:
    """This rank's model chunks: one per virtual pipeline stage (a single chunk without VPP).

    Not yet wrapped in DDP. With virtual pipeline stages, chunk ``i`` holds the ``i``-th slice of
    this rank's layers; only the first chunk of the first stage embeds and only the last chunk of
    the last stage has the output layer.
    """
    family = model_cfg.get("family", "hunyuan_moe")
    if family not in FAMILIES:
        raise ModelConfigError(f"model.family={family!r}: choose one of {sorted(FAMILIES)}")
    vpp = config.virtual_pipeline_model_parallel_size
    stages = range(vpp) if vpp else [None]
    chunks = [
        FAMILIES[family].build(
            config,
            model_cfg,
            vocab_size=vocab_size,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
        )
        for vp_stage in stages
    ]
    moe_dispatch.install(chunks)   # grouped-GEMM MoE layers permute tokens without host syncs
    on_meta = any(p.is_meta for chunk in chunks for p in chunk.parameters())  # count_params
    if not cpu_backend.is_enabled() and torch.cuda.is_available() and not on_meta:
        # use_cpu_initialization builds the weights on the host (identical on every layout); on GPUs
        # they then move to this rank's device, as Megatron-LM's get_model does.
        chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in chunks]
    return chunks
