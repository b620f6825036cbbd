"""Gradient-accumulation fusion without apex: the wgrad GEMM accumulates into ``main_grad`` and training
is unchanged. The GPU kernel (``torch.addmm`` with an fp32 ``out_dtype``) is CUDA-only; its bf16
check against the unfused sum is recorded by benchmarks/train_step_mfu.py's runs (benchmarks/README.md)."""

import json
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent.parent / "tiny_training.py"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulates_the_weight_gradient_into_main_grad(dtype):
    from megatron_ext.models.grad_accumulation_fusion import ops

    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(10, 6, generator=g), torch.randn(10, 4, generator=g)
    main_grad = torch.randn(4, 6, generator=g, dtype=torch.float64).float()
    expected = main_grad.double() + dy.to(dtype).double().T @ x.to(dtype).double()
    ops.wgrad_gemm_accum_fp32(x.to(dtype), dy.to(dtype), main_grad)
    torch.testing.assert_close(main_grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_install_binds_the_stand_in_where_megatron_core_looks_and_keeps_apex(monkeypatch):
    import sys
    import types

    from megatron.core.tensor_parallel import layers

    from megatron_ext.models import grad_accumulation_fusion

    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)
    # what install() binds is undone afterwards too (setitem / setattr record "absent" for the undo)
    monkeypatch.setitem(sys.modules, "fused_weight_gradient_mlp_cuda", None)
    monkeypatch.delitem(sys.modules, "fused_weight_gradient_mlp_cuda")
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", None, raising=False)
    assert grad_accumulation_fusion.install() is True
    assert layers.fused_weight_gradient_mlp_cuda is grad_accumulation_fusion.ops
    apex = types.SimpleNamespace()
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", apex)
    assert grad_accumulation_fusion.install() is True
    assert layers.fused_weight_gradient_mlp_cuda is apex                 # an installed extension stays
    assert grad_accumulation_fusion.use_gradient_accumulation_fusion() is False   # no GPU: off


@pytest.mark.parametrize("model", ["tiny_large", "tiny_turbos"])
def test_fused_accumulation_trains_like_the_unfused_path(torchrun, tmp_path, model):
    """Two micro-batches a step, two steps: the same losses, gradient norms (a double-counted or lost
    gradient would change them; Adam alone would hide a scale) and eval loss after training."""
    runs = {}
    for name, extra in (("unfused", []), ("fused", ["+grad_accum_fusion=true"])):
        out = tmp_path / f"{name}.json"
        torchrun(WORKER, out, tmp_path / name, "reference", f"model={model}", *extra, nproc=1)
        runs[name] = json.loads(out.read_text())
    fused, unfused = runs["fused"], runs["unfused"]
    assert unfused["fused_wgrad_calls"] == 0
    assert fused["fused_wgrad_calls"] > 0
    for key in ("loss", "grad_norm"):
        assert [s[key] for s in fused["steps"]] == pytest.approx([s[key] for s in unfused["steps"]], rel=1e-5), key
    assert fused["eval_loss_after"] == pytest.approx(unfused["eval_loss_after"], rel=1e-5)
