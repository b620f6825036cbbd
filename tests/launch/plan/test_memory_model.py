"""The planner's memory model against measured GPU peaks (benchmarks/results; no GPU needed)."""

import json
from functools import lru_cache
from pathlib import Path

import pytest

from benchmarks.memory_breakdown import scaled_layers
from benchmarks.train_step_mfu import SEQ, VOCAB, run_layout
from launch.config import load_config
from launch.plan import memory, model_math
from launch.plan.memory import Layout, peak_memory

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"
BREAKDOWNS = sorted(p.name for p in RESULTS.glob("memory_*_h*.json") if not p.name.startswith("memory_hf"))
# One-GPU training-step peaks recorded with today's activation code (SwiGLU fusion on, the non-finite
# check on the gradient norm). Older JSONs are left out: train_step_dense_h200 / _tp2_mb4 / _moe_mb2 /
# _moe_ep2 / _hybrid_mb2 (7dc0bbc, before the SwiGLU fusion saved 8 GiB at micro-batch 4), _full /
# _selective (20133b9, older still), the plain megatron-core runs (not our path).
STEP_RUNS = ["train_step_dense_mb4_h100.json", "train_step_dense_mb4_h200.json",
             "train_step_dense_mb4_mcore016_h100.json", "train_step_moe_mb4_h200.json",
             "train_step_hybrid_mb4_h200.json"]


@lru_cache(maxsize=None)
def shape_model(shape: str, recompute: str, micro_batch: int, layers_scale: float):
    overrides = scaled_layers(run_layout(shape, recompute, micro_batch=micro_batch)[0], layers_scale)
    return model_math.freeze(load_config(overrides).model)


def predicted_gib(run) -> float:
    recompute = run.get("recompute") or "none"
    model = shape_model(run["shape"], recompute, run["micro_batch"], run.get("layers_scale", 1.0))
    layout = Layout(micro_batch=run["micro_batch"], recompute=recompute)
    return peak_memory(model, VOCAB, layout, SEQ, 4 * run["micro_batch"]).total / 2**30


@pytest.mark.parametrize("name", BREAKDOWNS + STEP_RUNS)
def test_predicted_peak_within_10_percent_of_the_measured_peak(name):
    """Dense, MoE and hybrid shapes, micro-batch 2 and 4, no / selective / full recomputation (the MoE
    and hybrid breakdowns at half their layers, to fit an 80 GB card; the step runs at full size)."""
    run = json.loads((RESULTS / name).read_text())
    measured = run.get("peak_gib") or run["peak_memory_gib"]
    assert predicted_gib(run) == pytest.approx(measured, rel=0.10)


def test_static_terms_are_the_measured_bytes_per_parameter():
    """bf16 weights, fp32 gradient buffers and fp32 main weights as measured after each was allocated
    (one GPU: the distributed optimizer's shard is everything)."""
    run = json.loads((RESULTS / "memory_dense_mb2_h100.json").read_text())
    static = memory.static_bytes({"dense": run["params"], "expert": 0}, Layout())
    for term, measured in (("weights", "weights"), ("gradients", "grad_buffers"), ("main_weights", "main_weights")):
        assert static[term] / 2**30 == pytest.approx(run["static_gib"][measured], rel=0.02)


def test_mamba_scan_constant_is_the_measured_one():
    """MAMBA_SCAN_UNITS re-derived from the hybrid breakdown: what a Mamba2 layer keeps per token beyond
    its projections' tensors, in fp32 values per head and chunk position."""
    run = json.loads((RESULTS / "memory_hybrid_mb4_layers0.5_h100.json").read_text())
    model = shape_model("hybrid", "none", 4, 0.5)
    without_scan = memory.part_activation_bytes(model, "mamba", Layout()) - memory.MAMBA_SCAN_UNITS * 4 * 32 * 128
    kept = run["kept_bytes_per_token_by_layer_kind"]["mamba"]
    assert (kept - without_scan) / (4 * 32 * 128) == pytest.approx(memory.MAMBA_SCAN_UNITS, abs=0.01)


def test_parallel_layouts_divide_what_they_shard():
    """TP divides weights and (sequence-parallel) activations, the distributed optimizer's DP shards the
    fp32 state, EP the routed experts, PP the layers, and 1F1B keeps PP micro-batches on stage 0."""
    model = model_math.freeze(load_config(["model=hunyuan_large"]).model)
    one = memory.stage_memory(model, 128512, Layout(), 4096, 8, 0)
    tp = memory.stage_memory(model, 128512, Layout(tp=2), 4096, 8, 0)
    assert tp.static["weights"] == pytest.approx(one.static["weights"] / 2, rel=0.01)
    for part in ("attention", "attention_shared_kv"):   # sequence parallel: every tensor split over TP
        assert memory.part_activation_bytes(model, part, Layout(tp=2)) == pytest.approx(
            memory.part_activation_bytes(model, part, Layout()) / 2)
    # the MoE layer gathers the TP group's tokens before dispatch: routed copies stay whole
    assert one.activations / 2 < tp.activations < one.activations
    dp = memory.stage_memory(model, 128512, Layout(dp=4, ep=4), 4096, 8, 0)
    assert dp.static["optimizer_state"] == pytest.approx(one.static["optimizer_state"] / 4, rel=1e-6)
    assert dp.static["weights"] < one.static["weights"] / 3   # routed experts are ~93% of the weights
    pp = memory.stage_memory(model, 128512, Layout(pp=4), 4096, 8, 0)
    assert pp.activations == pytest.approx(one.activations, rel=0.01)   # 1/4 of the layers x 4 in flight
    last = memory.stage_memory(model, 128512, Layout(pp=4), 4096, 8, 3)
    assert last.activations == pytest.approx(one.activations / 4, rel=0.01)
    assert "logits" in last.transient and "logits" not in pp.transient


WORKER = Path(__file__).resolve().parent / "rank_memory_worker.py"


@pytest.mark.parametrize("parallel,nproc", [("tp2_ep2", 4), ("pp2", 2)])
def test_per_rank_parameters_gradients_and_optimizer_shard_match_real_layouts(parallel, nproc, torchrun,
                                                                              tmp_path):
    """Multi-process CPU layouts (where what a rank holds can be counted exactly): each rank's dense and
    routed-expert parameters are the model's (TP x PP x EP split, embedding on the first stage, output
    layer on the last), its gradient buffers hold them (plus megatron-core's bucket padding), and its
    distributed-optimizer shard is its parameters over the data-parallel ranks (experts: over the
    expert-data-parallel ranks)."""
    torchrun(WORKER, tmp_path, parallel, nproc=nproc, timeout=300)
    cfg = load_config(["model=tiny_large", f"parallel={parallel}"])
    p = cfg.parallel
    for path in sorted(tmp_path.glob("rank*.json")):
        rank = json.loads(path.read_text())
        layout = Layout(tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
                        ep=p.expert_model_parallel_size, dp=rank["dp"])
        predicted = memory.stage_params(cfg.model, rank["vocab"], layout, rank["pp_rank"])
        assert rank["expert_params"] == predicted["expert"]
        # norms, QK norms and the router are whole on every TP rank; the rest is split
        assert rank["dense_params"] == predicted["dense"]
        own = rank["dense_params"] + rank["expert_params"]
        assert own <= rank["grad_buffer"] <= own * 1.05
        shard = predicted["dense"] / (layout.dp * layout.cp) + predicted["expert"] / max(1, layout.dp // layout.ep)
        assert rank["optimizer_shard"] == pytest.approx(shard, rel=0.05)
