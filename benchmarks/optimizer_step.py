"""Optimizer step on a GPU: megatron-core's torch-Adam fallback, foreach vs torch's fused kernel.

    python benchmarks/optimizer_step.py [--hidden 2048 --layers 8 --experts 8]

Builds a Hunyuan MoE model (bf16, distributed optimizer with fp32 main weights, our param groups
with the expert LR scale) twice in this process: once as megatron-core leaves the optimizer without
apex / Transformer Engine (torch AdamW, foreach), once after ``optim.use_fused_adam``. Both get the
same gradients; records the largest difference of the weights after 3 steps and the median step time
over 10 steps after 3 warm-up steps. Writes benchmarks/results/optimizer_step_<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.run_record import cuda_seconds, gpu_record, gpu_result_path, single_rank_env, write_result  # noqa: E402,E501

TRAIN = {"lr": 3e-4, "min_lr": 3e-5, "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.95,
         "clip_grad": 1.0, "steps": 100, "warmup_steps": 10, "lr_decay_style": "cosine", "wsd_decay_steps": 0}


def run(cfg, fused: bool, steps: int = 13, compare_after: int = 3):
    from megatron_ext import model_builder, optim

    config = model_builder.transformer_config(cfg.model, cfg.parallel)
    torch.manual_seed(0)
    chunks = model_builder.build_model(cfg.model, config, 32768)
    ddp = optim.wrap_ddp(chunks, config, True)
    switched = []
    real = optim.use_fused_adam
    optim.use_fused_adam = (lambda o: switched.append(real(o))) if fused else (lambda o: 0)
    try:
        opt, sched = optim.build_optimizer(TRAIN, ddp, bf16=True, use_distributed_optimizer=True, expert_lr_scale=0.5)
    finally:
        optim.use_fused_adam = real
    params = [p for chunk in ddp for p in chunk.parameters()]
    n_params = sum(p.numel() for p in params)
    g = torch.Generator(device="cuda").manual_seed(1)
    times, snapshot = [], None
    for step in range(steps):
        for p in params:   # the same gradients for both runs
            p.main_grad.copy_(torch.randn(p.main_grad.shape, generator=g, device="cuda") * 1e-3)
        seconds = cuda_seconds(opt.step)
        if step >= 3:
            times.append(seconds)
        if step + 1 == compare_after:
            snapshot = [p.detach().float().cpu() for p in params]
    resumed = None
    if fused:   # a save / resume round trip keeps the fused kernel's on-device step counters working
        import tempfile

        from megatron_ext import checkpointing

        with tempfile.TemporaryDirectory() as tmp:
            path = checkpointing.save(Path(tmp), steps, ddp, opt, sched)
            checkpointing.load(path, ddp, opt, sched)
            opt.step()
            resumed = sorted({str(s["step"].device) for o in opt.chained_optimizers for s in o.optimizer.state.values()})
    del opt, ddp, chunks, params
    gc.collect()
    torch.cuda.empty_cache()
    return {"params": n_params, "step_ms": 1000 * statistics.median(times), "fused_groups": sum(switched),
            "step_counter_devices_after_resume": resumed}, snapshot


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark measures the GPU optimizer"
    single_rank_env()
    from launch.config import load_config
    from megatron_ext import distributed

    h = args.hidden
    cfg = load_config(["model=tiny_large", "model.cla_share_factor=1", f"model.hidden_size={h}",
                       f"model.num_layers={args.layers}", f"model.num_moe_experts={args.experts}",
                       "model.num_attention_heads=16", "model.num_query_groups=8",
                       f"model.ffn_hidden_size={h * 11 // 8}", f"model.moe_ffn_hidden_size={h * 11 // 8}",
                       f"model.moe_shared_expert_intermediate_size={h * 11 // 8}", "model.moe_router_topk=2",
                       "model.moe_routing_mode=dropless", "model.moe_expert_capacity_factor=null"])
    distributed.initialize(cfg.parallel, seed=0)
    foreach, ref = run(cfg, fused=False)
    fused, got = run(cfg, fused=True)
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    scale = max(float(a.abs().max()) for a in ref)
    result = {**gpu_record(),
              "model": {"hidden": h, "layers": args.layers, "experts": args.experts, "params": foreach["params"]},
              "foreach_step_ms": foreach["step_ms"], "fused_step_ms": fused["step_ms"],
              "fused_param_groups": fused["fused_groups"],
              "step_counter_devices_after_resume": fused["step_counter_devices_after_resume"],
              "speedup": foreach["step_ms"] / fused["step_ms"],
              "max_abs_weight_diff_after_3_steps": diff, "max_abs_weight": scale}
    write_result(gpu_result_path("optimizer_step"), result)
    print(result)
    distributed.destroy()


if __name__ == "__main__":
    main()
