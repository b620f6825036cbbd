"""``train.micro_batch_size: null``: one micro-batch per data-parallel rank and pipeline stage."""

import pytest

from launch.config import load_config
from launch.validation import validate
from megatron_ext.batch_sizes import micro_batch_size
from megatron_ext.errors import ConfigError


def test_null_takes_the_global_batch_over_data_and_pipeline_ranks():
    train = {"micro_batch_size": None, "global_batch_size": 16}
    assert micro_batch_size(train, dp=1) == 16
    assert micro_batch_size(train, dp=2) == 8
    assert micro_batch_size(train, dp=2, pp=2) == 4
    assert micro_batch_size({"micro_batch_size": 3, "global_batch_size": 12}, dp=2) == 3
    with pytest.raises(ConfigError, match=r"stages.sft.train.micro_batch_size=null .* global_batch_size=16 is not a multiple of 3 x 1"):
        micro_batch_size(train, dp=3, prefix="stages.sft.train")


@pytest.mark.parametrize("layout", ["single", "dp2", "pp2_dp2"])
def test_the_tiny_presets_validate_on_every_small_layout(layout):
    cfg = load_config([f"parallel={layout}"])
    assert cfg.stages.pretrain.train.micro_batch_size is None
    validate(cfg)
