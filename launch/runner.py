"""The local pipeline runner: prepares data once, runs ``pipeline.order`` stage by stage, then
writes ``summary.txt`` and ``report.md``.

Each stage runs as its own job (torchrun, or one worker process for a single rank) in ``<run_dir>/<NN>_<stage>/`` and hands its final checkpoint
to the next. Re-running the same command skips stages whose manifest says ``complete`` and resumes an
unfinished one from its latest checkpoint. A finished stage is never re-run or overwritten: if the
config that defines it changed, the runner stops and says what changed.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from omegaconf import DictConfig

from launch import stage_forks
from launch.pipeline_jobs import (StageFailed, StagePreempted, finish, log, prepare, rendezvous, run_stage,
                                  single_process, stage_command, worker_env, write_pipeline)
from megatron_ext import manifest
from megatron_ext.quiet import quiet_known_warnings
from megatron_ext.stage import stage_dir

__all__ = ["StageFailed", "StagePreempted", "describe_pipeline", "run_pipeline"]


def run_pipeline(cfg: DictConfig) -> list[dict]:
    """Run (or resume) every stage of ``cfg.pipeline.order`` on this machine; returns their manifests."""
    quiet_known_warnings()
    run_dir = write_pipeline(cfg)
    log(f"run folder {run_dir}")
    if cfg.cluster.get("fork_stages", False) and single_process(cfg.parallel, rendezvous(cfg.parallel, cfg.cluster)):
        stage_forks.start_server(worker_env(cfg.parallel, cfg.cluster))   # imports while the data is prepared
    prepare(run_dir, cfg)
    for name in cfg.pipeline.order:
        run_stage(run_dir, cfg, name)
    return finish(run_dir, cfg)


def describe_pipeline(cfg: DictConfig) -> None:
    """``--dry-run``: what each stage would do and the command it would get; writes nothing."""
    run_dir = Path(cfg.run_dir).resolve()
    print(f"run folder {run_dir}\ndata: prepared into {run_dir / 'data'} (reused when already prepared)")
    for index, name in enumerate(cfg.pipeline.order):
        sdir = stage_dir(run_dir, index, name)
        existing = manifest.read(sdir)
        state = ("complete: skipped" if existing and existing["status"] == manifest.COMPLETE
                 else "unfinished: resumes" if existing else "starts")
        cmd = stage_command(sdir, cfg.parallel, cfg.cluster, rendezvous(cfg.parallel, cfg.cluster))
        print(f"{sdir.name} ({cfg.stages[name].kind}, {state}): {shlex.join(cmd)}")
