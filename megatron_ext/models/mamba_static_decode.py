"""megatron-core's ``MambaMixer`` with its static-batching decode step fed batch-major.

In megatron-core 0.19 the one-token decode step (``MambaMixer._decode``) hands ``_ssm_decode`` the
input projection as ``(1, b, d)``, sequence first, while ``_ssm_decode`` (and the Triton conv / state
updates it calls) read ``(b, s, d)``: a batch of b sequences is taken as one sequence of b tokens,
which is right only at batch size 1. Its dynamic-batching path transposes first; this does the same
for static batching (what our :class:`~megatron_ext.generation.Generator` uses), and hands every other
case to megatron-core. megatron-core 0.16's ``_decode`` squeezes the sequence axis itself and is used
as it is. (0.19's torch fallback of the same step, used on CPU, also hands its gated norm a squeezed
gate: :class:`~megatron_ext.models.gated_rmsnorm.GatedRMSNorm` pairs it with its input.)
"""

from __future__ import annotations

import functools


@functools.cache
def static_decode_mixer_class() -> type:
    """The ``MambaMixer`` subclass; call after :func:`megatron_ext.models.mamba_torch.apply` (importing
    ``mamba_mixer`` needs triton or its stand-in)."""
    from megatron.core.ssm.mamba_mixer import MambaMixer

    class StaticBatchMambaMixer(MambaMixer):
        def _decode(self, hidden_states, conv_state, ssm_state, batch_indices=None):
            if batch_indices is not None or not hasattr(self, "_ssm_decode"):   # dynamic batching / 0.16
                return super()._decode(hidden_states, conv_state, ssm_state, batch_indices)
            assert hidden_states.shape[0] == 1, "decode steps feed one token per sequence"
            zxbcdt, _ = self.in_proj(hidden_states)                        # (1, b, proj)
            y = self._ssm_decode(zxbcdt.transpose(0, 1), conv_state=conv_state, ssm_state=ssm_state)
            return self.out_proj(y.transpose(0, 1))                         # (1, b, d_model)

    return StaticBatchMambaMixer
