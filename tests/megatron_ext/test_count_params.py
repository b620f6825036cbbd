"""Parameter counts of the full presets, from models built on the meta device, against the papers."""

import json
import subprocess
import sys

import pytest

PAPERS = {  # (total, activated) in the papers
    "hunyuan_large": (389e9, 52e9),
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
    got = count("tiny_moe")
    h, v, ffn, experts, layers = 64, 512, 128, 4, 2
    attn = h * (4 * 16 + 2 * 2 * 16) + 4 * 16 * h + 2 * 16  # qkv + proj + q/k norms (head dim 16)
    mlp_one = 3 * h * ffn  # SwiGLU: fc1 (gate+up) + fc2
    layer = attn + experts * mlp_one + mlp_one + h * experts + 2 * h  # routed + shared + router + 2 norms
    total = 2 * v * h + layers * layer + h
    assert got["total"] == total
    assert got["activated"] == total - layers * (experts - 1) * mlp_one  # top-1 of 4 routed experts
    assert got["kv_cache_bytes_per_token"] == layers * 2 * 2 * 16 * 2  # K,V x 2 groups x dim 16 x bf16
