"""Parameter counts of the full presets, from models built on the meta device, against the papers."""

import json
import subprocess
import sys

import pytest

PAPERS = {  # (total, activated) in the papers
    "hunyuan_large": (389e9, 52e9),
    "hunyuan_turbos": (560e9, 56e9),
}


def count(preset: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.count_params", f"model={preset}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("preset", sorted(PAPERS))
def test_full_preset_matches_paper(preset):
    got = count(preset)
    total, activated = PAPERS[preset]
    assert got["total"] == pytest.approx(total, rel=0.02)
    assert got["activated"] == pytest.approx(activated, rel=0.03)
    assert got["kv_cache_bytes_per_token"] > 0


def test_tiny_preset_counts_match_its_shapes():
    """tiny_large by hand: 4 layers in 2 CLA groups (a producer with Q, K, V and a consumer with Q only)."""
    got = count("tiny_large")
    h, v, head, heads, groups, ffn, experts = 64, 512, 16, 4, 2, 128, 4
    q, kv, proj = h * heads * head, h * 2 * groups * head, heads * head * h
    producer_attn = q + kv + proj + 2 * head  # + q/k norms
    consumer_attn = q + proj + head  # + q norm
    mlp_one = 3 * h * ffn  # SwiGLU: fc1 (gate+up) + fc2
    moe = experts * mlp_one + mlp_one + h * experts  # routed + shared + router
    layers = 2 * (producer_attn + consumer_attn + 2 * (moe + 2 * h))  # 2 groups, 2 norms per layer
    total = 2 * v * h + layers + h
    assert got["total"] == total
    assert got["activated"] == total - 4 * (experts - 1) * mlp_one  # top-1 of 4 routed experts
    assert got["kv_cache_bytes_per_token"] == 2 * 2 * groups * head * 2  # 2 producers: K,V x bf16
