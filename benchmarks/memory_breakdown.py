"""Where a training step's GPU memory goes, measured: the figures the planner's memory model is held to.

    python benchmarks/memory_breakdown.py --shape {dense,moe,hybrid} [--micro-batch N]
        [--recompute {none,selective,full}] [--layers-scale F]

Builds ``train_step_mfu.py``'s shape the same way (bf16, fp32 main weights, distributed optimizer, the
fast path) and records ``torch.cuda.memory_allocated`` after each thing that stays for the whole run:
bf16 weights (model built), gradient buffers (DDP wrap), fp32 main weights (optimizer built), Adam
state (after the first step). Then one more step, instrumented: the activations each layer keeps for
the backward (allocated memory after its forward minus before, first micro-batch, by layer kind; with
full recomputation, megatron-core's checkpointed block keeps only each layer's input), what the whole
model's forward keeps (including the logits), the peak of the forward/backward micro-batches and the
peak of the optimizer step, each above the memory allocated when it began; and the first step's peak
(model build to the end of step 1: one-off work such as compiles and lazily made optimizer state). ``--layers-scale 0.5``
halves the layer count (same block pattern) so the MoE and hybrid shapes fit an 80 GB card.
Writes benchmarks/results/memory_<shape>[_mbN][_recompute][_layersX]_<gpu>.json.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.run_record import gpu_record, gpu_result_path, single_rank_env, write_result  # noqa: E402
from benchmarks.train_step_mfu import SEQ, VOCAB, run_layout  # noqa: E402

GIB = 2**30


def scaled_layers(overrides: list[str], scale: float) -> list[str]:
    """The shape with ``scale`` x its layers: num_layers and the hybrid pattern's repeat count."""
    if scale == 1:
        return overrides
    out = []
    for item in overrides:
        if item.startswith("model.num_layers="):
            item = f"model.num_layers={int(int(item.split('=')[1]) * scale)}"
        elif item.startswith("model.hybrid_blocks="):
            repeat = re.search(r"\*(\d+)'$", item)
            item = item[:repeat.start(1)] + str(int(int(repeat.group(1)) * scale)) + "'"
        out.append(item)
    return out


def layer_kind(layer: torch.nn.Module) -> str:
    """attention+mlp / attention+moe (GPT family layers), attention / mamba / mlp / moe (hybrid)."""
    name = type(layer).__name__
    if "Mamba" in name:
        return "mamba"
    mixer = getattr(layer, "self_attention", None)
    mlp = getattr(layer, "mlp", None)
    ffn = None
    if mlp is not None and type(mlp).__name__ not in ("IdentityOp", "IdentityFuncOp"):
        ffn = "moe" if hasattr(mlp, "router") else "mlp"
    has_attention = mixer is not None and type(mixer).__name__ not in ("IdentityOp", "IdentityFuncOp")
    return "+".join(k for k in ("attention" if has_attention else None, ffn) if k) or name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["dense", "moe", "hybrid"], required=True)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    parser.add_argument("--layers-scale", type=float, default=1.0)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark measures GPU memory"
    single_rank_env()
    from megatron.core import parallel_state

    from launch.config import load_config
    from megatron_ext import distributed, model_builder, optim
    from megatron_ext.metrics import MetricsWriter
    from megatron_ext.trainer import StepBatches, Trainer

    overrides, mbs, gbs = run_layout(args.shape, args.recompute, micro_batch=args.micro_batch)
    gbs = 4 * mbs   # four micro-batches a step: the peak is one micro-batch's, the step time is not measured
    overrides = scaled_layers(overrides, args.layers_scale)
    overrides = [o for o in overrides if not o.startswith("stages.pretrain.train.global_batch_size=")]
    cfg = load_config([*overrides, f"stages.pretrain.train.global_batch_size={gbs}"])
    env = distributed.initialize(cfg.parallel, seed=0)
    alloc = torch.cuda.memory_allocated
    marks = {"start": alloc()}
    config = model_builder.transformer_config(cfg.model, cfg.parallel)
    chunks = model_builder.build_model(cfg.model, config, VOCAB)
    marks["weights"] = alloc()
    ddp = optim.wrap_ddp(chunks, config, True)
    marks["grad_buffers"] = alloc()
    train = cfg.stages.pretrain.train
    opt, sched = optim.build_optimizer(train, ddp, bf16=True, use_distributed_optimizer=True)
    marks["main_weights"] = alloc()
    params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    g = torch.Generator().manual_seed(0)
    data = [{"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(SEQ), "position_ids": torch.arange(SEQ)}
            for t in torch.randint(0, VOCAB, (gbs, SEQ + 1), generator=g)]
    batches = StepBatches(data * 3, mbs, gbs, parallel_state.get_data_parallel_rank(), env.dp)

    layers = [layer for chunk in chunks for layer in chunk.decoder.layers]
    kept: dict[str, list[int]] = defaultdict(list)
    state = {"record": False, "before": {}}

    def pre_hook(layer, _inputs):
        if state["record"] and torch.is_grad_enabled():
            state["before"][id(layer)] = alloc()

    def post_hook(layer, _inputs, _output):
        if state["record"] and id(layer) in state["before"]:
            kept[layer_kind(layer)].append(alloc() - state["before"].pop(id(layer)))

    for layer in layers:
        layer.register_forward_pre_hook(pre_hook)
        layer.register_forward_hook(post_hook)
    model_forward = []
    top = chunks[0]

    def model_pre(_m, _i):
        if state["record"] and not model_forward:
            state["model_before"] = alloc()

    def model_post(_m, _i, _o):
        if state["record"] and not model_forward:
            model_forward.append(alloc() - state["model_before"])
            state["record"] = False   # the first micro-batch of the instrumented step only

    top.register_forward_pre_hook(model_pre)
    top.register_forward_hook(model_post)
    step_marks: dict[str, float] = {}
    prepare = opt.prepare_grads   # the optimizer phase starts here (megatron_ext.optim.step_if_finite)

    def measured_prepare(*a, **k):
        step_marks["fwd_bwd_peak"] = torch.cuda.max_memory_allocated()
        step_marks["before_optimizer"] = alloc()
        torch.cuda.reset_peak_memory_stats()
        return prepare(*a, **k)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(ddp, opt, sched, train, batches, None, Path(tmp),
                          MetricsWriter(Path(tmp), enabled=False, tensorboard=False), SEQ)
        trainer.train_step()                      # creates the Adam state
        torch.cuda.synchronize()
        marks["adam_state"] = alloc()
        first_step_peak = torch.cuda.max_memory_allocated()   # includes one-off work (compiles, lazy state)
        opt.prepare_grads = measured_prepare
        state["record"] = True
        torch.cuda.reset_peak_memory_stats()
        step_start = alloc()
        trainer.train_step()
        torch.cuda.synchronize()
        step_marks["optimizer_peak"] = torch.cuda.max_memory_allocated()
        marks["after_step"] = alloc()
    tokens = mbs * SEQ
    result = {
        **gpu_record(),
        "shape": args.shape, "micro_batch": mbs, "seq_length": SEQ, "recompute": args.recompute,
        "layers_scale": args.layers_scale, "num_layers": int(cfg.model.num_layers), "params": params,
        "overrides": overrides,
        "static_gib": {"weights": (marks["weights"] - marks["start"]) / GIB,
                       "grad_buffers": (marks["grad_buffers"] - marks["weights"]) / GIB,
                       "main_weights": (marks["main_weights"] - marks["grad_buffers"]) / GIB,
                       "adam_state": (marks["adam_state"] - marks["main_weights"]) / GIB,
                       "total": (marks["adam_state"] - marks["start"]) / GIB},
        "kept_bytes_per_token_by_layer_kind": {kind: sorted(v)[len(v) // 2] / tokens for kind, v in kept.items()},
        "layers_by_kind": {kind: len(v) for kind, v in kept.items()},
        "model_forward_kept_gib": model_forward[0] / GIB if model_forward else None,
        "fwd_bwd_peak_above_step_start_gib": (step_marks["fwd_bwd_peak"] - step_start) / GIB,
        "optimizer_peak_above_its_start_gib": (step_marks["optimizer_peak"] - step_marks["before_optimizer"]) / GIB,
        "step_start_gib": step_start / GIB,
        "first_step_peak_gib": first_step_peak / GIB,
        "peak_gib": max(step_marks["fwd_bwd_peak"], step_marks["optimizer_peak"]) / GIB,
        "after_step_gib": marks["after_step"] / GIB,
    }
    tag = (f"{args.shape}_mb{mbs}{'' if args.recompute == 'none' else '_' + args.recompute}"
           f"{'' if args.layers_scale == 1 else f'_layers{args.layers_scale:g}'}")
    write_result(gpu_result_path(f"memory_{tag}"), result)
    print({k: v for k, v in result.items() if k not in ("machine", "overrides", "libraries")})
    distributed.destroy()


if __name__ == "__main__":
    main()
