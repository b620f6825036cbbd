"""Data a stage samples from its parent before it trains (CoT fusion, deliberation): made once, kept.

Sampling is the expensive, random part of these stages, so its output is a file in the stage folder,
written before the first training step: a resumed attempt trains on exactly the data the first
attempt sampled (its weights have moved on, so it could not sample the same again), and the file is
there to inspect. Every rank samples its share (``Generator.generate_sharded``) and receives all of it;
rank 0 writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from megatron_ext import checkpointing
from megatron_ext.errors import ConfigError
from megatron_ext.stage import StageContext

Records = list[dict[str, Any]]


def write_jsonl(path: Path, records: Records) -> None:
    """Atomically (a temporary file, then rename): a crash leaves the old file or none."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> Records:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def sample_once(ctx: StageContext, chunks, folder: Path,
                produce: Callable[[], tuple[Records, dict[str, Any]]]) -> Records:
    """``folder/records.jsonl``, produced from the parent's weights on the first attempt.

    ``produce()`` runs on every rank with the parent's weights loaded into ``chunks`` and returns
    ``(records, summary)``; rank 0 writes ``summary.json`` and then ``records.jsonl`` (the marker of a
    finished sampling). Later attempts read the records back.
    """
    records_path = folder / "records.jsonl"
    if not records_path.exists():
        if checkpointing.latest_checkpoint(ctx.stage_dir / "checkpoints") is not None:
            raise ConfigError(
                f"stage {ctx.name!r}: {records_path} is missing but the stage has checkpoints, so the data "
                f"it trained on is lost; delete {ctx.stage_dir} to run the stage again")
        if not ctx.parent_checkpoint:
            raise ConfigError(
                f"stages.{ctx.name}: this stage samples from a trained model; give it a parent stage "
                f"in pipeline.order or set stages.{ctx.name}.init_from to a checkpoint")
        checkpointing.load(Path(ctx.parent_checkpoint), chunks)
        records, summary = produce()
        if ctx.env.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "summary.json").write_text(json.dumps(summary, indent=1))
            write_jsonl(records_path, records)
        if dist.is_initialized():
            dist.barrier()
    return read_jsonl(records_path)
