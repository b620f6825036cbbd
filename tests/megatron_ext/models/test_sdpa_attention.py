"""SDPA core attention computes megatron-core's DotProductAttention (the GPU fast path's CPU check;
the bf16 GPU comparison and timing: benchmarks/attention_kernels.py, results in benchmarks/README.md)."""

import json
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("sdpa_attention_worker.py")
TOLERANCE = {"float64": 1e-12, "float32": 2e-6}


@pytest.fixture(scope="module")
def diffs(tmp_path_factory, torchrun_module):
    out = tmp_path_factory.mktemp("sdpa") / "diffs.json"
    torchrun_module(WORKER, out, nproc=1)
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["causal", "explicit_mask", "decode"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sdpa_matches_dot_product_attention(diffs, case, dtype):
    got = diffs[f"{case}_{dtype}"]
    assert got["shape"][-1] == 4 * 16                      # [sq, b, heads * head_dim]
    assert got["out"] < TOLERANCE[dtype] and got["grad"] < TOLERANCE[dtype], got


def test_sdpa_is_chosen_unless_it_would_compute_something_else():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_ext.models.sdpa_attention import SDPAAttention, core_attention_for, unsupported_reason

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4)
    assert core_attention_for(config) is SDPAAttention             # GPUs and CPUs alike
    windowed = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, window_size=(8, 0))
    assert unsupported_reason(windowed) == "sliding-window attention"
    assert core_attention_for(windowed) is DotProductAttention
