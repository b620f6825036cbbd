"""One rank of one stage: ``torchrun ... -m launch.stage_worker <stage_dir>``, or for a single-process
stage ``python -m launch.stage_worker <stage_dir>`` with torchrun's variables set by the launcher
(``launch.pipeline_jobs.stage_command``).

Reads the resolved config the runner wrote to ``<stage_dir>/config.yaml`` (paths inside the run
folder, the stage folder's parent, relative to it), starts the process groups, runs the stage, and
(rank 0) keeps the manifest: an attempt entry at start (noting the step it resumes from), progress
after every checkpoint, the result at the end.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
import time
from pathlib import Path

from megatron_ext.quiet import quiet_known_warnings


def main(stage_dir: str) -> int:
    quiet_known_warnings()
    from omegaconf import OmegaConf

    from launch import stage_forks
    from launch.stages import STAGE_KINDS
    from megatron_ext import checkpointing, distributed, manifest
    from megatron_ext.errors import ConfigError
    from megatron_ext.fault_tolerance import PREEMPTED_EXIT_CODE, Preempted, TrainingDiverged
    from megatron_ext.stage import StageContext, stage_parallel_config

    stage_dir = Path(stage_dir).resolve()
    run_dir = stage_dir.parent
    run_cfg = OmegaConf.load(stage_dir / "config.yaml")
    name = run_cfg.stage_name
    parent = manifest.resolve_in(run_cfg.parent_checkpoint, run_dir)
    cfg = run_cfg.config
    cfg.run_dir = str(run_dir)   # the run folder is where this stage folder is now
    cfg.parallel = stage_parallel_config(cfg, name)   # the stage's layout (e.g. context parallel or not)
    env = distributed.initialize(cfg.parallel, int(cfg.seed))
    t0 = time.perf_counter()

    if env.is_main:
        latest = checkpointing.latest_checkpoint(stage_dir / "checkpoints")
        resumed_from = int(latest.name.split("_")[-1]) if latest is not None else None
        process = {"host": socket.gethostname(), "pid": os.getpid(),
                   "forked": os.environ.get(stage_forks.FORKED_ENV) == "1"}
        manifest.begin_attempt(stage_dir, name, cfg.stages[name].kind,
                               OmegaConf.to_container(cfg, resolve=True), parent, resumed_from, process)
        if env.world_size > 1:
            print(f"[{name}] layout: TP{env.tp} x PP{env.pp} x CP{env.cp} x DP{env.dp}, EP{env.ep} "
                  f"({env.world_size} processes)", flush=True)
        if resumed_from is not None:
            print(f"[{name}] resuming from {latest}", flush=True)

    def on_checkpoint(steps: int, tokens: int) -> None:
        if env.is_main:
            manifest.record_progress(stage_dir, steps, tokens, time.perf_counter() - t0)

    def record_metrics(metrics: dict) -> None:
        if env.is_main:
            manifest.record_metrics(stage_dir, metrics)

    ctx = StageContext(name=name, cfg=cfg, stage_dir=stage_dir, parent_checkpoint=parent, env=env,
                       on_checkpoint=on_checkpoint, record_metrics=record_metrics)
    stage_module = importlib.import_module(STAGE_KINDS[cfg.stages[name].kind])
    try:
        result = stage_module.run(ctx)
    except Preempted as stop:
        if env.is_main:
            manifest.end_attempt(stage_dir, "preempted", stop.step, str(stop), time.perf_counter() - t0)
            print(f"[{name}] {stop}; exiting with code {PREEMPTED_EXIT_CODE} (requeue to resume)", flush=True)
        distributed.destroy()
        return PREEMPTED_EXIT_CODE
    except ConfigError as err:  # e.g. resuming under an incompatible layout: the message says what to do
        if env.is_main:
            print(f"config error: {err}", flush=True)
        distributed.destroy()
        return 2
    except TrainingDiverged as stop:
        if env.is_main:
            manifest.end_attempt(stage_dir, "diverged", -1, str(stop), time.perf_counter() - t0)
            print(f"[{name}] {stop}", flush=True)
        distributed.destroy()
        return 1
    if env.is_main:
        manifest.complete(
            stage_dir,
            checkpoint=str(Path(result.checkpoint).relative_to(stage_dir)),
            steps=result.steps,
            tokens_seen=result.tokens_seen,
            final_metrics=result.final_metrics,
            data_fingerprint=result.data_fingerprint,
            elapsed_s=time.perf_counter() - t0,
            extra=result.extra,
        )
    distributed.destroy()
    return 0


if __name__ == "__main__":  # guarded: dist_checkpointing's writer re-imports __main__
    sys.exit(main(sys.argv[1]))
