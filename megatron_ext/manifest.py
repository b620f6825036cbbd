"""``manifest.json``: the record every stage leaves beside its checkpoint.

One format for every stage, so the runner can chain any of them. Fields:

- ``stage``, ``kind``, ``status`` (``running`` | ``complete``)
- ``parent_checkpoint``: what the stage started from (absolute path or null)
- ``checkpoint``: the final checkpoint, relative to the stage folder
- ``config``: the resolved config that identifies the stage (see :func:`stage_identity`)
- ``git_commit``, ``data_fingerprint``, ``steps``, ``tokens_seen``, ``final_metrics``
- ``wall_time_s``: summed over all attempts; ``attempts``: one entry per start, with
  ``resumed_from_step`` when it continued from a checkpoint of an earlier attempt.

Writes are atomic (temp file + ``os.replace``) so a kill never leaves half a manifest.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
RUNNING = "running"
COMPLETE = "complete"


def git_commit() -> str:
    """The commit of the code that ran, with ``-dirty`` when the work tree had changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def read(stage_dir: Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / MANIFEST_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write(stage_dir: Path, manifest: dict[str, Any]) -> None:
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, stage_dir / MANIFEST_FILE)


def begin_attempt(stage_dir: Path, stage: str, kind: str, config: dict, parent_checkpoint: str | None,
                  resumed_from_step: int | None) -> dict[str, Any]:
    """Create the manifest (first attempt) or add an attempt to it (a resume)."""
    manifest = read(stage_dir) or {
        "stage": stage,
        "kind": kind,
        "status": RUNNING,
        "parent_checkpoint": parent_checkpoint,
        "checkpoint": None,
        "config": config,
        "git_commit": None,
        "data_fingerprint": None,
        "steps": 0,
        "tokens_seen": 0,
        "final_metrics": {},
        "wall_time_s": 0.0,
        "attempts": [],
    }
    assert manifest["status"] != COMPLETE, f"{stage_dir}: a finished stage is never re-run"
    manifest["git_commit"] = git_commit()
    manifest["attempts"].append(
        {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from_step": resumed_from_step}
    )
    write(stage_dir, manifest)
    return manifest


def record_progress(stage_dir: Path, steps: int, tokens_seen: int, elapsed_s: float) -> None:
    """Update the running manifest after a checkpoint so a crash still shows how far it got."""
    manifest = read(stage_dir)
    manifest["steps"] = steps
    manifest["tokens_seen"] = tokens_seen
    manifest["attempts"][-1]["elapsed_s"] = round(elapsed_s, 3)
    write(stage_dir, manifest)


def end_attempt(stage_dir: Path, outcome: str, step: int, detail: str, elapsed_s: float) -> None:
    """Record why an attempt stopped early (``preempted`` or ``diverged``)."""
    manifest = read(stage_dir)
    manifest["attempts"][-1].update(ended=outcome, at_step=step, detail=detail, elapsed_s=round(elapsed_s, 3))
    write(stage_dir, manifest)


def record_metrics(stage_dir: Path, metrics: dict) -> None:
    manifest = read(stage_dir)
    manifest["final_metrics"] = {**manifest.get("final_metrics", {}), **metrics}
    write(stage_dir, manifest)


def complete(stage_dir: Path, checkpoint: str, steps: int, tokens_seen: int, final_metrics: dict,
             data_fingerprint: str | None, elapsed_s: float, extra: dict | None = None) -> dict:
    manifest = read(stage_dir)
    manifest["attempts"][-1]["elapsed_s"] = round(elapsed_s, 3)
    manifest.update(
        status=COMPLETE,
        checkpoint=checkpoint,
        steps=steps,
        tokens_seen=tokens_seen,
        final_metrics={**manifest.get("final_metrics", {}), **final_metrics},
        data_fingerprint=data_fingerprint,
        wall_time_s=round(sum(a.get("elapsed_s", 0.0) for a in manifest["attempts"]), 3),
        **(extra or {}),
    )
    write(stage_dir, manifest)
    return manifest


def stage_identity(cfg: dict, stage_name: str, parent_checkpoint: str | None) -> dict:
    """What makes two runs of a stage "the same": not the parallel layout or cluster (checkpoints
    reshard), but the model, data, seed, the stage's own settings and where it starts from."""
    return {
        "model": cfg["model"],
        "data": cfg["data"],
        "seed": cfg["seed"],
        "stage": cfg["stages"][stage_name],
        "parent_checkpoint": parent_checkpoint,
    }
