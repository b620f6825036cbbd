"""Run megatron-core 0.16.1's Mamba-2 layers without ``mamba_ssm`` / ``causal_conv1d`` / ``triton``.

megatron-core's ``megatron.core.ssm.mamba_mixer`` takes its kernels from ``mamba_ssm`` (Triton, GPU
only) inside ``try`` blocks. Without it the module still imports, but ``MambaMixer`` raises
``ImportError`` when built, the gated norm's base class is a ``MagicMock`` (so ``ExtendedRMSNorm`` is a
mock too), and the two scan functions are unbound names. And the module imports ``triton``
unconditionally (through ``inference/contexts/attention_context/triton/tensor_ops.py``, used only by
dynamic-batching inference), so on a machine without triton it does not import at all.

:func:`apply` fixes exactly that, and only when ``mamba_ssm`` is missing; where it is installed (GPUs)
megatron-core keeps its Triton kernels. It binds in ``mamba_mixer``:

- ``mamba_chunk_scan_combined`` -> :func:`megatron_ext.models.ssd_scan_reference.mamba_chunk_scan_combined`,
  eager or compiled (the ``use_mamba_mem_eff_path=False`` path and static-batching inference prefill);
- ``mamba_split_conv1d_scan_combined`` -> :func:`mamba_split_conv1d_scan_combined` below (the default
  ``use_mamba_mem_eff_path=True`` training path: conv, scan and gate in one call);
- ``RMSNormGated`` / ``ExtendedRMSNorm`` -> :class:`GatedRMSNorm` / :class:`ShardedGatedRMSNorm`;
- ``HAVE_MAMBA_SSM = True``, which now means "the names above are bound", so ``MambaMixer`` builds.

megatron-core already has pure-torch paths for what else is missing: the causal depthwise conv
(``nn.Conv1d`` when ``causal_conv1d_fn is None``), the one-token conv update and the one-token SSM
update used in decoding. Packed sequences (``packed_seq_params``) and dynamic-batching inference need
``causal_conv1d`` + ``mamba_ssm`` and stay unsupported; they fail with a clear message.

Both values of ``use_mamba_mem_eff_path`` work with the fallback and give the same numbers (tested); the
default ``True`` is what megatron-core tests for training on GPUs, so one config serves both machines.
On a CPU-only torch ``MambaMixer`` also builds its parameters with ``device=torch.cuda.current_device()``:
``megatron.core.ssm.mamba_mixer`` must be in :data:`megatron_ext.cpu_backend._CUDA_HARDCODED_MODULES`,
and since that module can only be imported after :func:`apply`, the CPU backend must call :func:`apply`
first. The stack's final norm is hard-wired to ``TENorm``: see
:mod:`megatron_ext.models.hybrid_specs` for the local (no-TE) stack.

On GPUs the same torch code runs through ``torch.compile`` (:func:`scan_implementation` says when and
why); on CPU it stays eager. Where ``mamba_ssm`` is installed without ``causal_conv1d`` (our GPU
machine), its fused split-conv kernel would call the missing ``causal_conv1d``; :func:`apply` then binds
the torch conv composed with mamba_ssm's Triton chunk scan instead (:func:`_bind_torch_conv_for_triton`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types

import torch
import torch.nn.functional as F

from megatron_ext.models import ssd_scan_reference
from megatron_ext.models.gated_rmsnorm import GatedRMSNorm, gated_rms_norm

_TENSOR_OPS = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"

_ACTIVE: bool | None = None  # None until apply() ran; then whether the torch fallback is bound

SCAN_ENV = "TURBOLASER_MAMBA_SCAN"  # auto (default) | eager | compiled
_COMPILED: dict = {}  # eager function -> its torch.compile wrapper, built on first use


def scan_implementation(x: torch.Tensor) -> str:
    """Which torch Mamba-2 path runs on ``x``: ``"compiled"`` or ``"eager"``.

    ``auto`` (the default): compiled when ``x`` is on a GPU and the CPU backend is off, since eager runs
    the chunked scan as dozens of separate kernels with fp32 intermediates written to memory, which
    inductor fuses; eager on CPU, so the CPU suite and its recorded numbers do not change and no C++
    toolchain or compile time is needed there. ``$TURBOLASER_MAMBA_SCAN=eager`` forces eager (debugging a
    compile problem); ``=compiled`` compiles on CPU too (tests compare the two paths).
    """
    choice = os.environ.get(SCAN_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "eager", "compiled"):
        raise ValueError(f"${SCAN_ENV}={choice!r}: use auto, eager or compiled")
    if choice != "auto":
        return choice
    from megatron_ext import cpu_backend

    return "compiled" if x.is_cuda and not cpu_backend.is_enabled() else "eager"


def _compiled(fn):
    """``torch.compile(fn)``, made once per function and reused.

    ``dynamic=None`` (automatic dynamic shapes): the first call compiles for its exact shapes, the best
    kernels for fixed-length training; the first call with another shape recompiles once with the
    batch / sequence sizes symbolic, and that graph serves every later length (one more compile if a
    length stops being a multiple of the chunk size). ``dynamic=False`` would instead recompile per new
    length until dynamo's recompile limit and then fall back to eager. ``fullgraph=True``: the function
    is plain torch, so a graph break is a bug to see, not a silent slowdown.
    """
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=None, fullgraph=True)
    return _COMPILED[fn]


def _eager_or_compiled(fn):
    """``fn`` dispatched per call on :func:`scan_implementation` of its first tensor argument."""

    @functools.wraps(fn)
    def dispatch(*args, **kwargs):
        first = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
        run = fn if scan_implementation(first) == "eager" else _compiled(fn)
        return run(*args, **kwargs)

    return dispatch


def _causal_depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             activation: str | None) -> torch.Tensor:
    """``causal_conv1d_fn``: x (b, d, l), weight (d, w); left-padded so token t sees t-w+1..t only."""
    width = weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return _conv_activation(out, activation)


def _conv_activation(out: torch.Tensor, activation: str | None) -> torch.Tensor:
    """``causal_conv1d_fn``'s ``activation`` argument: SiLU (``silu`` / ``swish``) or none."""
    if activation in ("silu", "swish"):
        return F.silu(out)
    if activation is not None:
        raise ValueError(f"activation={activation!r}: causal conv1d supports silu/swish or None")
    return out


def _causal_shift_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         activation: str | None) -> torch.Tensor:
    """:func:`_causal_depthwise_conv1d` on x (b, l, d) as ``width`` shifted multiply-adds.

    What ``_split_conv1d_scan`` runs under ``torch.compile``: inductor fuses the shifts, the bias and the
    SiLU with the split of ``zxbcdt`` into one elementwise kernel (fp32 inside, as cuDNN accumulates)
    and its backward into a few reductions, where ``F.conv1d`` stays cuDNN's depthwise kernel, a memory-
    bound op run far from the memory bandwidth: 130 ms of an H200 hybrid step (benchmarks/README.md).
    """
    width, seqlen = weight.shape[-1], x.shape[1]
    padded = F.pad(x, (0, 0, width - 1, 0))
    out = sum(padded[:, k:k + seqlen] * weight[:, k] for k in range(width))
    if bias is not None:
        out = out + bias
    return _conv_activation(out, activation)


def _split_conv1d_scan(
    zxbcdt: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    activation: str = "silu",
    rmsnorm_weight: torch.Tensor | None = None,
    rmsnorm_eps: float = 1e-6,
    outproj_weight: torch.Tensor | None = None,
    outproj_bias: torch.Tensor | None = None,
    headdim: int | None = None,
    ngroups: int = 1,
    norm_before_gate: bool = True,
    state_dtype: torch.dtype | None = None,
    chunk_scan=ssd_scan_reference.mamba_chunk_scan_combined,
):
    """Drop-in for ``mamba_ssm``'s fused ``mamba_split_conv1d_scan_combined`` (same arguments).

    zxbcdt (b, l, 2 d + 2 g n + h) is the in-projection output; the Mamba-2 block (arXiv 2405.21060,
    section 7, parallel projections) splits it into the gate z, the conv input xBC and dt, runs the causal
    depthwise conv + SiLU on xBC, the SSD scan with skip ``D``, then either gates with ``silu(z)`` or,
    with ``rmsnorm_weight``, applies the gated RMSNorm (groups of ``d / ngroups``), and finally the
    optional out-projection. Returns (b, l, d) (or (b, l, out_dim)), plus the final SSM state when asked.
    The fused kernel only saves memory; autograd here stores the intermediates instead. ``chunk_scan``
    is the SSD scan (the torch one, or mamba_ssm's Triton one where causal_conv1d is missing).
    """
    if seq_idx is not None:
        raise NotImplementedError(
            "the pure-torch Mamba path has no packed-sequence support (seq_idx); install mamba_ssm and "
            "causal_conv1d to train on packed sequences"
        )
    if D.dim() == 1:
        assert headdim is not None, "headdim is required when D has one value per head"
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    dim = nheads * headdim
    batch, seqlen, width = zxbcdt.shape
    dstate = (width - 2 * dim - nheads) // (2 * ngroups)
    assert width == 2 * dim + 2 * ngroups * dstate + nheads, f"zxbcdt width {width} does not split"
    z, xbc, dt = torch.split(zxbcdt, [dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    if torch.compiler.is_compiling():   # fused by inductor; eager (CPU) keeps F.conv1d and its numbers
        xbc = _causal_shift_conv1d(xbc, conv1d_weight, conv1d_bias, activation)
    else:
        xbc = _causal_depthwise_conv1d(xbc.transpose(1, 2), conv1d_weight, conv1d_bias, activation).transpose(1, 2)
    x, B, C = torch.split(xbc, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    out = chunk_scan(
        x.reshape(batch, seqlen, nheads, headdim),
        dt,
        A,
        B.reshape(batch, seqlen, ngroups, dstate),
        C.reshape(batch, seqlen, ngroups, dstate),
        chunk_size,
        D=D,
        z=None if rmsnorm_weight is not None else z.reshape(batch, seqlen, nheads, headdim),
        dt_bias=dt_bias,
        initial_states=initial_states,
        dt_softplus=True,
        dt_limit=dt_limit,
        return_final_states=return_final_states,
        **({} if state_dtype is None else {"state_dtype": state_dtype}),
    )
    out, final_state = out if return_final_states else (out, None)
    out = out.reshape(batch, seqlen, dim)
    if rmsnorm_weight is not None:
        out = gated_rms_norm(out, rmsnorm_weight, None, z=z, eps=rmsnorm_eps, group_size=dim // ngroups,
                             norm_before_gate=norm_before_gate)
    if outproj_weight is not None:
        out = F.linear(out, outproj_weight, outproj_bias)
    return (out, final_state) if return_final_states else out


mamba_chunk_scan_combined = _eager_or_compiled(ssd_scan_reference.mamba_chunk_scan_combined)
mamba_split_conv1d_scan_combined = _eager_or_compiled(_split_conv1d_scan)


class ShardedGatedRMSNorm(GatedRMSNorm):
    """:class:`GatedRMSNorm` with megatron-core's ``ExtendedRMSNorm`` checkpoint sharding.

    The norm's weight is split over TP ranks along axis 0 like the mixer's channels; dist_checkpointing
    needs that said explicitly to save and reshard it.
    """

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        tp_group = getattr(self, "tp_group", None) or parallel_state.get_tensor_model_parallel_group()
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            {"weight": 0},
            sharded_offsets,
            tp_group=tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )


def _unsupported(what: str):
    def fail(*args, **kwargs):
        raise NotImplementedError(
            f"{what} needs triton / causal_conv1d (dynamic-batching Mamba inference); "
            "it has no pure-torch fallback"
        )

    return fail


def _register_triton_free_tensor_ops() -> None:
    """Give ``mamba_mixer`` an importable ``tensor_ops`` when triton is absent.

    Its three functions serve only dynamic-batching inference; here they raise a clear error instead of
    the whole Mamba module failing to import.
    """
    if importlib.util.find_spec("triton") is not None or _TENSOR_OPS in sys.modules:
        return
    stub = types.ModuleType(_TENSOR_OPS, "triton-free stand-in registered by megatron_ext.models.mamba_torch")
    for name in ("tensor_get_slice_after", "tensor_masked_update", "tensor_merge"):
        setattr(stub, name, _unsupported(name))
    sys.modules[_TENSOR_OPS] = stub


def _bind_torch_conv_for_triton(mamba_mixer) -> None:
    """mamba_ssm without causal_conv1d: use torch's conv with mamba_ssm's Triton chunk scan.

    mamba_ssm's fused ``mamba_split_conv1d_scan_combined`` (the ``use_mamba_mem_eff_path=True`` training
    path) calls ``causal_conv1d``'s CUDA functions, which are ``None`` when that package is missing, so it
    fails at the first forward. The composition below does the same maths; the Triton scan does the work.
    """
    mamba_mixer.mamba_split_conv1d_scan_combined = functools.partial(
        _split_conv1d_scan, chunk_scan=mamba_mixer.mamba_chunk_scan_combined
    )


def apply() -> bool:
    """Bind the pure-torch Mamba-2 kernels into megatron-core when ``mamba_ssm`` is missing; idempotent.

    Returns whether the torch fallback is in use (False: megatron-core uses mamba_ssm's kernels). Call it
    before anything imports ``megatron.core.ssm.mamba_mixer`` (``hybrid_specs.hybrid_stack_spec`` does).
    """
    global _ACTIVE
    if _ACTIVE is not None:
        return _ACTIVE
    _register_triton_free_tensor_ops()
    from megatron.core.ssm import mamba_mixer

    if not torch.cuda.is_available():
        # megatron-core 0.19's decode step calls its own Triton kernels (conv update, SSM state update)
        # and falls back to torch when they are None: the only way without a GPU
        for name in ("causal_conv1d_update", "selective_state_update"):
            if getattr(mamba_mixer, name, None) is not None:
                setattr(mamba_mixer, name, None)
    if mamba_mixer.HAVE_MAMBA_SSM:
        if mamba_mixer.causal_conv1d_fn is None:
            _bind_torch_conv_for_triton(mamba_mixer)
        _ACTIVE = False
        return _ACTIVE
    mamba_mixer.mamba_chunk_scan_combined = mamba_chunk_scan_combined
    mamba_mixer.mamba_split_conv1d_scan_combined = mamba_split_conv1d_scan_combined
    mamba_mixer.RMSNormGated = GatedRMSNorm
    mamba_mixer.ExtendedRMSNorm = ShardedGatedRMSNorm
    if not hasattr(mamba_mixer, "causal_conv1d_varlen_states"):
        mamba_mixer.causal_conv1d_varlen_states = _unsupported("causal_conv1d_varlen_states")
    mamba_mixer.HAVE_MAMBA_SSM = True
    _ACTIVE = True
    return _ACTIVE


def is_active() -> bool:
    """Whether :func:`apply` bound the torch fallback."""
    return bool(_ACTIVE)
