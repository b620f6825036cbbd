"""Stage-level model overrides and the NTK RoPE base rule."""

import math

import pytest

from launch.config import load_config
from megatron_ext.errors import ConfigError
from megatron_ext.stage import ntk_rope_base, stage_model_config


def test_overrides_apply_to_their_stage_only():
    cfg = load_config([])
    assert stage_model_config(cfg, "long_context").seq_length == 256
    assert stage_model_config(cfg, "long_context").rotary_base == 22082
    assert stage_model_config(cfg, "pretrain").seq_length == cfg.model.seq_length == 128


def test_shape_changing_overrides_are_refused():
    cfg = load_config(["+stages.long_context.model_overrides.hidden_size=128"])
    with pytest.raises(ConfigError, match="stages.long_context.model_overrides.hidden_size"):
        stage_model_config(cfg, "long_context")


def test_ntk_rope_base_stretches_the_lowest_frequency_by_the_context_scale():
    base, scale, d = 10000.0, 8.0, 128
    new = ntk_rope_base(base, scale, d)
    lowest = lambda b: b ** (-(d - 2) / d)  # the slowest RoPE frequency, base ** (-(d-2)/d)
    assert lowest(base) / lowest(new) == pytest.approx(scale)
    highest = lambda b: b ** 0  # the fastest one is 1 for any base
    assert highest(new) == highest(base)
    assert math.isclose(ntk_rope_base(10000, 2, 16), 22081.79, rel_tol=1e-6)
