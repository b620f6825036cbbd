"""Test worker (torchrun, 1 process): SDPAAttention against megatron-core's DotProductAttention.

    sdpa_attention_worker.py <out.json>

Both modules get the same [s, b, heads, d] queries and grouped keys / values (GQA 4 query heads per
2 groups) in float64 and fp32; records the largest output and input-gradient differences for: causal
(no mask), an explicit padding + causal mask, a one-token decode step against a longer key set.
"""

import json
import sys

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_ext import distributed
from megatron_ext.models.sdpa_attention import SDPAAttention
from megatron_ext.quiet import quiet_known_warnings

SINGLE = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "expert_model_parallel_size": 1}


def compare(config, sq, sk, mask, dtype) -> dict:
    g = torch.Generator().manual_seed(sq * 31 + sk)
    b, heads, groups, d = 2, 4, 2, 16
    q = torch.randn(sq, b, heads, d, generator=g, dtype=dtype)
    k = torch.randn(sk, b, groups, d, generator=g, dtype=dtype)
    v = torch.randn(sk, b, groups, d, generator=g, dtype=dtype)
    outs, grads = [], []
    for cls in (DotProductAttention, SDPAAttention):
        module = cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = module(*inputs, attention_mask=mask)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append([t.grad for t in inputs])
    return {"out": float((outs[0] - outs[1]).abs().max()),
            "grad": max(float((a - b_).abs().max()) for a, b_ in zip(*grads)),
            "shape": list(outs[1].shape)}


def main(out: str) -> None:
    quiet_known_warnings()
    distributed.initialize(SINGLE, seed=0)
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                               kv_channels=16, attention_dropout=0.0)
    padding = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    padding[1, :, :, 2:4] = True   # row 1: keys 2, 3 masked (every query keeps key 0: no all-masked row)
    causal_and_padding = padding | torch.triu(torch.ones(8, 8, dtype=torch.bool), 1)
    result = {}
    for dtype in (torch.float64, torch.float32):
        name = str(dtype).removeprefix("torch.")
        result[f"causal_{name}"] = compare(config, 8, 8, None, dtype)
        result[f"explicit_mask_{name}"] = compare(config, 8, 8, causal_and_padding, dtype)
        result[f"decode_{name}"] = compare(config, 1, 9, None, dtype)
    json.dump(result, open(out, "w"))
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
