"""Training-step throughput and MFU on one GPU, our fast path against plain megatron-core.

    python benchmarks/train_step_mfu.py --shape dense [--plain] [--steps 5]
    python benchmarks/train_step_mfu.py --shape moe   [--plain]
    python benchmarks/train_step_mfu.py --shape dense --recompute {selective,full}

Builds the shape from our model presets (``SHAPES``: issue 10's baseline shapes), bf16 with fp32 main
weights and the distributed optimizer, and runs our Trainer on random tokens: 2 warm-up steps, then
``--steps`` timed steps, each accumulating micro-batches to at least 128K tokens. ``--plain`` builds
what megatron-core gives without Transformer Engine / apex (local DotProductAttention, the foreach
torch Adam) for the ratio. Each configuration runs in a process of its own. Writes JSON with the
command, commit, device, step time, tokens/s, model TFLOP/s (:func:`flops_per_token`), MFU against a
bf16 matmul peak measured in the same run, and peak memory to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.run_record import cuda_seconds, gpu_record, gpu_result_path, single_rank_env, write_result  # noqa: E402,E501

VOCAB = 32768
DENSE = ["model=tiny_large", "model.cla_share_factor=1", "model.num_moe_experts=null", "model.moe_router_topk=2",
         "model.moe_ffn_hidden_size=null", "model.moe_shared_expert_intermediate_size=null",
         "model.moe_routing_mode=dropless", "model.moe_expert_capacity_factor=null",
         "model.num_layers=24", "model.hidden_size=2048", "model.num_attention_heads=16",
         "model.num_query_groups=8", "model.ffn_hidden_size=5504"]
MOE = ["model=tiny_large", "model.cla_share_factor=1", "model.num_layers=16", "model.hidden_size=2048",
       "model.num_attention_heads=16", "model.num_query_groups=8", "model.ffn_hidden_size=2816",
       "model.num_moe_experts=16", "model.moe_router_topk=1", "model.moe_ffn_hidden_size=2816",
       "model.moe_shared_expert_intermediate_size=2816", "model.moe_routing_mode=dropless",
       "model.moe_expert_capacity_factor=null"]
SHAPES = {"dense": (DENSE, 2), "moe": (MOE, 1)}   # overrides, micro-batch size
SEQ = 4096
TOKENS_PER_STEP = 128 * 1024


def flops_per_token(model_cfg: Mapping[str, Any], seq: int, vocab: int) -> float:
    """Training FLOPs per token: 6 x the matmul parameters a token passes through (forward 2, backward
    4; routed experts counted top-k times, the embedding lookup not at all), plus attention's
    6 x layers x seq x heads x head_dim (QK^T and AV are 2 x seq x head_dim each per head, halved by
    the causal mask, times 3 for the backward)."""
    h, layers = int(model_cfg["hidden_size"]), int(model_cfg["num_layers"])
    heads = int(model_cfg["num_attention_heads"])
    groups = int(model_cfg.get("num_query_groups") or heads)
    d = int(model_cfg.get("kv_channels") or h // heads)
    attention = h * heads * d * 2 + h * groups * d * 2                     # q, o and k, v projections
    if model_cfg.get("num_moe_experts"):
        experts, topk = int(model_cfg["num_moe_experts"]), int(model_cfg["moe_router_topk"])
        ffn = (h * experts                                                   # router
               + 3 * h * int(model_cfg["moe_ffn_hidden_size"]) * topk       # SwiGLU routed experts
               + 3 * h * int(model_cfg.get("moe_shared_expert_intermediate_size") or 0))
    else:
        ffn = 3 * h * int(model_cfg["ffn_hidden_size"])
    matmul_params = layers * (attention + ffn) + h * vocab                   # + the output layer
    return 6 * matmul_params + 6 * layers * seq * heads * d


def matmul_peak_tflops(n: int = 8192, iters: int = 20) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    seconds = cuda_seconds(lambda: [a @ b for _ in range(iters)])
    return 2 * n**3 * iters / seconds / 1e12


def use_plain_megatron_core() -> None:
    """What megatron-core 0.16.1 runs without TE / apex: its local attention and the foreach Adam."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_ext import optim
    from megatron_ext.models import sdpa_attention

    sdpa_attention.core_attention_for = lambda config: DotProductAttention
    optim.use_fused_adam = lambda optimizer: 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--recompute", choices=["none", "selective", "full"], default="none",
                        help="activation recomputation: selective (core attention) or full (every layer)")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark measures GPU training"
    single_rank_env()
    from launch.config import load_config
    from megatron_ext import distributed, model_builder, optim
    from megatron_ext.metrics import MetricsWriter
    from megatron_ext.trainer import StepBatches, Trainer

    if args.plain:
        use_plain_megatron_core()
    overrides, mbs = SHAPES[args.shape]
    if args.recompute == "selective":
        overrides = [*overrides, "+model.recompute_granularity=selective"]
    elif args.recompute == "full":
        overrides = [*overrides, "+model.recompute_granularity=full", "+model.recompute_method=uniform",
                     "+model.recompute_num_layers=1"]
    gbs = TOKENS_PER_STEP // SEQ
    cfg = load_config([*overrides, f"model.seq_length={SEQ}", f"stages.pretrain.train.micro_batch_size={mbs}",
                       f"stages.pretrain.train.global_batch_size={gbs}", "stages.pretrain.train.eval_iters=1"])
    distributed.initialize(cfg.parallel, seed=0)
    peak = matmul_peak_tflops()
    config = model_builder.transformer_config(cfg.model, cfg.parallel)
    chunks = model_builder.build_model(cfg.model, config, VOCAB)
    ddp = optim.wrap_ddp(chunks, config, True)
    train = cfg.stages.pretrain.train
    opt, sched = optim.build_optimizer(train, ddp, bf16=True, use_distributed_optimizer=True)
    g = torch.Generator().manual_seed(0)
    data = [{"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(SEQ), "position_ids": torch.arange(SEQ)}
            for t in torch.randint(0, VOCAB, (gbs, SEQ + 1), generator=g)]
    batches = StepBatches(data * (args.steps + 2), mbs, gbs, 0, 1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(ddp, opt, sched, train, batches, None, Path(tmp),
                          MetricsWriter(Path(tmp), enabled=False, tensorboard=False), SEQ)
        times = [cuda_seconds(trainer.train_step) for _ in range(args.steps + 2)]
    step_s = statistics.median(times[2:])   # after 2 warm-up steps
    tokens_per_s = gbs * SEQ / step_s
    model_tflops = flops_per_token(cfg.model, SEQ, VOCAB) * tokens_per_s / 1e12
    n_params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    result = {
        **gpu_record(),
        "shape": args.shape, "path": "plain megatron-core" if args.plain else "turbolaser fast path",
        "recompute": args.recompute,
        "params": n_params, "seq_length": SEQ, "micro_batch": mbs, "tokens_per_step": gbs * SEQ,
        "step_s": step_s, "tokens_per_s": tokens_per_s, "model_tflops": model_tflops,
        "matmul_peak_tflops": peak, "mfu": model_tflops / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "flops_per_token": flops_per_token(cfg.model, SEQ, VOCAB),
    }
    tag = f"{args.shape}{'_plain' if args.plain else ''}{'' if args.recompute == 'none' else '_' + args.recompute}"
    write_result(gpu_result_path(f"train_step_{tag}"), result)
    print({k: v for k, v in result.items() if k not in ("machine",)})
    distributed.destroy()


if __name__ == "__main__":
    main()
