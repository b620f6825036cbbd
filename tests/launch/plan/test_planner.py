"""``python -m launch.plan``, launch's memory check and the planner-chosen parallel presets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from launch.config import CONFIG_DIR, load_config
from launch.plan import presets
from launch.plan.check import check_memory
from megatron_ext.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
NODE_OF_560B = ["cluster=slurm", "model=hunyuan_turbos", "parallel=h200_node", "parallel.nnodes=16",
                "pipeline=turbos_pretrain"]


def test_plan_command_prints_every_layout_as_json_fitting_ones_fastest_first():
    """The acceptance command (json=true): layouts that fit come first, by predicted tokens/s; a layout
    fits exactly when its predicted peak is within the card's usable memory."""
    proc = subprocess.run([sys.executable, "-m", "launch.plan", "model=hunyuan_turbos", "gpu=h200", "nodes=128",
                           "json=true"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["gpus"] == 1024 and out["tokens"] == pytest.approx(16.04e12, rel=0.01)   # 1.7M x 2304 x 4096
    plans, usable = out["plans"], out["usable_gib_per_gpu"]
    assert 0 < out["fitting"] < len(plans)
    fitting = [p for p in plans if p["fits"]]
    assert plans[:len(fitting)] == fitting
    assert all(p["memory_gib"]["total"] <= usable for p in fitting)
    assert all(p["memory_gib"]["total"] > usable for p in plans[len(fitting):])
    speeds = [p["tokens_per_s"] for p in fitting]
    assert speeds == sorted(speeds, reverse=True)
    best = fitting[0]
    assert best["days"] == pytest.approx(out["tokens"] / best["tokens_per_s"] / 86400)


def test_launch_refuses_a_layout_over_memory_with_the_breakdown_and_layouts_that_fit():
    cfg = load_config(NODE_OF_560B)
    with pytest.raises(ConfigError) as err:
        check_memory(cfg)
    message = str(err.value)
    assert "stages.pretrain: layout TP2 PP1 CP1 EP4 DP64 mb1 is predicted to need" in message
    for term in ("weights", "gradients", "main_weights", "optimizer_state", "activations", "--force"):
        assert term in message
    assert "Layouts that fit these 128 GPUs" in message
    check_memory(load_config([*NODE_OF_560B, "force=true"]))            # --force
    check_memory(load_config([*NODE_OF_560B, "cluster.gpu=null"]))      # no card named: no check


@pytest.mark.parametrize("model,gpu,nodes", [(m, g, n) for m in presets.MODELS for g, n in presets.CLUSTERS])
def test_real_size_presets_are_the_planners_choice_and_pass_launch(model, gpu, nodes):
    """Each preset is what the planner picks today (re-run `python -m launch.plan.presets` after a
    model change) and passes validation and the memory check on its cluster for every stage."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        preset = compose(config_name="config", overrides=[f"parallel={presets.preset_name(model, gpu, nodes)}"]).parallel
    best, _ = presets.choose(model, gpu, nodes)
    assert (preset.tensor_model_parallel_size, preset.pipeline_model_parallel_size,
            preset.virtual_pipeline_model_parallel_size, preset.expert_model_parallel_size) == (
                best.tp, best.pp, best.vpp, best.ep)
    assert preset.nnodes == nodes and all(p.fits for p in best.stages)
    from launch.validation import validate

    cfg = load_config(["cluster=slurm", f"cluster.gpu={gpu}", f"model={presets.MODELS[model]}",
                       f"parallel={presets.preset_name(model, gpu, nodes)}", f"pipeline={presets.PIPELINE}"])
    validate(cfg)
    check_memory(cfg)

