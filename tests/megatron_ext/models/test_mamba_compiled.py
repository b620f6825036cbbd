"""Which torch Mamba-2 path runs where, and that the compiled one computes what the eager one does."""

import types

import pytest
import torch

from megatron_ext.models import mamba_torch
from megatron_ext.models.ssd_scan_reference import (
    mamba_chunk_scan_combined as eager_chunk_scan,
)


def _split_conv_inputs(seqlen, batch=2, nheads=4, headdim=3, ngroups=2, dstate=5, width=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = nheads * headdim
    return {
        "zxbcdt": torch.randn(batch, seqlen, 2 * dim + 2 * ngroups * dstate + nheads, generator=g),
        "conv1d_weight": torch.randn(dim + 2 * ngroups * dstate, width, generator=g),
        "conv1d_bias": torch.randn(dim + 2 * ngroups * dstate, generator=g),
        "dt_bias": torch.randn(nheads, generator=g),
        "A": -torch.rand(nheads, generator=g) - 0.5,
        "D": torch.randn(nheads, generator=g),
    }, {"chunk_size": 4, "headdim": headdim, "ngroups": ngroups}


def _compile_with_backend(monkeypatch, backend):
    """Force the compiled path on CPU tensors, with a fresh dynamo cache and the given backend."""
    import functools

    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(mamba_torch, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    monkeypatch.setenv(mamba_torch.SCAN_ENV, "compiled")


def _value_and_grads(fn, tensors, kwargs):
    leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    out = fn(**leaves, **kwargs)
    out.backward(torch.ones_like(out) + out.detach())  # a non-uniform upstream gradient
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def test_cpu_tensors_run_eager_and_the_switch_is_read(monkeypatch):
    monkeypatch.delenv(mamba_torch.SCAN_ENV, raising=False)
    x = torch.zeros(1)
    assert mamba_torch.scan_implementation(x) == "eager"
    monkeypatch.setenv(mamba_torch.SCAN_ENV, "compiled")
    assert mamba_torch.scan_implementation(x) == "compiled"
    monkeypatch.setenv(mamba_torch.SCAN_ENV, "EAGER")
    assert mamba_torch.scan_implementation(x) == "eager"
    monkeypatch.setenv(mamba_torch.SCAN_ENV, "triton")
    with pytest.raises(ValueError, match=mamba_torch.SCAN_ENV):
        mamba_torch.scan_implementation(x)


def test_gpu_tensors_compile_unless_forced_eager_or_cpu_backend(monkeypatch):
    from megatron_ext import cpu_backend

    cuda_like = torch.empty(0, device="meta")  # stands in for a CUDA tensor: only .is_cuda is read
    monkeypatch.setattr(type(cuda_like), "is_cuda", property(lambda self: True))
    monkeypatch.delenv(mamba_torch.SCAN_ENV, raising=False)
    monkeypatch.setattr(cpu_backend, "_ENABLED", False)
    assert mamba_torch.scan_implementation(cuda_like) == "compiled"
    monkeypatch.setenv(mamba_torch.SCAN_ENV, "eager")
    assert mamba_torch.scan_implementation(cuda_like) == "eager"
    monkeypatch.delenv(mamba_torch.SCAN_ENV)
    monkeypatch.setattr(cpu_backend, "_ENABLED", True)
    assert mamba_torch.scan_implementation(cuda_like) == "eager"


def test_compiled_split_conv_scan_matches_eager_with_gradients_over_lengths(monkeypatch):
    """Forward and every input gradient agree (compiled: the shifted conv; eager: ``F.conv1d``); a second length (not a multiple of the chunk) compiles
    one more graph, with symbolic sizes, which a repeat reuses.

    Captured whole (``fullgraph``) with AOTAutograd's backward, as on a GPU, but run by the ``aot_eager``
    backend: inductor's C++ code generation for these graphs takes about two minutes on a CI machine.
    """
    import torch._dynamo

    _compile_with_backend(monkeypatch, "aot_eager")
    counts = torch._dynamo.utils.counters
    counts.clear()
    for seqlen in (16, 11, 16):
        tensors, kwargs = _split_conv_inputs(seqlen)
        out, grads = _value_and_grads(mamba_torch.mamba_split_conv1d_scan_combined, tensors, kwargs)
        ref, ref_grads = _value_and_grads(mamba_torch._split_conv1d_scan, tensors, kwargs)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        for name in tensors:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-4, msg=name)
    assert mamba_torch._split_conv1d_scan in mamba_torch._COMPILED
    assert counts["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("activation, bias", [("silu", True), (None, False)])
def test_shift_conv_is_the_causal_depthwise_conv(activation, bias):
    """The compiled path's conv (shifted multiply-adds on (b, l, d)) against ``F.conv1d``, in float64:
    output and the input, weight and bias gradients."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    upstream = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    results = []
    for conv in ("shift", "conv1d"):
        if conv == "shift":
            out = mamba_torch._causal_shift_conv1d(x, w, b, activation)
        else:
            out = mamba_torch._causal_depthwise_conv1d(x.transpose(1, 2), w, b, activation).transpose(1, 2)
        leaves = [x, w] + ([b] if bias else [])
        results.append([out.detach(), *torch.autograd.grad(out, leaves, upstream)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # causal: the first output row sees only the first input row
    torch.testing.assert_close(mamba_torch._causal_shift_conv1d(x[:, :1], w, b, activation),
                               mamba_torch._causal_shift_conv1d(x, w, b, activation)[:, :1], rtol=1e-12, atol=1e-12)


def test_compiled_chunk_scan_matches_eager_with_final_state(monkeypatch):
    _compile_with_backend(monkeypatch, "aot_eager")
    g = torch.Generator().manual_seed(1)
    b, seqlen, h, p, ng, n = 2, 12, 4, 3, 2, 5
    x, z = torch.randn(b, seqlen, h, p, generator=g), torch.randn(b, seqlen, h, p, generator=g)
    dt = torch.randn(b, seqlen, h, generator=g)
    A = -torch.rand(h, generator=g) - 0.5
    B, C = torch.randn(b, seqlen, ng, n, generator=g), torch.randn(b, seqlen, ng, n, generator=g)
    args = (x, dt, A, B, C, 4)
    kwargs = {"D": torch.randn(h, generator=g), "z": z, "dt_bias": torch.randn(h, generator=g),
              "dt_softplus": True, "return_final_states": True}
    y, final = mamba_torch.mamba_chunk_scan_combined(*args, **kwargs)
    y_ref, final_ref = eager_chunk_scan(*args, **kwargs)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)


def test_without_causal_conv1d_the_split_conv_call_uses_torch_conv_and_the_bound_chunk_scan():
    """mamba_ssm without causal_conv1d: the fused call becomes torch conv + mamba_ssm's chunk scan,
    which (like mamba_ssm's) takes no ``state_dtype``."""
    calls = []

    def triton_like_scan(*args, **kwargs):
        assert "state_dtype" not in kwargs
        calls.append(args[0].shape)
        return eager_chunk_scan(*args, **kwargs)

    mixer_module = types.SimpleNamespace(mamba_chunk_scan_combined=triton_like_scan, causal_conv1d_fn=None)
    mamba_torch._bind_torch_conv_for_triton(mixer_module)
    tensors, kwargs = _split_conv_inputs(9)
    out = mixer_module.mamba_split_conv1d_scan_combined(*tensors.values(), **kwargs)
    torch.testing.assert_close(out, mamba_torch._split_conv1d_scan(*tensors.values(), **kwargs))
    assert calls == [(2, 9, 4, 3)]
