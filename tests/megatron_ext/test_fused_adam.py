"""Fused AdamW on GPUs only (the GPU check is benchmarks/optimizer_step.py, result in
benchmarks/results/optimizer_step_h200.json): CPU optimizers are left as megatron-core built them,
and Adam step counters sit where each kernel expects them."""

import torch

from megatron_ext.checkpointing import _adam_step
from megatron_ext.optim import use_fused_adam


class _Chained:   # the shape of megatron-core's ChainedOptimizer: .chained_optimizers[i].optimizer
    def __init__(self, *torch_optimizers):
        self.chained_optimizers = [type("Wrapped", (), {"optimizer": o})() for o in torch_optimizers]


def test_cpu_optimizers_keep_the_default_kernel():
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    adam = torch.optim.AdamW(params, lr=1e-3)
    assert use_fused_adam(_Chained(adam, torch.optim.SGD([torch.nn.Parameter(torch.randn(2))], lr=1))) == 0
    assert not adam.param_groups[0]["fused"]


def test_step_counters_follow_the_kernel():
    p = torch.nn.Parameter(torch.randn(3))
    fused = _adam_step({"fused": True}, p, 7.0)
    assert fused.device == p.device and fused.dtype == torch.float32 and float(fused) == 7.0
    default = _adam_step({"fused": None}, p, 7.0)
    assert default.device.type == "cpu" and default.dtype == torch.get_default_dtype() and float(default) == 7.0
