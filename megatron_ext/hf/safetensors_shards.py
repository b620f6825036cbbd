"""Hugging Face weight folders: ``model-0000i-of-0000N.safetensors`` shards plus their index.

Written and read a few tensors at a time: :class:`ShardWriter` holds at most one shard in memory
(the shard count is only known at the end, so shards get their final names when it closes);
:class:`SafetensorsFolder` memory-maps the files and returns only the tensors asked for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def parse_size(size: str | int) -> int:
    """``"2GB"`` / ``"500MB"`` / bytes -> bytes (powers of 1000, as ``transformers`` counts)."""
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    text = str(size).strip().upper()
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


class ShardWriter:
    """Collects tensors and writes a shard whenever the next tensor would push it past ``max_bytes``."""

    def __init__(self, folder: Path, max_bytes: int):
        from safetensors.torch import save_file

        self._save = save_file
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self._pending and self._pending_bytes + size > self.max_bytes:
                self._flush()
            self._pending[name] = tensor.detach().contiguous()
            self._pending_bytes += size
            self.total_bytes += size

    def _flush(self) -> None:
        self._save(self._pending, str(self.folder / f".shard-{len(self._shards):05d}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> dict[str, str]:
        """Name the shards, write the index; returns the weight map {tensor: file}."""
        if self._pending:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f".shard-{i:05d}.tmp", self.folder / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map


class SafetensorsFolder:
    """The tensors of a Hugging Face folder, read by name (memory-mapped, one at a time)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.exists():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE_FILE).exists():
            from safetensors import safe_open

            with safe_open(str(self.folder / SINGLE_FILE), framework="pt") as f:
                self.weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            from megatron_ext.errors import ConfigError

            raise ConfigError(f"{folder} has neither {INDEX_FILE} nor {SINGLE_FILE}: pass a Hugging Face model "
                              f"folder with safetensors weights (convert .bin weights with transformers first)")

    def get(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        from megatron_ext.errors import ConfigError

        names = list(names)
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise ConfigError(f"{self.folder} lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                              f"its config.json does not match its weights")
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        for file, file_names in by_file.items():
            with safe_open(str(self.folder / file), framework="pt") as f:
                out.update({n: f.get_tensor(n) for n in file_names})
        return out
