"""The chunked SSD scan equals the token-by-token recurrence, forward and backward (float64)."""

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.models.ssd_scan_reference import (
    mamba_chunk_scan_combined,
    segment_sum,
    sequential_ssm_reference,
)

F64 = dict(dtype=torch.float64)
TOL = dict(rtol=1e-6, atol=1e-10)

# (batch, seqlen, nheads, headdim, ngroups, dstate, chunk_size)
SHAPES = [
    (1, 8, 2, 3, 1, 4, 4),  # whole chunks
    (2, 13, 4, 3, 2, 5, 4),  # padded last chunk, 2 heads per group
    (2, 5, 4, 2, 4, 3, 8),  # one padded chunk, one head per group
    (1, 17, 6, 2, 3, 2, 5),  # 4 chunks, last of 2 tokens
]


def _inputs(batch, seqlen, nheads, headdim, ngroups, dstate, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, **F64)

    return dict(
        x=randn(batch, seqlen, nheads, headdim),
        dt=randn(batch, seqlen, nheads),
        A=-torch.rand(nheads, generator=g, **F64) * 4 - 0.1,
        B=randn(batch, seqlen, ngroups, dstate),
        C=randn(batch, seqlen, ngroups, dstate),
        D=randn(nheads),
        D_full=randn(nheads, headdim),
        z=randn(batch, seqlen, nheads, headdim),
        dt_bias=randn(nheads),
        h0=randn(batch, nheads, headdim, dstate),
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}l{}h{}p{}g{}n{}c{}".format(*s))
@pytest.mark.parametrize("variant", ["plain", "D_z_bias", "D_full_initial_states"])
def test_chunked_equals_sequential_forward_and_backward(shape, variant):
    *dims, chunk = shape
    t = _inputs(*dims)
    leaves = {k: v.requires_grad_() for k, v in t.items()}
    D = {"plain": None, "D_z_bias": t["D"], "D_full_initial_states": t["D_full"]}[variant]
    z = t["z"] if variant == "D_z_bias" else None
    dt_bias = t["dt_bias"] if variant == "D_z_bias" else None
    h0 = t["h0"] if variant == "D_full_initial_states" else None

    y, final = mamba_chunk_scan_combined(
        t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
        initial_states=h0, return_final_states=True,
    )
    dt_ref = F.softplus(t["dt"] + (dt_bias if dt_bias is not None else 0))
    y_ref, final_ref = sequential_ssm_reference(t["x"], dt_ref, t["A"], t["B"], t["C"], D=D, z=z, initial_states=h0)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(final, final_ref, **TOL)

    g = torch.Generator().manual_seed(1)
    wy = torch.randn(y.shape, generator=g, **F64)
    wf = torch.randn(final.shape, generator=g, **F64)
    optional = {"D": D is t["D"], "D_full": D is t["D_full"], "z": z is not None,
                "dt_bias": dt_bias is not None, "h0": h0 is not None}
    used = ["x", "dt", "A", "B", "C"] + [k for k, on in optional.items() if on]
    wrt = [leaves[k] for k in used]
    grads = torch.autograd.grad((y * wy).sum() + (final * wf).sum(), wrt)
    grads_ref = torch.autograd.grad((y_ref * wy).sum() + (final_ref * wf).sum(), wrt)
    for name, got, want in zip(used, grads, grads_ref):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"grad w.r.t. {name}: {m}")


def test_dt_limit_clamps_the_step_after_softplus():
    t = _inputs(1, 9, 2, 2, 1, 3)
    y = mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 4, dt_softplus=True, dt_limit=(0.2, 0.9))
    y_ref, _ = sequential_ssm_reference(t["x"], F.softplus(t["dt"]).clamp(0.2, 0.9), t["A"], t["B"], t["C"])
    torch.testing.assert_close(y, y_ref, **TOL)


def test_segment_sum_is_masked_before_the_exponential():
    a = torch.tensor([1.0, 2.0, 4.0], **F64)
    s = segment_sum(a)
    expected = torch.tensor([[0.0, -torch.inf, -torch.inf], [2.0, 0.0, -torch.inf], [6.0, 4.0, 0.0]], **F64)
    torch.testing.assert_close(s, expected)
    assert torch.exp(s).triu(1).eq(0).all()


def test_strong_decay_over_a_long_chunk_keeps_gradients_finite():
    # sum(dt * A) over the chunk is about -1e4: exp of its negation (above the diagonal) overflows, so a
    # mask applied after the exponential would give inf * 0 = NaN in the backward pass.
    t = _inputs(1, 64, 2, 2, 1, 2)
    dt = torch.full((1, 64, 2), 10.0, **F64).requires_grad_()
    A = torch.full((2,), -20.0, **F64).requires_grad_()
    x = t["x"].requires_grad_()
    y = mamba_chunk_scan_combined(x, dt, A, t["B"], t["C"], 64, dt_softplus=True)
    gx, gdt, gA = torch.autograd.grad(y.square().sum(), [x, dt, A])
    assert all(torch.isfinite(g).all() for g in (y, gx, gdt, gA))


def test_low_precision_inputs_compute_in_float32_and_return_their_dtype():
    t = {k: v.to(torch.bfloat16) for k, v in _inputs(2, 11, 4, 4, 2, 4).items()}
    y, final = mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 4, D=t["D"], dt_softplus=True,
                                         return_final_states=True, state_dtype=torch.float32)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    f = {k: v.double() for k, v in t.items()}
    y_ref, _ = sequential_ssm_reference(f["x"], F.softplus(f["dt"]), f["A"], f["B"], f["C"], D=f["D"])
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=2e-2)


def test_packed_sequences_are_refused_with_a_clear_error():
    t = _inputs(1, 8, 2, 2, 1, 2)
    with pytest.raises(NotImplementedError, match="seq_idx"):
        mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 4,
                                  seq_idx=torch.zeros(1, 8, dtype=torch.int32))


def test_bf16_inputs_contract_in_bf16_to_bf16_accuracy(monkeypatch):
    """bf16 inputs: the large contractions take bf16 operands (mamba_ssm's precision, tensor cores on
    GPUs) and the output stays within bf16 rounding of the float64 recurrence."""
    t = _inputs(2, 40, 4, 8, 2, 16, seed=3)
    bf = {k: t[k].to(torch.bfloat16) for k in ("x", "dt", "B", "C")}
    seen = []
    einsum = torch.einsum
    monkeypatch.setattr(torch, "einsum", lambda spec, *ops: seen.append((spec, ops[0].dtype)) or einsum(spec, *ops))
    y = mamba_chunk_scan_combined(bf["x"], bf["dt"], t["A"], bf["B"], bf["C"], 16, D=t["D"], dt_softplus=True)
    monkeypatch.undo()
    assert y.dtype == torch.bfloat16
    assert len([spec for spec, dtype in seen if dtype == torch.bfloat16]) == 4      # steps 1 (two), 2 and 4
    assert {spec for spec, dtype in seen if dtype != torch.bfloat16} == {"bhzc,bchpn->bzhpn"}   # step 3: fp32
    exact = {k: v.double() for k, v in bf.items()}
    y_ref, _ = sequential_ssm_reference(exact["x"], F.softplus(exact["dt"]), t["A"], exact["B"], exact["C"], D=t["D"])
    scale = y_ref.abs().max()
    assert (y.double() - y_ref).abs().max() / scale < 2e-2
    y32 = mamba_chunk_scan_combined(*(bf[k].float() if k in bf else t[k].float() for k in ("x", "dt", "A", "B", "C")),
                                    16, D=t["D"].float(), dt_softplus=True)
    assert (y32.double() - y_ref).abs().max() / scale < 1e-5         # float32 inputs keep float32 contractions
