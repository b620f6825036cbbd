"""Torch RMSNorm / LayerNorm usable with sequence parallelism.

megatron-core's ``WrappedTorchNorm`` refuses ``sequence_parallel`` because, with sequence-sharded
activations, each TP rank sees only part of the sequence and the norm weight's gradient must be summed
over the TP group. megatron-core already does that sum in ``finalize_model_grads`` for every parameter
marked ``sequence_parallel=True``; this norm marks its parameters, which is all that was missing.
MoE training with TP > 1 requires sequence parallelism, so the local (no-TE) spec needs this.

The weight is created in ``params_dtype`` like every megatron-core parameter (we use no
``Float16Module``): a float32 weight under bf16 activations sends ``torch.rms_norm`` down its unfused
fp32 path (a dense bf16 step on an H200 went from 3.6 s to 2.8 s with it); the optimizer still
keeps fp32 main weights.
"""

from __future__ import annotations

import torch

from megatron.core.transformer import TransformerConfig


class SequenceParallelTorchNorm:
    """Factory with megatron-core's norm signature, returning ``torch.nn.RMSNorm``/``LayerNorm``
    (``eps`` defaults to ``config.layernorm_epsilon``: megatron-core 0.16's MambaLayer passes none)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float | None = None, **_unused):
        eps = config.layernorm_epsilon if eps is None else eps
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization={config.normalization!r}: use RMSNorm or LayerNorm")
        for param in norm.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm
