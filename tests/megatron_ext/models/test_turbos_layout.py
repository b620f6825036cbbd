"""The AMF/MF block language compiles to megatron-core hybrid patterns."""

import pytest

from launch.config import load_config
from megatron_ext.errors import ConfigError
from megatron_ext.models.turbos_layout import compile_layout, layer_counts

TYPES = {"AMF": "AFMF", "MF": "MF"}


def test_blocks_expand_in_order():
    assert compile_layout("AMF MF", TYPES) == "*EMEME"
    assert compile_layout("MF*2 AMF", TYPES, moe=False) == "M-M-*-M-"
    assert compile_layout("(AMF MF*2)*2", TYPES) == "*EMEMEME" * 2


def test_turbos_preset_has_the_papers_layer_counts():
    model = load_config(["model=hunyuan_turbos"]).model
    pattern = compile_layout(model.hybrid_blocks, model.hybrid_block_types)
    assert layer_counts(pattern) == {"layers": 128, "mamba": 57, "attention": 7, "ffn": 64}
    assert model.num_layers == 128
    # attention blocks are spread out, not bunched together
    gaps = [b - a for a, b in zip(*(lambda idx: (idx, idx[1:]))([i for i, c in enumerate(pattern) if c == "*"]))]
    assert min(gaps) >= 16


@pytest.mark.parametrize("text, fragment", [
    ("AMF XF", "unknown block 'XF'"),
    ("(AMF MF", "unbalanced '('"),
    ("AMF)", "unbalanced ')'"),
    ("*3", "must follow a block"),
    ("AMF, MF", "cannot read"),
])
def test_errors_name_the_problem(text, fragment):
    with pytest.raises(ConfigError, match="model.hybrid_blocks") as err:
        compile_layout(text, TYPES)
    assert fragment in str(err.value)
