"""Test worker (torchrun, 2 processes, tensor parallel 2 with sequence parallelism): the overlapped
linear layers of :mod:`megatron_ext.models.tp_comm_overlap` against megatron-core's own.

    tp_comm_overlap_worker.py <out.json>

For each case (column / row parallel, with / without bias, gradient-accumulation fusion, sequence
shapes whose row blocks split into chunks or not), megatron-core's layer and ours get the same weights
and inputs (each rank its own shard of one global tensor) and output gradients; records the largest
differences of the outputs, input gradients, weight gradients (or ``main_grad``) and bias gradients,
and whether our layer took its overlapped path.
"""

import json
import sys

import torch
import torch.nn.functional as F

from megatron_ext import distributed
from megatron_ext.quiet import quiet_known_warnings

HIDDEN, FFN = 16, 24


def config(fusion: bool):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, tensor_model_parallel_size=2,
                             sequence_parallel=True, tp_comm_overlap=True, params_dtype=torch.float32,
                             use_cpu_initialization=True, gradient_accumulation_fusion=fusion, add_bias_linear=True,
                             activation_func=F.silu)


def build(kind: str, overlapped: bool, bias: bool, fusion: bool):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_ext.models import tp_comm_overlap

    cfg = config(fusion)
    init = torch.nn.init.normal_
    torch.manual_seed(0)   # the same weights for both classes (CPU init: the full matrix, then this rank's shard)
    if kind == "column":
        cls = tp_comm_overlap.OverlappedColumnParallelLinear if overlapped else ColumnParallelLinear
        layer = cls(HIDDEN, FFN, config=cfg, init_method=init, bias=bias, gather_output=False)
    else:
        cls = tp_comm_overlap.OverlappedRowParallelLinear if overlapped else RowParallelLinear
        layer = cls(FFN, HIDDEN, config=cfg, init_method=init, bias=bias, input_is_parallel=True,
                    skip_bias_add=False)
    if bias:
        with torch.no_grad():
            layer.bias.copy_(torch.linspace(-1, 1, layer.bias.numel()))
    if fusion:   # as megatron-core's DDP sets the weights up
        for p in layer.parameters():
            p.main_grad = torch.zeros_like(p, dtype=torch.float32)
            p.grad_added_to_main_grad = False
    return layer


def run(kind: str, overlapped: bool, bias: bool, fusion: bool, seq: int, batch: int) -> dict:
    rank = torch.distributed.get_rank()
    layer = build(kind, overlapped, bias, fusion)
    g = torch.Generator().manual_seed(1)
    if kind == "column":   # input: this rank's sequence block of a global [seq, b, hidden]
        x = torch.randn(seq, batch, HIDDEN, generator=g).chunk(2)[rank]
    else:                  # input: the full sequence, this rank's FFN columns
        x = torch.randn(seq, batch, FFN, generator=g).chunk(2, dim=-1)[rank]
    x = x.clone().requires_grad_()
    calls = []
    from megatron_ext.models import tp_comm_overlap

    function = tp_comm_overlap._GatherThenLinear if kind == "column" else tp_comm_overlap._LinearThenReduceScatter
    original = function.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    function.forward = staticmethod(counted)
    try:
        out, _ = layer(x)
    finally:
        function.forward = staticmethod(original)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2 + rank))
    out.backward(grad)
    w = layer.weight
    return {"out": out.detach(), "x_grad": x.grad, "w_grad": w.main_grad.clone() if fusion else w.grad,
            "b_grad": layer.bias.grad if bias else None, "overlapped_calls": len(calls)}


def main(out: str) -> None:
    from megatron_ext.models import grad_accumulation_fusion

    quiet_known_warnings()
    distributed.initialize({"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
                            "expert_model_parallel_size": 1}, seed=0)
    grad_accumulation_fusion.install()
    results = {}
    # [seq 8, batch 3]: 12 rows per rank block, reduce-scattered in chunks; [6, 3]: 9 rows, one chunk
    for kind in ("column", "row"):
        for bias, fusion, (seq, batch) in ((False, False, (8, 3)), (True, False, (8, 3)), (False, True, (8, 3)),
                                           (True, True, (6, 3))):
            ref = run(kind, False, bias, fusion, seq, batch)
            got = run(kind, True, bias, fusion, seq, batch)
            name = f"{kind}_bias{int(bias)}_fusion{int(fusion)}_seq{seq}"
            results[name] = {key: float((got[key] - ref[key]).abs().max()) for key in ("out", "x_grad", "w_grad")}
            results[name]["scale"] = float(ref["w_grad"].abs().max())
            if bias:
                results[name]["b_grad"] = float((got["b_grad"] - ref["b_grad"]).abs().max())
            results[name]["overlapped_calls"] = [ref["overlapped_calls"], got["overlapped_calls"]]
    # without sequence parallelism the layers are megatron-core's (tensor-parallel all-reduce)
    from megatron_ext.models import tp_comm_overlap

    cfg = config(False)
    cfg.sequence_parallel = False
    layer = tp_comm_overlap.OverlappedRowParallelLinear(FFN, HIDDEN, config=cfg, init_method=torch.nn.init.normal_,
                                                        bias=False, input_is_parallel=True, skip_bias_add=False)
    results["no_sp_output_shape"] = list(layer(torch.randn(4, 2, FFN // 2))[0].shape)
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
