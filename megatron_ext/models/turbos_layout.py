"""A block language for Hunyuan-TurboS layouts, compiled to megatron-core's hybrid layer pattern.

Hunyuan-TurboS (arXiv 2505.15431) stacks two kinds of blocks: AMF (Attention, Mamba2, FFN) and MF
(Mamba2, FFN). A layout is written with block names, ``*n`` repeats and parentheses::

    (AMF MF*7)*7 MF

Each block name expands to layer letters through a table that lives in the model preset (A =
attention, M = Mamba2, F = FFN), and each letter becomes one symbol of megatron-core's
``hybrid_override_pattern``: ``*`` attention, ``M`` Mamba2, ``E`` MoE FFN (``-`` when the FFNs are
dense).
"""

from __future__ import annotations

import re
from typing import Mapping

from megatron_ext.errors import ConfigError

_TOKEN = re.compile(r"\s*(?:(?P<open>\()|(?P<close>\))|(?P<name>[A-Za-z_]+)|\*(?P<repeat>\d+))")


def _parse(text: str, field: str) -> list:
    """Parse into a nested list of (item, repeat) where item is a block name or a sub-list."""
    pos, stack = 0, [[]]
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ConfigError(f"{field}: cannot read {text[pos:]!r} in {text!r}; write blocks like '(AMF MF*7)*7 MF'")
        pos = m.end()
        if m["open"]:
            stack.append([])
        elif m["close"]:
            if len(stack) == 1:
                raise ConfigError(f"{field}: unbalanced ')' in {text!r}")
            group = stack.pop()
            stack[-1].append([group, 1])
        elif m["name"]:
            stack[-1].append([m["name"], 1])
        else:
            if not stack[-1]:
                raise ConfigError(f"{field}: '*{m['repeat']}' must follow a block or a group in {text!r}")
            stack[-1][-1][1] *= int(m["repeat"])
    if len(stack) != 1:
        raise ConfigError(f"{field}: unbalanced '(' in {text!r}")
    return stack[0]


def _expand(items: list, block_types: Mapping[str, str], field: str) -> str:
    out = []
    for item, repeat in items:
        if isinstance(item, list):
            body = _expand(item, block_types, field)
        elif item in block_types:
            body = block_types[item]
        else:
            raise ConfigError(f"{field}: unknown block {item!r}; defined blocks are {sorted(block_types)}")
        out.append(body * repeat)
    return "".join(out)


def compile_layout(blocks: str, block_types: Mapping[str, str], moe: bool = True,
                   field: str = "model.hybrid_blocks") -> str:
    """Block layout -> megatron-core hybrid pattern (one symbol per layer)."""
    letters = _expand(_parse(blocks, field), block_types, field)
    table = {"A": "*", "M": "M", "F": "E" if moe else "-"}
    bad = sorted(set(letters) - set(table))
    if bad:
        raise ConfigError(f"model.hybrid_block_types: unknown layer letters {bad}; use A, M and F")
    return "".join(table[c] for c in letters)


def layer_pattern(model_cfg: Mapping) -> str:
    """The preset's block layout as a hybrid pattern, checked against ``num_layers``."""
    pattern = compile_layout(model_cfg["hybrid_blocks"], model_cfg["hybrid_block_types"],
                             moe=bool(model_cfg.get("num_moe_experts")))
    if len(pattern) != int(model_cfg["num_layers"]):
        raise ConfigError(
            f"model.num_layers={model_cfg['num_layers']} but model.hybrid_blocks compiles to "
            f"{len(pattern)} layers ({pattern}); make them agree"
        )
    return pattern


def layer_counts(pattern: str) -> dict[str, int]:
    return {
        "layers": len(pattern),
        "mamba": pattern.count("M"),
        "attention": pattern.count("*"),
        "ffn": pattern.count("E") + pattern.count("-"),
    }
