"""benchmarks/train_step_mfu.py on CPU: the FLOP formula, the kernel classifier and profile table, and the
configs of the hybrid shape and of the TP / EP runs (the GPU measurement itself runs on the device)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import train_step_mfu as mfu
from launch.config import load_config

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"


def shape_model_cfg(shape: str):
    return load_config(mfu.run_layout(shape)[0]).model


@pytest.mark.parametrize("shape", ["dense", "moe"])
def test_dense_and_moe_flops_are_the_recorded_ones(shape):
    # the latest one-GPU runs (micro-batch 4; FLOPs a token do not depend on the micro-batch)
    recorded = json.loads((RESULTS / f"train_step_{shape}_mb4_h200.json").read_text())["flops_per_token"]
    assert mfu.flops_per_token(shape_model_cfg(shape), mfu.SEQ, mfu.VOCAB) == recorded
    if shape == "moe":
        assert recorded == 5740953600


def test_hybrid_flops_by_hand():
    cfg = {"family": "turbos_hybrid", "hybrid_blocks": "(AMF MF)", "hybrid_block_types": {"AMF": "AFMF", "MF": "MF"},
           "num_layers": 6, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
           "ffn_hidden_size": 128, "mamba_num_heads": 8, "mamba_head_dim": 16, "mamba_num_groups": 2,
           "mamba_state_dim": 16, "mamba_chunk_size": 32, "num_moe_experts": 4, "moe_router_topk": 2,
           "moe_ffn_hidden_size": 32, "moe_shared_expert_intermediate_size": 64}
    seq, vocab = 128, 512
    # pattern "*EMEME": 1 attention, 2 Mamba2, 3 MoE layers
    assert mfu.layer_counts(cfg) == {"attention": 1, "mamba": 2, "mlp": 0, "moe": 3}
    attention = 64 * 4 * 16 * 2 + 64 * 2 * 16 * 2                  # q, o + k, v = 12288
    moe = 64 * 4 + 3 * 64 * 32 * 2 + 3 * 64 * 64                    # router, 2 routed, shared = 24832
    d_inner, xbc = 8 * 16, 8 * 16 + 2 * 2 * 16                      # 128, conv channels 192
    mamba = 64 * (d_inner + xbc + 8) + d_inner * 64 + xbc * 4        # in_proj, out_proj, conv = 29952
    output = 64 * vocab
    ssd = 32 * (2 * 16 + 8 * 16) + 4 * 16 * 16 * 8 + 2 * 16 * 16 * 8 / 32   # 5120 + 8192 + 128
    expected = (6 * (attention + 2 * mamba + 3 * moe + output)
                + 6 * 1 * seq * 4 * 16                                 # causal attention scores
                + 3 * 2 * ssd)
    assert expected == 1206528
    assert mfu.flops_per_token(cfg, seq, vocab) == expected


def test_hybrid_shape_is_the_documented_one():
    cfg = shape_model_cfg("hybrid")
    assert mfu.layer_counts(cfg) == {"attention": 4, "mamba": 12, "mlp": 0, "moe": 16}
    assert mfu.mamba_dims(cfg) == {"H": 32, "P": 64, "d_inner": 2048, "G": 8, "N": 128, "Q": 128}
    assert (cfg.hidden_size, cfg.num_moe_experts, cfg.moe_router_topk) == (2048, 16, 2)
    # about the MoE shape's FLOPs per token (5.74 GFLOP)
    assert mfu.flops_per_token(cfg, mfu.SEQ, mfu.VOCAB) == pytest.approx(5.50e9, rel=0.01)


META_BUILD = """
import json, sys, torch
from benchmarks import train_step_mfu as mfu
from benchmarks.run_record import single_rank_env
from launch.config import load_config
from megatron_ext import distributed, model_builder
single_rank_env()
single = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
          "expert_model_parallel_size": 1, "sequence_parallel": False}
distributed.initialize(single, seed=0)
out = {}
for shape in sys.argv[1:]:
    cfg = load_config(mfu.run_layout(shape)[0])
    config = model_builder.transformer_config(cfg.model, single)
    config.perform_initialization = False
    with torch.device("meta"):
        (model,) = model_builder.build_model(cfg.model, config, mfu.VOCAB)
    out[shape] = {name: [p.dim(), p.numel()] for name, p in model.named_parameters()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def built_params():
    """Each shape's parameters (name -> [dims, numel]), built on the meta device in a subprocess."""
    shapes = sorted(mfu.SHAPES)
    proc = subprocess.run([sys.executable, "-c", META_BUILD, *shapes], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", sorted(mfu.SHAPES))
def test_matmul_params_match_the_built_model(built_params, shape):
    """The formula's per-token matmul weights = the built model's weights of 2+ dims (linears, the
    Mamba2 conv), without the embedding table, routed experts counted top-k / experts of theirs."""
    cfg = shape_model_cfg(shape)
    experts, topk = int(cfg.get("num_moe_experts") or 1), int(cfg.get("moe_router_topk") or 1)
    built = 0.0
    for name, (dims, numel) in built_params[shape].items():
        if dims < 2 or "word_embeddings" in name:
            continue
        built += numel * topk / experts if ".mlp.experts." in name else numel
    counts, params = mfu.layer_counts(cfg), mfu.matmul_params(cfg, mfu.VOCAB)
    formula = sum(counts[k] * params[k] for k in ("attention", "mamba", "mlp", "moe")) + params["output"]
    assert formula == built
    if shape == "hybrid":
        assert any(".mixer.conv1d.weight" in name or ".mixer.conv1d_weight" in name for name in built_params[shape])


KERNELS = {
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_"
    "kernel__5x_cublas": "GEMM",
    "nvjet_tst_192x192_64x3_2x1_v_bz_coopB_TNN": "GEMM",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(...)": "GEMM",
    "void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true>(...)": "GEMM",
    "triton_tem_fused_mm_0": "GEMM",
    "void at::native::elementwise_kernel<128, 2, ...>(int, ...)": "elementwise & activation",
    "void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel(...)>": "elementwise & activation",
    "triton_poi_fused_add_mul_0": "elementwise & activation",
    "triton_poi_fused__to_copy_mul_1": "elementwise & activation",
    "ncclDevKernel_AllGather_RING_LL": "communication",
    "ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "communication",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false>, ...>": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_cga1x1x1_kernel0_0":
        "attention",
    "void fmha_cutlassB_bf16_aligned_64x64_k128_sm80(...)": "attention",
    "void multi_tensor_apply_kernel<at::native::(anonymous namespace)::TensorListMetadata<4>, "
    "at::native::(anonymous namespace)::FusedAdamMathFunctor<...>>": "optimizer",
    "void at::native::(anonymous namespace)::cutlass_grouped_mm<...>": "grouped GEMM",
    "void cutlass::device_kernel<at::cuda::detail::enable_3x_kernel_for_sm9x<cutlass::gemm::kernel::"
    "GemmUniversal<cutlass::gemm::GroupProblemShape<cute::tuple<int, int, int>>, ...>>>": "grouped GEMM",
    "Memcpy HtoD (Pageable -> Device)": "copies / memcpy / memset",
    "Memset (Device)": "copies / memcpy / memset",
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<"
    "at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::...>>": "copies / memcpy / memset",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>": "copies / memcpy / memset",
    "_chunk_scan_fwd_kernel": "Mamba scan & conv",
    "_bmm_chunk_fwd_kernel": "Mamba scan & conv",
    "_chunk_state_bwd_db_kernel": "Mamba scan & conv",
    "_state_passing_fwd_kernel": "Mamba scan & conv",
    "void causal_conv1d_fwd_kernel<Causal_conv1d_fwd_kernel_traits<128, 4, true, c10::BFloat16>>(...)":
        "Mamba scan & conv",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>(...)":
        "normalization",
    "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "normalization",
    "_layer_norm_fwd_1pass_kernel": "normalization",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<...>>>":
        "reductions, softmax & loss",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
    "at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>(...)": "reductions, softmax & loss",
    "void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>(...)": "reductions, softmax & loss",
    "triton_per_fused_sum_0": "reductions, softmax & loss",
    "void at::native::index_elementwise_kernel<128, 4, ...>(long, ...)": "gather / scatter / index",
    "void at::native::_scatter_gather_elementwise_kernel<128, 8, ...ReduceAdd...>(int, ...)":
        "gather / scatter / index",
    "void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, "
    "true>(...)": "gather / scatter / index",
    "some_unknown_kernel": "other",
}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_class(name):
    assert mfu.kernel_class(name) == KERNELS[name]


def test_kernel_classes_cover_the_brief():
    names = {cls for cls, _ in mfu.KERNEL_CLASSES}
    assert {"GEMM", "grouped GEMM", "attention", "Mamba scan & conv", "elementwise & activation", "normalization",
            "reductions, softmax & loss", "copies / memcpy / memset", "optimizer", "communication"} <= names


def test_busy_time_is_the_union_of_intervals():
    assert mfu.busy_us([]) == 0
    assert mfu.busy_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert mfu.busy_us([(20, 30), (0, 40)]) == 40


def test_profile_table():
    long_name = "sm90_xmma_gemm_" + "x" * 300
    kernels = [(long_name, 0, 400), (long_name, 500, 900),            # GEMM 800 us, 2 kernels
               ("ncclDevKernel_AllGather_RING_LL", 300, 600),         # overlaps both GEMMs
               ("triton_poi_fused_add_mul_0", 1000, 1100),
               ("Memcpy HtoD (Pageable -> Device)", 1100, 1200)]
    table = mfu.profile_table(kernels, step_wall_s=0.0015)
    assert table["kernels"] == 5
    assert table["kernel_ms"] == pytest.approx(1.3)
    assert table["gpu_busy_ms"] == pytest.approx(1.1)                 # 0-900 and 1000-1200
    assert table["cpu_gap_ms"] == pytest.approx(0.4)
    assert list(table["classes"]) == ["GEMM", "communication", "elementwise & activation",
                                      "copies / memcpy / memset"]
    assert table["classes"]["GEMM"] == {"ms": pytest.approx(0.8), "pct": pytest.approx(800 / 13), "count": 2}
    assert sum(row["pct"] for row in table["classes"].values()) == pytest.approx(100)
    top = table["top_kernels"][0]
    assert top["class"] == "GEMM" and top["count"] == 2 and len(top["name"]) == mfu.KERNEL_NAME_CHARS
    assert len(table["top_kernels"]) == 4
    assert "| GEMM | 0.8 | 61.5% | 2 |" in mfu.format_profile(table)
    many = [(f"k{i}", 0, i + 1) for i in range(40)]
    assert [k["name"] for k in mfu.profile_table(many, 1.0)["top_kernels"]] == [f"k{i}" for i in range(39, 24, -1)]


@pytest.mark.parametrize("shape, tp, ep", [("dense", 1, 1), ("moe", 1, 1), ("hybrid", 1, 1),
                                           ("dense", 2, 1), ("moe", 1, 2), ("hybrid", 2, 1)])
def test_two_gpu_layouts_keep_each_gpus_work(shape, tp, ep):
    from megatron_ext import model_builder
    from megatron_ext.trainer import StepBatches

    world = tp * ep
    overrides, mbs, gbs = mfu.run_layout(shape, tp=tp, ep=ep, world_size=world)
    _, one_mbs, one_gbs = mfu.run_layout(shape)
    assert gbs * mfu.SEQ == mfu.TOKENS_PER_STEP * world
    assert mbs == one_mbs * tp
    dp = world // tp
    # every data-parallel rank runs the one-GPU run's number of micro-batches
    assert StepBatches([], mbs, gbs, 0, dp).num_microbatches == one_gbs // one_mbs
    cfg = load_config(overrides)
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.expert_model_parallel_size) == (tp, ep)
    config = model_builder.transformer_config(cfg.model, cfg.parallel)
    assert config.tensor_model_parallel_size == tp and config.expert_model_parallel_size == ep
    assert config.sequence_parallel == (tp > 1)


def test_layout_must_fit_the_processes():
    with pytest.raises(SystemExit, match="--tp 2"):
        mfu.run_layout("moe", tp=2, ep=2, world_size=2)
    with pytest.raises(SystemExit, match="no experts"):
        mfu.run_layout("dense", ep=2, world_size=2)
    with pytest.raises(SystemExit, match="--micro-batch 3"):
        mfu.run_layout("moe", micro_batch=3)


def test_a_larger_micro_batch_keeps_the_tokens_a_step():
    overrides, mbs, gbs = mfu.run_layout("moe", micro_batch=4)
    assert (mbs, gbs * mfu.SEQ) == (4, mfu.TOKENS_PER_STEP)
    assert "stages.pretrain.train.micro_batch_size=4" in overrides
    assert mfu.run_layout("dense", tp=2, world_size=2, micro_batch=4)[1] == 8   # TP groups: tp x larger


def test_result_tags_and_reference(tmp_path):
    assert mfu.result_tag("moe", ep=2) == "moe_ep2"
    assert mfu.result_tag("dense", tp=2) == "dense_tp2"
    assert mfu.result_tag("dense", plain=True, recompute="full") == "dense_plain_full"
    assert mfu.result_tag("hybrid") == "hybrid"
    assert mfu.result_tag("moe", micro_batch=2) == "moe_mb2"
    assert mfu.result_tag("dense", micro_batch=2) == "dense"     # the shape's own micro-batch
    assert mfu.result_tag("dense", tp=2, micro_batch=4, sync_tp=True) == "dense_tp2_mb4_sync"
    assert mfu.single_gpu_reference(tmp_path / "missing.json", 100.0) is None
    ref = tmp_path / "train_step_moe_h200.json"
    ref.write_text(json.dumps({"commit": "abc", "step_s": 2.0, "model_tflops": 200.0}))
    got = mfu.single_gpu_reference(ref, 180.0)
    assert got["per_gpu_efficiency"] == pytest.approx(0.9)
    assert got["file"] == "benchmarks/results/train_step_moe_h200.json"


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_layouts_reach_the_transformer_config(recompute):
    from launch.config import load_config
    from megatron_ext import model_builder

    cfg = load_config(mfu.run_layout("dense", recompute=recompute)[0])
    config = model_builder.transformer_config(cfg.model, cfg.parallel)
    assert config.recompute_granularity == recompute
    assert config.recompute_method == ("uniform" if recompute == "full" else None)


def test_plain_comparison_records_the_ratio():
    fast = {"shape": "moe", "step_s": 2.0, "mfu": 0.3, "commit": "a"}
    plain = {"step_s": 6.0, "mfu": 0.1, "commit": "a", "tokens_per_s": 1.0, "model_tflops": 2.0,
             "peak_memory_gib": 3.0, "machine": {}}
    got = mfu.add_plain_comparison(fast, plain, "benchmarks/results/train_step_moe_plain_h200.json")
    assert got["speedup_vs_plain"] == 3.0 and got["plain"]["mfu"] == 0.1 and "machine" not in got["plain"]
    assert got["plain"]["file"].endswith("moe_plain_h200.json") and got["shape"] == "moe"


def test_both_mfu_figures_and_the_datasheet_table():
    from benchmarks.run_record import datasheet_bf16_tflops

    assert datasheet_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4      # SXM
    assert datasheet_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert datasheet_bf16_tflops("NVIDIA H200") == 989.4
    assert datasheet_bf16_tflops("Some Future GPU") is None
    got = mfu.mfu_figures(400.0, 790.0, "NVIDIA H200")
    assert got["mfu_datasheet"] == pytest.approx(400 / 989.4) and got["datasheet_peak_tflops"] == 989.4
    assert got["mfu_measured_peak"] == got["mfu"] == pytest.approx(400 / 790)
    assert mfu.mfu_figures(400.0, 790.0, "Some Future GPU")["mfu_datasheet"] is None


def test_result_files_are_named_for_the_gpu_kind():
    from benchmarks.run_record import gpu_kind

    assert gpu_kind("NVIDIA H100 80GB HBM3") == "h100"   # not "hbm3", the name's last word
    assert gpu_kind("NVIDIA H200") == "h200"
    assert gpu_kind("NVIDIA H100 PCIe") == "h100"
