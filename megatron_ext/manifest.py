"""``manifest.json``: the record every stage leaves beside its checkpoint.

One format for every stage, so the runner can chain any of them. Fields:

- ``stage``, ``kind``, ``status`` (``running`` | ``complete``)
- ``parent_checkpoint``: what the stage started from (a path, see below, or null)
- ``checkpoint``: the final checkpoint, relative to the stage folder
- ``config``: the resolved config that identifies the stage (see :func:`stage_identity`)
- ``git_commit``, ``data_fingerprint``, ``steps``, ``tokens_seen``, ``final_metrics``
- ``wall_time_s``: summed over all attempts; ``attempts``: one entry per start, with
  ``resumed_from_step`` when it continued from a checkpoint of an earlier attempt.

Paths inside the run folder (the stage folder's parent) are stored relative to it, wherever they
appear in the manifest (:func:`relocatable`): clusters purge scratch, so runs get moved or copied,
and a moved run must still be the same run. Paths outside it (a corpus, an ``init_from`` checkpoint
elsewhere) stay absolute. :func:`resolve_in` turns a stored path back into a usable one; manifests
written before this hold absolute paths, which it returns as they are.

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


def relative_in(path: str | os.PathLike | None, folder: str | os.PathLike) -> str | None:
    """``path`` as a folder that may move stores it: relative to ``folder`` (``"."`` for the folder
    itself) when it is an absolute path inside it; anything else as it is (an absolute path outside,
    a path already relative to ``folder``, None)."""
    if path is None or not os.path.isabs(path):
        return None if path is None else os.fspath(path)
    path = os.path.abspath(path)
    for root in dict.fromkeys((os.path.abspath(folder), os.path.realpath(folder))):  # /tmp may be a link
        if os.path.commonpath((path, root)) == root:
            return Path(os.path.relpath(path, root)).as_posix()
    return path


def resolve_in(path: str | os.PathLike | None, folder: str | os.PathLike) -> str | None:
    """The inverse of :func:`relative_in`: a stored path made usable again (a relative one is
    relative to ``folder``, wherever that is now; an absolute one is returned as it is)."""
    if path is None:
        return None
    return os.path.normpath(os.path.join(folder, path))


def relocatable(value: Any, folder: str | os.PathLike) -> Any:
    """``value`` (nested dicts / lists, e.g. a manifest or a resolved config) with every absolute path
    inside ``folder`` made relative to it (:func:`relative_in`): the form that does not change when
    the folder moves. Relative strings are left alone, so this is idempotent."""
    if isinstance(value, dict):
        return {k: relocatable(v, folder) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [relocatable(v, folder) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return relative_in(value, folder)
    return value


def read(stage_dir: Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / MANIFEST_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write(stage_dir: Path, manifest: dict[str, Any]) -> None:
    """Write atomically, paths inside the run folder (``stage_dir``'s parent) relative to it."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / (MANIFEST_FILE + ".tmp")
    stored = relocatable(json.loads(json.dumps(manifest, default=str)), stage_dir.parent)
    tmp.write_text(json.dumps(stored, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, stage_dir / MANIFEST_FILE)


def begin_attempt(stage_dir: Path, stage: str, kind: str, config: dict, parent_checkpoint: str | None,
                  resumed_from_step: int | None, process: dict | None = None) -> dict[str, Any]:
    """Create the manifest (first attempt) or add an attempt to it (a resume). ``process``: where the
    attempt runs (host, pid, whether it was forked: launch.stage_forks)."""
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
        {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from_step": resumed_from_step,
         **({"process": process} if process else {})}
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


def stage_identity(cfg: dict, stage_name: str, parent_checkpoint: str | None,
                   run_dir: str | os.PathLike) -> dict:
    """What makes two runs of a stage "the same": not the parallel layout or cluster (checkpoints
    reshard), but the model, data, seed, the stage's own settings and where it starts from. Paths
    inside the run folder count relative to it (:func:`relocatable`), so a moved run is the same run."""
    return relocatable({
        "model": cfg["model"],
        "data": cfg["data"],
        "seed": cfg["seed"],
        "stage": cfg["stages"][stage_name],
        "parent_checkpoint": parent_checkpoint,
    }, run_dir)


def recorded_identity(manifest: dict, stage_name: str, run_dir: str | os.PathLike) -> dict:
    """The :func:`stage_identity` a manifest records. One written before paths were stored relative
    holds absolute paths into the folder the run was in then, which its config names when its
    ``run_dir`` was absolute: those count relative to that folder, so such a run may move too."""
    config = manifest["config"]
    identity = stage_identity(config, stage_name, manifest["parent_checkpoint"], run_dir)
    then = config.get("run_dir")
    return relocatable(identity, then) if isinstance(then, str) and os.path.isabs(then) else identity
