"""megatron-core optimizer (DDP + distributed optimizer) and LR schedule from a stage's ``train`` config.

Schedules are megatron-core's ``OptimizerParamScheduler``: linear warm-up then ``cosine`` (or
``linear`` / ``constant``) decay to ``min_lr``, or ``WSD`` (warm-up, stable, decay over
``wsd_decay_steps`` at the end).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig

from megatron_ext import expert_lr


def wrap_ddp(chunks: list, config: TransformerConfig, use_distributed_optimizer: bool) -> list[DistributedDataParallel]:
    """megatron-core DDP around each model chunk (as Megatron-LM: only the first chunk is bucketed)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def connect_schedule_hooks(config: TransformerConfig, ddp_chunks: list, optimizer) -> None:
    """Give megatron-core's forward/backward schedules the hooks Megatron-LM's trainer installs.

    Without ``finalize_model_grads_func`` the schedules never finish DDP's gradient reduction, nor
    the tensor-parallel all-reduce of sequence-parallel / QK-norm weight gradients: every rank would
    step on its local gradients. ``no_sync_func`` defers the reduction to the last micro-batch.
    """
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [chunk.no_sync for chunk in ddp_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync


def use_fused_adam(optimizer) -> int:
    """Run megatron-core's torch-Adam fallback (no apex / Transformer Engine) on torch's fused CUDA
    kernel: one launch per group instead of a foreach chain (issue 10: the unfused step took ~180 ms
    for 5B parameters). Same update (``benchmarks/optimizer_step.py`` checks it on a GPU); CPU runs
    keep the default. Returns how many param groups switched."""
    import torch

    switched = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue   # apex / TE FusedAdam, or no optimizer on this rank
        for group in inner.param_groups:
            if group["params"] and all(p.is_cuda and p.dtype.is_floating_point for p in group["params"]):
                group["fused"], group["foreach"] = True, False
                switched += 1
    return switched


def step_if_finite(optimizer) -> tuple[bool, float | None]:
    """megatron-core's optimizer step, skipped when the gradients are not finite; (updated, grad norm).

    The steps of ``MegatronOptimizer.step`` / ``ChainedOptimizer.step`` (prepare the main gradients,
    their global norm, clip by it, update) with the norm checked between computing and using it. One
    NaN / Inf anywhere makes the global norm non-finite, so the reduction the step does anyway is the
    check (Megatron-LM's NaN check reads gradient norms too); scanning the gradient buffers with
    ``isfinite`` instead allocated a gradient-sized temporary (4.7 GiB on the MoE benchmark shape).
    Every rank gets the same norm (it is reduced over the model- and data-parallel groups that hold
    distinct gradients), so every rank skips or steps together.
    """
    if optimizer.prepare_grads():  # an fp16 loss scaler found inf / NaN: megatron-core skips too
        return False, None
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "is_stub_optimizer", False) or opt.config.clip_grad <= 0.0:
            continue
        params = opt.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), grad_norm


def build_optimizer(train: Mapping[str, Any], ddp_chunks: list, bf16: bool, use_distributed_optimizer: bool,
                    expert_lr_scale: float | None = None):
    """Return (optimizer, scheduler); routed experts get ``expert_lr_scale`` x the LR range when given
    (see :mod:`megatron_ext.expert_lr`)."""
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=float(train["lr"]),
        min_lr=float(train["min_lr"]),
        weight_decay=float(train["weight_decay"]),
        adam_beta1=float(train["adam_beta1"]),
        adam_beta2=float(train["adam_beta2"]),
        adam_eps=float(train.get("adam_eps", 1e-8)),
        clip_grad=float(train["clip_grad"]),
        bf16=bf16,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    overrides = expert_lr.param_group_overrides(opt_config, expert_lr_scale)
    optimizer = get_megatron_optimizer(opt_config, ddp_chunks, config_overrides=overrides)
    use_fused_adam(optimizer)
    connect_schedule_hooks(ddp_chunks[0].config, ddp_chunks, optimizer)
    steps = int(train["steps"])
    style = train["lr_decay_style"]
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=float(train.get("init_lr", 0.0)),
        max_lr=float(train["lr"]),
        min_lr=float(train["min_lr"]),
        lr_warmup_steps=int(train["warmup_steps"]),
        lr_decay_steps=steps,
        lr_decay_style=style,
        start_wd=float(train["weight_decay"]),
        end_wd=float(train["weight_decay"]),
        wd_incr_steps=steps,
        wd_incr_style="constant",
        wsd_decay_steps=int(train["wsd_decay_steps"]) if style == "WSD" else None,
        lr_wsd_decay_style=train.get("lr_wsd_decay_style", "linear") if style == "WSD" else None,
    )
    return optimizer, scheduler
