"""Per-step metrics: JSON lines always, TensorBoard event files when ``tensorboard`` is installed.

Only the global rank 0 writes. Appending (never truncating) keeps the history of a resumed stage in one
file; each record carries its step so a reader can de-duplicate steps replayed after a crash.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, directory: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._tb = None
        self._file = None
        if not enabled:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(directory / "tensorboard"))

    def write(self, step: int, values: dict[str, Any], split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{split}/{key}", value, step)
                elif isinstance(value, list):   # per-layer values: one curve per index
                    for i, v in enumerate(value):
                        self._tb.add_scalar(f"{split}/{key}/{i}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path, split: str = "train") -> list[dict]:
    """Records of one split, the last record winning for a step written twice (after a resume)."""
    by_step: dict[int, dict] = {}
    with Path(path).open() as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if record.get("split") == split:
                    by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]
