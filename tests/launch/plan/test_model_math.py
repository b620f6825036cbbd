"""The planner's parameter formulas against the models our code builds (meta device, no memory)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import load_config
from launch.plan import model_math

REPO = Path(__file__).resolve().parents[3]
PRESETS = ["tiny_large", "tiny_turbos", "hunyuan_large", "hunyuan_turbos"]
COUNT = """
import json, sys
from launch.config import load_config
from megatron_ext.count_params import count_preset
print(json.dumps({name: count_preset(load_config([f"model={name}"])) for name in sys.argv[1:]}))
"""


@pytest.fixture(scope="module")
def built():
    proc = subprocess.run([sys.executable, "-c", COUNT, *PRESETS], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("preset", PRESETS)
def test_parameter_formulas_match_the_built_model(built, preset):
    """Total and activated parameters of every preset equal megatron_ext.count_params' meta build (CLA
    consumers without K/V, QK norms, Mamba2's conv / dt / A / D / gated norm, untied embeddings)."""
    model = load_config([f"model={preset}"]).model
    assert model_math.total_params(model, int(model.vocab_size)) == {
        "total": built[preset]["total"], "activated": built[preset]["activated"]}


def test_layer_parts_follow_cla_groups_and_the_hybrid_pattern():
    large = load_config(["model=tiny_large"]).model
    parts = model_math.layer_parts(large)
    assert parts[:2] == [("attention", "moe"), ("attention_shared_kv", "moe")]
    turbos = load_config(["model=hunyuan_turbos"]).model
    assert model_math.layer_counts(turbos) == {"attention": 7, "mamba": 57, "mlp": 0, "moe": 64}
