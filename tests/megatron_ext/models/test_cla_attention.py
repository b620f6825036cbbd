"""Cross-Layer Attention (megatron_ext/models/cla_attention.py).

Model checks run once per tensor-parallel size in ``cla_worker.py`` under the shared ``torchrun``
launcher (TP1 and TP2, 4 layers, share factor 2, fp32); pure functions are checked in-process.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.errors import ConfigError
from megatron_ext.models.cla_attention import (
    kv_cache_bytes_per_token,
    kv_cache_report,
    validate_cla_config,
    validate_cla_layout,
)

WORKER = Path(__file__).with_name("cla_worker.py")
# Tiny test model: 4 layers, 2 KV heads of dim 64 / 4 = 16.
NUM_LAYERS, KV_HEADS, HEAD_DIM = 4, 2, 16


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def worker(request, torchrun_module, tmp_path_factory):
    out = tmp_path_factory.mktemp("cla") / "result.json"
    torchrun_module(WORKER, out, nproc=request.param, timeout=240)
    return json.loads(out.read_text())


def test_kv_projection_parameters_halved(worker):
    assert worker["kv_proj_params_plain"] == NUM_LAYERS * 2 * KV_HEADS * HEAD_DIM * 64  # K and V rows
    assert worker["kv_proj_params_cla"] * 2 == worker["kv_proj_params_plain"]
    saved = worker["total_params_plain"] - worker["total_params_cla"]
    consumers_k_norm = (NUM_LAYERS // 2) * HEAD_DIM  # consumers have no K, hence no K-norm either
    assert saved == worker["kv_proj_params_plain"] // 2 + consumers_k_norm


def test_kv_cache_bytes_halved(worker):
    gqa = kv_cache_bytes_per_token(NUM_LAYERS, KV_HEADS, HEAD_DIM, 1, bytes_per_element=4)
    cla = kv_cache_bytes_per_token(NUM_LAYERS, KV_HEADS, HEAD_DIM, 2, bytes_per_element=4)
    assert gqa == 2 * NUM_LAYERS * KV_HEADS * HEAD_DIM * 4 and cla * 2 == gqa
    # The caches actually allocated: megatron's attention keeps one per layer, CLA one per group.
    assert (worker["plain_cache_entries"], worker["plain_cache_bytes_per_token"]) == (4, gqa)
    assert (worker["cla_cache_entries"], worker["cla_cache_bytes_per_token"]) == (2, cla)


def test_logits_and_grads_match_explicit_kv_reference(worker):
    assert worker["logits_vs_reference_after_rope"] < 1e-5
    assert worker["logits_vs_reference_before_rope"] < 1e-5
    assert worker["grads_vs_reference_rel"] < 1e-5 and worker["grad_names_checked"] == 33


def test_share_factor_1_is_megatron_self_attention(worker):
    assert worker["share1_state_dict_strict"]
    assert worker["share1_vs_megatron_logits"] < 1e-6


def test_no_kv_outlives_its_forward(worker):
    """The K/V hand-off holds nothing after a training step: each group's last consumer releases it,
    and without consumers (share factor 1) producers do not store it. Found on an H100: the stored K/V
    kept 10 KB per token and layer alive between steps (benchmarks/memory_breakdown.py)."""
    assert worker["cla2_store_entries_after_step"] == 0
    assert worker["share1_store_entries_after_step"] == 0


def test_full_recompute_in_whole_groups_keeps_gradients(worker):
    assert worker["recompute_logits_diff"] < 1e-6
    assert worker["recompute_grads_diff"] < 1e-6
    assert worker["selective_recompute_grads_diff"] < 1e-6


def test_sharded_state_dict_has_consumer_q(worker):
    assert worker["sharded_linear_q_keys"] == [
        "decoder.layers.1.self_attention.linear_q.weight",
        "decoder.layers.3.self_attention.linear_q.weight",
    ]


def test_qk_norm_after_rope(worker):
    assert worker["after_rope_formula_diff"] < 1e-5
    assert worker["before_rope_formula_diff"] < 1e-5
    assert worker["after_vs_before_rope_q"] > 1e-2
    assert worker["after_vs_before_rope_logits"] > 1e-3
    # RoPE is a rotation, so the orders agree while the norm weight is uniform (as at init).
    assert worker["uniform_weight_orders_diff"] < 1e-5


def test_generation_with_cache_equals_without(worker):
    assert worker["generate_cached"] == worker["generate_uncached"]
    assert worker["cached_step_logits_diff"] < 1e-5  # prefill, a 3-token chunk, then 1-token steps
    assert worker["plain_generate_equal"]


def test_consumer_without_producer_in_chunk_refuses_to_build(worker):
    msg = worker["straddle_build_error"]
    assert msg and "cla_share_factor" in msg and "straddles" in msg


def test_moe_spec_builds(worker):
    assert worker["moe_logits_finite"] and worker["moe_has_linear_q"] == 2


@pytest.mark.parametrize("num_layers, share, pp, vp, first, last", [
    (8, 2, 2, None, None, None),
    (8, 2, 2, 2, None, None),
    (8, 2, 3, None, 2, 2),
    (64, 2, 8, None, None, None),
    (4, 1, 4, None, None, None),
])
def test_layout_accepts_groups_inside_stages(num_layers, share, pp, vp, first, last):
    validate_cla_layout(num_layers, share, pp, vp, num_layers_in_first_pipeline_stage=first,
                        num_layers_in_last_pipeline_stage=last)


@pytest.mark.parametrize("num_layers, share, pp, vp, first, last", [
    (6, 2, 2, None, None, None),  # 3 layers per stage: group 1 = layers 3-4 straddles
    (8, 2, 4, 2, None, None),     # 1 layer per virtual chunk
    (8, 2, 3, None, 1, 3),        # uneven first/last stages off the group grid
])
def test_layout_rejects_straddling_groups(num_layers, share, pp, vp, first, last):
    with pytest.raises(ConfigError) as err:
        validate_cla_layout(num_layers, share, pp, vp, num_layers_in_first_pipeline_stage=first,
                            num_layers_in_last_pipeline_stage=last)
    msg = str(err.value)
    assert "cla_share_factor=2" in msg and "pipeline_model_parallel_size" in msg
    assert "straddles" in msg and "multiple of" in msg


def test_layout_rejects_bad_share_factor_and_layer_count():
    with pytest.raises(ConfigError, match="num_layers=5 is not a multiple of cla_share_factor=2"):
        validate_cla_layout(5, 2, 1)
    with pytest.raises(ConfigError, match="cla_share_factor=0"):
        validate_cla_layout(4, 0, 1)


def _config(**overrides):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, normalization="RMSNorm",
        use_cpu_initialization=True, gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, masked_softmax_fusion=False, params_dtype=torch.float32, **overrides)


def test_recompute_units_must_hold_whole_groups():
    validate_cla_config(_config(recompute_granularity="full", recompute_method="uniform",
                                recompute_num_layers=2), 2)
    with pytest.raises(ConfigError, match="recompute_num_layers=1 is not a multiple of cla_share_factor=2"):
        validate_cla_config(_config(recompute_granularity="full", recompute_method="uniform",
                                    recompute_num_layers=1), 2)
    with pytest.raises(ConfigError, match="recompute_method='block'"):
        validate_cla_config(_config(recompute_granularity="full", recompute_method="block",
                                    recompute_num_layers=2), 2)


def test_kv_cache_report_hunyuan_large():
    # Hunyuan-Large: 64 layers, 8 KV heads (of 80 query heads), head dim 80, bf16, CLA factor 2.
    report = kv_cache_report(64, 8, 80, 2, bytes_per_element=2, num_attention_heads=80)
    assert report["gqa_bytes_per_token"] == 2 * 64 * 8 * 80 * 2
    assert report["gqa_cla_bytes_per_token"] == 64 * 8 * 80 * 2
    assert report["saving_vs_gqa"] == pytest.approx(0.5)
    assert report["saving_vs_mha"] == pytest.approx(1 - 1 / 20)
    assert "50% less" in report["summary"]
