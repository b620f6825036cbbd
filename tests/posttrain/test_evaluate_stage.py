"""The evaluate stage's self-reward constants (posttrain.evaluate_stage.laser_constants): the config's
where set, else what the RL stage that trained the score recorded."""

import json
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from megatron_ext.errors import ConfigError
from posttrain.evaluate_stage import laser_constants


def _rl_stage(root, name, **recorded):
    ckpt = root / name / "checkpoints" / "iter_0000010"
    ckpt.mkdir(parents=True)
    if recorded:
        (root / name / "laser_c_ref.json").write_text(json.dumps(recorded))
    return ckpt


def _ctx(parent, laser, stages=None):
    stages = stages or {}
    return SimpleNamespace(name="evaluate", parent_checkpoint=str(parent),
                           stage_cfg=OmegaConf.create({"laser": laser}),
                           checkpoint_of=lambda ref, field: stages[ref])


NULLS = {"c_ref": None, "beta": None, "temperature": None, "from_stage": None}


def test_constants_come_from_the_parent_rl_stage_unless_configured(tmp_path):
    parent = _rl_stage(tmp_path, "08_rl_stem", c_ref=-14.5, beta=0.1, temperature=0.9, estimated_at_rollout=0)
    assert laser_constants(_ctx(parent, NULLS)) == {"c_ref": -14.5, "beta": 0.1, "temperature": 0.9}
    # one key configured: only it changes
    assert laser_constants(_ctx(parent, {**NULLS, "temperature": 1.0})) == {"c_ref": -14.5, "beta": 0.1,
                                                                            "temperature": 1.0}
    # all configured: no file needed
    sft = _rl_stage(tmp_path, "04_sft")
    assert laser_constants(_ctx(sft, {**NULLS, "c_ref": -20, "beta": 0.2, "temperature": 0.7})) == {
        "c_ref": -20.0, "beta": 0.2, "temperature": 0.7}


def test_a_baseline_reads_another_stages_constants_and_missing_ones_are_an_error(tmp_path):
    rl = _rl_stage(tmp_path, "08_rl_laser_s0", c_ref=-12.0, beta=0.1, temperature=0.7)
    sft = _rl_stage(tmp_path, "04_sft")
    ctx = _ctx(sft, {**NULLS, "from_stage": "rl_laser_s0"}, stages={"rl_laser_s0": rl})
    assert laser_constants(ctx) == {"c_ref": -12.0, "beta": 0.1, "temperature": 0.7}
    with pytest.raises(ConfigError, match=r"\['c_ref', 'beta', 'temperature'\] null and .*04_sft/laser_c_ref.json "
                                          r"does not exist.*laser.from_stage"):
        laser_constants(_ctx(sft, NULLS))
    old = _rl_stage(tmp_path, "05_rl_old", c_ref=-13.0)     # written before beta / temperature were recorded
    with pytest.raises(ConfigError, match=r"does not record \['beta', 'temperature'\].*laser.beta, "
                                          r"stages.evaluate.laser.temperature"):
        laser_constants(_ctx(old, NULLS))
