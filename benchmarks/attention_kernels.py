"""SDPA core attention vs megatron-core's local DotProductAttention on a GPU: accuracy and speed.

    python benchmarks/attention_kernels.py [--seq 4096 --batch 2 --heads 16 --groups 8 --head-dim 128]

Both modules get the same bf16 queries / grouped keys / values; the reference is DotProductAttention in
fp32 on the same inputs. Records each bf16 module's largest output and input-gradient error against
the reference (SDPA must be no worse than the local path), then the median forward + backward time of
each over 20 runs after 5 warm-up runs. Writes benchmarks/results/attention_kernels_<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.run_record import cuda_seconds, gpu_record, gpu_result_path, single_rank_env, write_result  # noqa: E402,E501


def run(module, q, k, v, grad) -> tuple[torch.Tensor, list[torch.Tensor]]:
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = module(*inputs, attention_mask=None)
    out.backward(grad)
    return out.detach(), [t.grad for t in inputs]


def timed(module, q, k, v, grad, iters: int = 20, warmup: int = 5) -> float:
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    times = [cuda_seconds(lambda: module(*inputs, attention_mask=None).backward(grad))
             for _ in range(warmup + iters)]
    return statistics.median(times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark compares GPU kernels"
    single_rank_env()
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ext import distributed
    from megatron_ext.models.sdpa_attention import SDPAAttention

    distributed.initialize({"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                            "expert_model_parallel_size": 1}, seed=0)
    h, g, d = args.heads, args.groups, args.head_dim

    def config(bf16: bool) -> TransformerConfig:
        return TransformerConfig(num_layers=1, hidden_size=h * d, num_attention_heads=h, num_query_groups=g,
                                 kv_channels=d, attention_dropout=0.0, bf16=bf16,
                                 params_dtype=torch.bfloat16 if bf16 else torch.float32)

    def make(cls, bf16: bool):
        return cls(config(bf16), layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self").cuda()

    gen = torch.Generator(device="cuda").manual_seed(0)
    shape_q, shape_kv = (args.seq, args.batch, h, d), (args.seq, args.batch, g, d)
    q, k, v = (torch.randn(s, generator=gen, device="cuda", dtype=torch.bfloat16) for s in (shape_q, shape_kv, shape_kv))
    grad = torch.randn(args.seq, args.batch, h * d, generator=gen, device="cuda", dtype=torch.bfloat16)
    ref_out, ref_grads = run(make(DotProductAttention, False), q.float(), k.float(), v.float(), grad.float())
    result = {**gpu_record(), "shape": {"seq": args.seq, "batch": args.batch, "heads": h, "groups": g, "head_dim": d}}
    for name, cls in (("local_dot_product", DotProductAttention), ("sdpa", SDPAAttention)):
        module = make(cls, True)
        out, grads = run(module, q, k, v, grad)
        result[name] = {
            "max_abs_err_out": float((out.float() - ref_out).abs().max()),
            "max_abs_err_grad": max(float((a.float() - b).abs().max()) for a, b in zip(grads, ref_grads)),
            "fwd_bwd_ms": 1000 * timed(module, q, k, v, grad),
        }
        torch.cuda.empty_cache()
    result["speedup"] = result["local_dot_product"]["fwd_bwd_ms"] / result["sdpa"]["fwd_bwd_ms"]
    write_result(gpu_result_path("attention_kernels"), result)
    print(result)
    distributed.destroy()


if __name__ == "__main__":
    main()
