"""Test worker (torchrun, CP processes): SDPAAttention under context parallelism against SDPA on the
whole sequence, in float64.

    ring_attention_worker.py <out.json>

Every rank draws the same whole-sequence queries and grouped keys / values (GQA: 4 query heads, 2
groups) and a whole-sequence output gradient, runs ``torch.nn.functional.scaled_dot_product_attention``
(causal) on all of it as the reference, then feeds its own two load-balanced chunks to the CP module
and compares its output rows and the input gradients of its rows (K/V gradients come back from every
rank that used them) with the reference's, for each block kernel ($TURBOLASER_RING_KERNEL).
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType

from megatron_ext import distributed
from megatron_ext.mcore_compat import batch_on_this_cp_rank
from megatron_ext.models.ring_attention import KERNEL_ENV
from megatron_ext.models.sdpa_attention import SDPAAttention
from megatron_ext.quiet import quiet_known_warnings

SEQ, BATCH, HEADS, GROUPS, DIM = 24, 2, 4, 2, 8


def local_rows(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a [s, ...] tensor, cut by megatron-core's get_batch_on_this_cp_rank."""
    cut = batch_on_this_cp_rank({"t": t.unsqueeze(0)}, parallel_state.get_context_parallel_group())
    return cut["t"].squeeze(0)


def compare(module) -> dict:
    g = torch.Generator().manual_seed(7)
    q = torch.randn(SEQ, BATCH, HEADS, DIM, generator=g, dtype=torch.float64)
    k = torch.randn(SEQ, BATCH, GROUPS, DIM, generator=g, dtype=torch.float64)
    v = torch.randn(SEQ, BATCH, GROUPS, DIM, generator=g, dtype=torch.float64)
    dout = torch.randn(SEQ, BATCH, HEADS * DIM, generator=g, dtype=torch.float64)

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in full), is_causal=True,
                                         scale=module.softmax_scale, enable_gqa=True)
    ref = ref.permute(2, 0, 1, 3).reshape(SEQ, BATCH, HEADS * DIM)
    ref.backward(dout)

    local = [local_rows(t).clone().requires_grad_() for t in (q, k, v)]
    out = module(*local, attention_mask=None)
    out.backward(local_rows(dout))
    diffs = {"out": float((out - local_rows(ref.detach())).abs().max())}
    for name, mine, theirs in zip("qkv", local, full):
        diffs[f"d{name}"] = float((mine.grad - local_rows(theirs.grad)).abs().max())
    return diffs


def main(out: str) -> None:
    quiet_known_warnings()
    cp = int(os.environ["WORLD_SIZE"])
    distributed.initialize({"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                            "expert_model_parallel_size": 1, "context_parallel_size": cp}, seed=0)
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, kv_channels=DIM, attention_dropout=0.0,
                               context_parallel_size=cp)
    module = SDPAAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    result = {}
    for kernel in ("flash", "math"):
        os.environ[KERNEL_ENV] = kernel
        result[kernel] = compare(module)
    gathered = [None] * cp
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        json.dump(gathered, open(out, "w"))
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
