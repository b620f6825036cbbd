"""Training-step throughput and MFU on H200s, our fast path against plain megatron-core.

    python benchmarks/train_step_mfu.py --shape {dense,moe,hybrid} [--plain] [--steps 5] [--profile]
    python benchmarks/train_step_mfu.py --shape moe --with-plain     # both paths, the ratio in one JSON
    python benchmarks/train_step_mfu.py --shape dense --recompute {selective,full}
    torchrun --nproc-per-node 2 benchmarks/train_step_mfu.py --shape dense --tp 2 [--no-tp-comm-overlap]
    torchrun --nproc-per-node 2 benchmarks/train_step_mfu.py --shape moe --ep 2

Builds the shape from our model presets (``SHAPES``: issue 10's baseline shapes), bf16 with fp32 main
weights and the distributed optimizer, and runs our Trainer on random tokens: 2 warm-up steps, then
``--steps`` timed steps, each accumulating micro-batches to at least 128K tokens per GPU's worth of
work. ``--plain`` builds what megatron-core gives without Transformer Engine / apex (local
DotProductAttention, SequentialMLP experts, the foreach torch Adam) for the ratio; ``--with-plain``
runs both (each configuration runs in a process of its own) and writes the ratio into our path's
JSON. Writes JSON with the command, commit, device, step time, tokens/s, model TFLOP/s
(:func:`flops_per_token`) per GPU, MFU against the datasheet bf16 peak and against a bf16 matmul peak
measured in the same run (:func:`mfu_figures`), the library versions, and peak memory to
benchmarks/results/ (rank 0 writes it).

``--profile`` runs one more full step under ``torch.profiler`` and records where the GPU time goes: CUDA
kernels by class (:func:`kernel_class`), the 15 dearest kernels, and the CPU-side gap (the step's wall
time minus the time at least one kernel ran): :func:`profile_table`.

``--tp N`` / ``--ep N`` (under ``torchrun --nproc-per-node W``) keep each GPU's work equal to the
one-GPU run's: the global batch is W x the one-GPU batch, so each data-parallel rank runs the one-GPU
run's number of micro-batches, and a tensor-parallel group (which shares its micro-batches and splits
their FLOPs TP ways) gets micro-batches TP x larger. EP2 on 2 GPUs is data parallel 2 for attention and
the shared expert, each rank holding half the routed experts; TP2 is data parallel 1 with sequence
parallelism, its collectives overlapped with the GEMMs (:mod:`megatron_ext.models.tp_comm_overlap`;
``--no-tp-comm-overlap``: megatron-core's local layers, tag ``_sync``). Per-GPU tokens/s and model TFLOP/s are the global figures / W, and the ratio against the
one-GPU JSON of the same shape (when ``benchmarks/results`` has one) is issue 10's 2-GPU efficiency.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.run_record import (  # noqa: E402
    cuda_seconds, datasheet_bf16_tflops, gpu_record, gpu_result_path, single_rank_env, write_result)
from launch.plan.model_math import (  # noqa: E402,F401  (the FLOP formulas live with the planner)
    flops_per_token, layer_counts, mamba_dims, matmul_params, ssd_forward_flops)

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
# TurboS-style hybrid (tiny_turbos' AMF = A-F-M-F and MF blocks) at the MoE shape's budget: 4 x (AMF MF MF)
# = 32 layers = 4 attention + 12 Mamba2 + 16 MoE FFNs, i.e. the MoE shape's 16 (mixer + FFN) pairs with
# 12 of the 16 attention mixers made Mamba2. Mamba2 as Hunyuan-TurboS (state 128, chunk 128, head dim 64,
# 4 heads per group) with 32 heads (d_inner 2048). MoE FFNs as TurboS (top-2, shared expert) with 16
# experts of half the MoE shape's width, so a token's expert FLOPs equal the MoE shape's (top-1 of
# 2816); dropless like the MoE shape (TurboS' capacity 1.5 + recycle routing is a separate question).
# 2.88B parameters, 0.94B activated (megatron_ext.count_params), vs the MoE shape's 5.0B / 0.82B.
HYBRID = ["model=tiny_turbos", "model.hybrid_blocks='(AMF MF*2)*4'", "model.num_layers=32",
          "model.hidden_size=2048", "model.num_attention_heads=16", "model.num_query_groups=8",
          "model.ffn_hidden_size=2816", "model.mamba_num_heads=32", "model.mamba_head_dim=64",
          "model.mamba_num_groups=8", "model.mamba_state_dim=128", "model.mamba_chunk_size=128",
          "model.num_moe_experts=16", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=1408",
          "model.moe_shared_expert_intermediate_size=2816", "model.moe_routing_mode=dropless",
          "model.moe_expert_capacity_factor=null"]
SHAPES = {"dense": (DENSE, 2), "moe": (MOE, 1), "hybrid": (HYBRID, 1)}   # overrides, one GPU's micro-batch
SEQ = 4096
TOKENS_PER_STEP = 128 * 1024   # per GPU's worth of work (see the module docstring)
# CUDA kernel classes for --profile, by name: the first rule whose pattern matches (case-insensitive)
# wins, so the order resolves overlaps (cuDNN's SDPA kernels are wgmma kernels too, mamba_ssm's
# _bmm_chunk kernels are matmuls, grouped GEMMs are cutlass kernels, an at::native elementwise kernel
# that copies is a copy, a scatter that adds is not a reduction). torch.compile'd kernels carry the
# ops they fuse, not the Python function they came from, so a compiled SSD scan shows up under the
# elementwise / reduction / GEMM classes.
KERNEL_CLASSES: tuple[tuple[str, str], ...] = (
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter|all_?to_?all|sendrecv"),
    ("copies / memcpy / memset", (r"^memcpy|^memset|direct_copy|copy_kernel|catarraybatchedcopy|"
                                  r"copy_device_to_device|memcpy|memset")),
    ("optimizer", r"multi_tensor|adam|lamb_|fused_sgd"),
    ("grouped GEMM", r"group(ed)?_?(gemm|mm)|groupproblemshape|ptr_?array"),
    ("attention", r"flash|fmha|sdpa|attention|attn|mha_fwd|mha_bwd"),
    ("Mamba scan & conv", (r"chunk_scan|chunk_state|state_passing|chunk_cumsum|bmm_chunk|ssd|selective_scan|"
                           r"causal_conv1d|mamba|conv1d|depthwise")),
    ("normalization", r"layer_?norm|rms_?norm|group_?norm|batch_?norm|rsqrt"),
    ("GEMM", r"gemm|cutlass|cublas|nvjet|xmma|wgmma|splitk|triton_tem_|gemv|matmul|_mm_"),
    ("reductions, softmax & loss", r"softmax|cross_entropy|nll_loss|logsumexp|topk|sort"),
    ("gather / scatter / index", r"index|scatter|gather|permute|masked_select|nonzero"),
    ("reductions, softmax & loss", (r"reduce|reduction|triton_red_|triton_per_|cub::|argmax|argmin|cumsum|"
                                    r"histogram|bincount")),
    ("elementwise & activation", (r"elementwise|triton_poi_|silu|gelu|swiglu|relu|sigmoid|activation|"
                                  r"fill|vectorized|pointwise|where|dropout|rotary|rope")),
)
_KERNEL_RULES = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in KERNEL_CLASSES]
TOP_KERNELS = 15
KERNEL_NAME_CHARS = 160


def kernel_class(name: str) -> str:
    """The class of a CUDA kernel (or memcpy / memset) from its profiler name; ``other`` if none fits."""
    for cls, pattern in _KERNEL_RULES:
        if pattern.search(name):
            return cls
    return "other"


def busy_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: the time at least one kernel ran."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def profile_table(kernels: Iterable[tuple[str, float, float]], step_wall_s: float) -> dict[str, Any]:
    """Where one step's GPU time went, from its kernels as (name, start_us, end_us).

    ``classes``: class -> total ms, % of the summed kernel time, kernel count (dearest first);
    ``top_kernels``: the :data:`TOP_KERNELS` dearest kernel names (truncated) with ms, count and class.
    ``gpu_busy_ms`` is the union of the kernels' intervals (kernels on different streams, e.g. NCCL
    beside compute, overlap, so it can be less than ``kernel_ms``); ``cpu_gap_ms`` = step wall time -
    busy time: when no kernel ran (host-side work, launch latency, synchronisation).
    """
    kernels = list(kernels)
    by_class: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, start, end in kernels:
        for table, key in ((by_class, kernel_class(name)), (by_name, name)):
            table[key][0] += end - start
            table[key][1] += 1
    kernel_us = sum(us for us, _ in by_class.values())
    busy = busy_us((start, end) for _, start, end in kernels)
    share = (lambda us: 100 * us / kernel_us) if kernel_us else (lambda us: 0.0)
    top = sorted(by_name.items(), key=lambda item: -item[1][0])[:TOP_KERNELS]
    return {
        "step_wall_ms": step_wall_s * 1e3,
        "kernel_ms": kernel_us / 1e3,
        "gpu_busy_ms": busy / 1e3,
        "cpu_gap_ms": step_wall_s * 1e3 - busy / 1e3,
        "kernels": len(kernels),
        "classes": {cls: {"ms": us / 1e3, "pct": share(us), "count": int(n)}
                    for cls, (us, n) in sorted(by_class.items(), key=lambda item: -item[1][0])},
        "top_kernels": [{"name": name[:KERNEL_NAME_CHARS], "ms": us / 1e3, "pct": share(us), "count": int(n),
                         "class": kernel_class(name)} for name, (us, n) in top],
    }


def format_profile(table: Mapping[str, Any]) -> str:
    """The class table as Markdown (for benchmarks/README.md)."""
    lines = [(f"step {table['step_wall_ms']:.0f} ms wall, GPU busy {table['gpu_busy_ms']:.0f} ms, "
              f"CPU-side gap {table['cpu_gap_ms']:.0f} ms, {table['kernels']} kernels"),
             "| kernel class | ms | % of kernel time | kernels |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {cls} | {row['ms']:.1f} | {row['pct']:.1f}% | {row['count']} |"
              for cls, row in table["classes"].items()]
    return "\n".join(lines)


def profiled_step(step, retry: bool = True) -> dict[str, Any]:
    """Run ``step()`` once under torch.profiler and tabulate its CUDA kernels, memcpys and memsets.

    CUDA activity only (a step has hundreds of thousands of host ops; recording them would slow the
    step and the parsing); should that record no kernel, and ``retry`` (one process only: the ranks
    must run the same steps), the step is profiled again with CPU activity as well.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for activities in ([ProfilerActivity.CUDA], [ProfilerActivity.CPU, ProfilerActivity.CUDA]):
        with profile(activities=activities) as prof:
            wall_s = cuda_seconds(step)
        kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        if kernels or not retry:
            break
    table = profile_table(kernels, wall_s)
    table["activities"] = [str(a).rsplit(".", 1)[-1] for a in activities]
    return table


def run_layout(shape: str, recompute: str = "none", tp: int = 1, ep: int = 1,
               world_size: int = 1, micro_batch: int | None = None) -> tuple[list[str], int, int]:
    """Hydra overrides, micro-batch size and global batch size (sequences) of a run.

    Each GPU does the one-GPU run's work: the global batch is ``world_size`` x 128K tokens, and a
    tensor-parallel group's micro-batches are ``tp`` x the one-GPU micro-batch (the group splits each
    micro-batch's FLOPs ``tp`` ways), so every rank runs the one-GPU number of micro-batches.
    ``micro_batch`` replaces the shape's one-GPU micro-batch (fewer, larger micro-batches a step).
    """
    overrides, mbs = SHAPES[shape]
    mbs = micro_batch or mbs
    if TOKENS_PER_STEP % (mbs * SEQ):
        raise SystemExit(f"--micro-batch {mbs}: {TOKENS_PER_STEP // SEQ} sequences a step are not a multiple of it")
    if world_size % (tp * ep):
        raise SystemExit(f"--tp {tp} --ep {ep} do not fit {world_size} processes (torchrun --nproc-per-node)")
    if ep > 1 and "model.num_moe_experts=null" in overrides:
        raise SystemExit(f"--ep {ep}: the {shape} shape has no experts; use --shape moe or hybrid")
    if recompute == "selective":
        overrides = [*overrides, "model.recompute_granularity=selective"]
    elif recompute == "full":
        overrides = [*overrides, "model.recompute_granularity=full", "model.recompute_method=uniform",
                     "model.recompute_num_layers=1"]
    mbs *= tp
    gbs = TOKENS_PER_STEP // SEQ * world_size
    return [*overrides, f"model.seq_length={SEQ}", f"stages.pretrain.train.micro_batch_size={mbs}",
            f"stages.pretrain.train.global_batch_size={gbs}", "stages.pretrain.train.eval_iters=1",
            f"parallel.tensor_model_parallel_size={tp}", f"parallel.expert_model_parallel_size={ep}",
            "parallel.pipeline_model_parallel_size=1", "parallel.sequence_parallel=true"], mbs, gbs


def result_tag(shape: str, plain: bool = False, recompute: str = "none", tp: int = 1, ep: int = 1,
               micro_batch: int | None = None, sync_tp: bool = False) -> str:
    """``train_step_<tag>_<device>.json``: e.g. ``moe``, ``dense_plain``, ``dense_full``, ``moe_ep2``,
    ``moe_mb2`` (a micro-batch other than the shape's), ``dense_tp2_sync`` (no TP comm overlap)."""
    mb = f"_mb{micro_batch}" if micro_batch and micro_batch != SHAPES[shape][1] else ""
    return (f"{shape}{'_plain' if plain else ''}{'' if recompute == 'none' else '_' + recompute}"
            f"{f'_tp{tp}' if tp > 1 else ''}{f'_ep{ep}' if ep > 1 else ''}{mb}{'_sync' if sync_tp else ''}")


def single_gpu_reference(path: Path, per_gpu_tflops: float) -> dict[str, Any] | None:
    """The one-GPU result of the same shape and this run's per-GPU TFLOP/s as a share of it."""
    if not path.exists():
        return None
    ref = json.loads(path.read_text())
    return {"file": f"benchmarks/results/{path.name}", "commit": ref.get("commit"),
            "step_s": ref.get("step_s"), "model_tflops": ref.get("model_tflops"),
            "per_gpu_efficiency": per_gpu_tflops / ref["model_tflops"]}


def matmul_peak_tflops(n: int = 8192, iters: int = 20) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    seconds = cuda_seconds(lambda: [a @ b for _ in range(iters)])
    return 2 * n**3 * iters / seconds / 1e12


def mfu_figures(per_gpu_tflops: float, measured_peak: float, device_name: str) -> dict[str, Any]:
    """Both MFUs: against the datasheet dense bf16 peak (Megatron-LM's and the papers' convention, 989
    TFLOP/s for H100 SXM / H200) and against the bf16 matmul peak measured in the run (775-797 there).
    ``mfu`` keeps its earlier meaning (the measured peak) so older JSONs compare."""
    datasheet = datasheet_bf16_tflops(device_name)
    return {"mfu_datasheet": per_gpu_tflops / datasheet if datasheet else None,
            "datasheet_peak_tflops": datasheet,
            "mfu_measured_peak": per_gpu_tflops / measured_peak, "matmul_peak_tflops": measured_peak,
            "mfu": per_gpu_tflops / measured_peak}


def use_plain_megatron_core() -> None:
    """What megatron-core runs without TE / apex / grouped_gemm: its local attention,
    SequentialMLP experts, the foreach Adam, no gradient-accumulation fusion, synchronous
    sequence-parallel collectives and unfused SwiGLU (TransformerConfig's default)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_ext import model_builder, optim
    from megatron_ext.models import grad_accumulation_fusion, recycle_routing, sdpa_attention, tp_comm_overlap

    sdpa_attention.core_attention_for = lambda config: DotProductAttention
    recycle_routing.use_grouped_gemm = lambda config: False
    optim.use_fused_adam = lambda optimizer: 0
    grad_accumulation_fusion.use_gradient_accumulation_fusion = lambda: False
    tp_comm_overlap.wanted = lambda setting, sequence_parallel: False
    build_config = model_builder.transformer_config

    def unfused_swiglu_config(model_cfg, parallel_cfg):
        config = build_config(model_cfg, parallel_cfg)
        config.bias_activation_fusion = False
        return config

    model_builder.transformer_config = unfused_swiglu_config


def model_params(chunks, tp: int, ep: int) -> int:
    """The whole model's parameter count from this rank's shards: tensor-parallel weights are 1/tp of
    theirs, routed experts (``allreduce == False`` under EP) 1/ep; the rest is replicated."""
    total = 0
    for chunk in chunks:
        for p in chunk.parameters():
            total += (p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
                      * (ep if not getattr(p, "allreduce", True) else 1))
    return total


def per_rank(value: float) -> list[float]:
    """``value`` from every rank (in rank order); each rank measures its own GPU."""
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return [value]
    mine = torch.tensor([value], dtype=torch.float64, device="cuda")
    out = torch.empty(dist.get_world_size(), dtype=torch.float64, device="cuda")
    dist.all_gather_into_tensor(out, mine)
    return out.tolist()


def add_plain_comparison(fast: dict[str, Any], plain: dict[str, Any], plain_file: str) -> dict[str, Any]:
    """``fast`` with the plain megatron-core run of the same shape and its speed-up over it."""
    keep = ("commit", "step_s", "tokens_per_s", "model_tflops", "model_tflops_per_gpu", "mfu_datasheet",
            "mfu", "peak_memory_gib")
    return {**fast, "plain": {"file": plain_file, **{k: plain.get(k) for k in keep}},
            "speedup_vs_plain": plain["step_s"] / fast["step_s"]}


def run_with_plain(args: argparse.Namespace) -> None:
    """Our path, then plain megatron-core, on one GPU: each in a process of its own (a finished model's
    memory is not all freed inside a process), then the fast result records the plain one."""
    import subprocess

    common = ["--shape", args.shape, "--steps", str(args.steps), "--recompute", args.recompute,
              *(["--micro-batch", str(args.micro_batch)] if args.micro_batch else [])]
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}   # plain MoE needs it
    for extra in ([*(["--profile"] if args.profile else [])], ["--plain"]):
        subprocess.run([sys.executable, __file__, *common, *extra], check=True, env=env)
    paths = [gpu_result_path(f"train_step_{result_tag(args.shape, plain, args.recompute, micro_batch=args.micro_batch)}")
             for plain in (False, True)]
    fast, plain = (json.loads(p.read_text()) for p in paths)
    result = add_plain_comparison(fast, plain, f"benchmarks/results/{paths[1].name}")
    write_result(paths[0], result)
    print(f"{args.shape}: {fast['mfu']:.1%} MFU vs plain megatron-core {plain['mfu']:.1%}: "
          f"{result['speedup_vs_plain']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--recompute", choices=["none", "selective", "full"], default="none",
                        help="activation recomputation: selective (core attention) or full (every layer)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step: GPU time by kernel class, top kernels, CPU-side gap")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (with sequence parallelism)")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE shapes)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="one GPU's micro-batch (default: the shape's; 128K tokens a step either way)")
    parser.add_argument("--no-tp-comm-overlap", action="store_true",
                        help="--tp: megatron-core's synchronous sequence-parallel collectives (tag _sync)")
    parser.add_argument("--with-plain", action="store_true",
                        help="one GPU: also run plain megatron-core (own process) and record the ratio")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark measures GPU training"
    if args.with_plain:
        if args.plain or args.tp > 1 or args.ep > 1:
            raise SystemExit("--with-plain runs both paths itself on one GPU: drop --plain / --tp / --ep")
        return run_with_plain(args)
    single_rank_env()   # a no-op under torchrun, which sets these variables
    if args.tp > 1:
        # as launch/conf/cluster/slurm.yaml: megatron-core's linear layers queue the sequence-parallel
        # all-gather / reduce-scatter before the GEMMs they overlap with only on one hardware queue
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    world = int(os.environ["WORLD_SIZE"])
    from megatron.core import parallel_state

    from launch.config import load_config
    from megatron_ext import distributed, model_builder, optim
    from megatron_ext.metrics import MetricsWriter
    from megatron_ext.trainer import StepBatches, Trainer

    if args.plain:
        use_plain_megatron_core()
    overrides, mbs, gbs = run_layout(args.shape, args.recompute, args.tp, args.ep, world, args.micro_batch)
    if args.no_tp_comm_overlap:
        overrides.append("parallel.tp_comm_overlap=false")
    cfg = load_config(overrides)
    env = distributed.initialize(cfg.parallel, seed=0)
    peak = matmul_peak_tflops()   # every rank on its own GPU, before the model takes memory
    config = model_builder.transformer_config(cfg.model, cfg.parallel)
    chunks = model_builder.build_model(cfg.model, config, VOCAB)
    ddp = optim.wrap_ddp(chunks, config, True)
    train = cfg.stages.pretrain.train
    opt, sched = optim.build_optimizer(train, ddp, bf16=True, use_distributed_optimizer=True)
    # the same samples on every rank; StepBatches gives each data-parallel rank its own micro-batches
    # and the ranks of a tensor-parallel group (one data-parallel rank) the same ones
    g = torch.Generator().manual_seed(0)
    data = [{"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(SEQ), "position_ids": torch.arange(SEQ)}
            for t in torch.randint(0, VOCAB, (gbs, SEQ + 1), generator=g)]
    steps = args.steps + 2 + int(args.profile)
    batches = StepBatches(data * steps, mbs, gbs, parallel_state.get_data_parallel_rank(), env.dp)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(ddp, opt, sched, train, batches, None, Path(tmp),
                          MetricsWriter(Path(tmp), enabled=False, tensorboard=False), SEQ)
        times = [cuda_seconds(trainer.train_step) for _ in range(args.steps + 2)]
        peak_memory = torch.cuda.max_memory_allocated() / 2**30
        profile = profiled_step(trainer.train_step, retry=world == 1) if args.profile else None
    step_s = statistics.median(times[2:])   # after 2 warm-up steps (rank 0's clock; steps end in collectives)
    tokens_per_s = gbs * SEQ / step_s
    fpt = flops_per_token(cfg.model, SEQ, VOCAB)
    model_tflops = fpt * tokens_per_s / 1e12
    n_params = sum(p.numel() for chunk in chunks for p in chunk.parameters())   # this rank's shards
    peaks, memories, rank_params = per_rank(peak), per_rank(peak_memory), per_rank(float(n_params))
    if env.is_main:
        per_gpu_tflops = model_tflops / world
        tag = result_tag(args.shape, args.plain, args.recompute, args.tp, args.ep, args.micro_batch,
                         args.no_tp_comm_overlap and args.tp > 1)
        result = {
            **gpu_record(),
            "shape": args.shape, "path": "plain megatron-core" if args.plain else "turbolaser fast path",
            "recompute": args.recompute,
            "world_size": world, "tensor_parallel": args.tp, "expert_parallel": args.ep, "data_parallel": env.dp,
            "sequence_parallel": bool(config.sequence_parallel), "tp_comm_overlap": bool(config.tp_comm_overlap),
            "params": model_params(chunks, args.tp, args.ep),
            "params_per_rank": [int(p) for p in rank_params],
            "layer_counts": layer_counts(cfg.model),
            "seq_length": SEQ, "micro_batch": mbs, "global_batch": gbs, "tokens_per_step": gbs * SEQ,
            "micro_batches_per_rank": batches.num_microbatches,
            "step_s": step_s, "step_times_s": times,
            "model_tflops_per_gpu": per_gpu_tflops, "tokens_per_s_per_gpu": tokens_per_s / world,
            "tokens_per_s": tokens_per_s, "model_tflops": model_tflops,
            **mfu_figures(per_gpu_tflops, peak, torch.cuda.get_device_name()),
            "matmul_peak_tflops_per_rank": peaks,
            "peak_memory_gib": max(memories), "peak_memory_gib_per_rank": memories,
            "flops_per_token": fpt,
            "flops_formula": "flops_per_token in benchmarks/train_step_mfu.py (docstring)",
        }
        if world > 1:
            reference = gpu_result_path(f"train_step_{result_tag(args.shape, args.plain, args.recompute, micro_batch=args.micro_batch)}")
            result["vs_one_gpu"] = single_gpu_reference(reference, per_gpu_tflops)
        if profile is not None:   # the gap again against the unprofiled median step
            profile["cpu_gap_vs_median_step_ms"] = step_s * 1e3 - profile["gpu_busy_ms"]
            result["profile"] = profile
            print(format_profile(profile))
        write_result(gpu_result_path(f"train_step_{tag}"), result)
        print({k: v for k, v in result.items() if k not in ("machine", "profile", "step_times_s")})
    distributed.destroy()


if __name__ == "__main__":
    main()
