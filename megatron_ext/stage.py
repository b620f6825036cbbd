"""The contract between the pipeline runner and a stage.

A stage module (``pretrain.pretrain_stage``, later the post-training stages) exposes
``run(ctx: StageContext) -> StageResult``. It is called on every rank of the stage's torchrun job
after the process groups exist; rank 0 records the result in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from megatron_ext.distributed import DistEnv


@dataclass
class StageContext:
    name: str
    cfg: Any                      # the full resolved config (OmegaConf DictConfig)
    stage_dir: Path
    parent_checkpoint: str | None
    env: DistEnv
    # called by the stage after each checkpoint (rank 0 updates the running manifest)
    on_checkpoint: Callable[[int, int], None] = lambda steps, tokens: None
    # metrics to keep in the manifest even if a later attempt resumes (rank 0 writes)
    record_metrics: Callable[[dict], None] = lambda metrics: None

    @property
    def stage_cfg(self):
        return self.cfg.stages[self.name]

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)


@dataclass
class StageResult:
    checkpoint: Path              # the final checkpoint folder
    steps: int
    tokens_seen: int
    final_metrics: dict[str, Any]
    data_fingerprint: str | None
    extra: dict[str, Any] = field(default_factory=dict)
