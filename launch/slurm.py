"""``cluster=slurm``: one sbatch script per job of the pipeline, submitted as a dependency chain.

The scripts are plain files under ``<run_dir>/slurm/`` (readable, re-submittable by hand): a data job,
one job per unfinished stage and a report job, each ``--dependency=afterok`` on the one before. A stage job runs
``srun --ntasks-per-node=1 python -m launch.pipeline_jobs stage ...``: one launcher per node, which
starts that node's ranks with torchrun. Preemption and time limits: ``--signal`` warns the job before
its limit, the ranks save and exit 75, and the script requeues the job (``--requeue``); the restart
resumes from the latest checkpoint and appends to the same log (``--open-mode=append``).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from launch.pipeline_jobs import REPO_ROOT, log, plan_stage, stage_index, write_pipeline
from megatron_ext.errors import ConfigError
from megatron_ext.fault_tolerance import PREEMPTED_EXIT_CODE
from megatron_ext.stage import stage_dir

JOBS_FILE = "jobs.json"
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT"}


@dataclass(frozen=True)
class SlurmJob:
    """One batch job: what it runs and what it asks for."""
    name: str          # "data" or the stage name
    label: str         # file stem, e.g. "03_long_context"
    args: list[str]    # arguments of `python -m launch.pipeline_jobs`
    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    time: str
    log: Path


def _jobs(run_dir: Path, cfg: DictConfig, stages: list[str]) -> list[SlurmJob]:
    cl = cfg.cluster
    data = SlurmJob("data", "00_data", ["data", str(run_dir)], 1, 0, int(cl.data_job.cpus_per_task),
                    str(cl.data_job.time), run_dir / "logs" / "slurm-data-%j.out")
    jobs = [data]
    for name in stages:
        sdir = stage_dir(run_dir, stage_index(cfg, name), name)
        jobs.append(SlurmJob(name, sdir.name, ["stage", str(run_dir), name], int(cfg.parallel.get("nnodes", 1)),
                             int(cl.gpus_per_node), int(cl.cpus_per_task), str(cl.time),
                             sdir / "logs" / "slurm-%j.out"))
    jobs.append(SlurmJob("report", "99_report", ["report", str(run_dir)], 1, 0, 1, str(cl.data_job.time),
                         run_dir / "logs" / "slurm-report-%j.out"))
    return jobs


def render_script(job: SlurmJob, cfg: DictConfig) -> str:
    """The sbatch script of one job (a plain bash file; every choice is in its #SBATCH header)."""
    cl = cfg.cluster
    run_name = Path(cfg.run_dir).name
    opts = [f"--job-name=tl-{run_name}-{job.name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
            f"--cpus-per-task={job.cpus_per_task}", f"--time={job.time}", f"--output={job.log}",
            "--open-mode=append", f"--signal=USR1@{int(cl.preempt_warning_s)}"]
    if job.gpus_per_node:
        opts.append(f"--gpus-per-node={job.gpus_per_node}")
    for key in ("partition", "account", "qos", "mem"):
        if cl.get(key) is not None:
            opts.append(f"--{key}={cl[key]}")
    if cl.requeue:
        opts.append("--requeue")
    if cl.exclusive and job.args[0] == "stage":   # data and report jobs share a node
        opts.append("--exclusive")
    opts += [str(o) for o in cl.sbatch_extra]

    workdir = str(cl.container.workdir or REPO_ROOT)
    python = str(cl.python or ("python" if cl.container.image else sys.executable))
    srun = ["srun", "--ntasks-per-node=1", f"--cpus-per-task={job.cpus_per_task}", "--kill-on-bad-exit=1"]
    if cl.container.image:
        srun += [f"--container-image={cl.container.image}", f"--container-workdir={workdir}"]
        if cl.container.mounts:
            srun.append("--container-mounts=" + ",".join(str(m) for m in cl.container.mounts))
    command = srun + [python, "-m", "launch.pipeline_jobs", *job.args]
    env = {str(k): str(v) for k, v in (cl.env or {}).items()}

    lines = ["#!/bin/bash", f"# TurboLaser {run_name}: {job.label} (written by `python -m launch cluster=slurm`)"]
    lines += [f"#SBATCH {o}" for o in opts]
    lines += ["", "set -u", f"cd {shlex.quote(workdir)}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines += [
        'echo "[turbolaser] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST} '
        'at $(date -Is)"',
        " ".join(shlex.quote(c) for c in command),
        "rc=$?",
        f"if [ $rc -eq {PREEMPTED_EXIT_CODE} ]; then",
        '    echo "[turbolaser] preempted: checkpoint saved; requeueing job ${SLURM_JOB_ID}"',
        '    scontrol requeue "${SLURM_JOB_ID}"',
        "fi",
        "exit $rc",
        "",
    ]
    return "\n".join(lines)


def _sbatch(script: Path, after: int | None) -> int:
    cmd = ["sbatch", "--parsable", "--kill-on-invalid-dep=yes"]
    if after is not None:
        cmd.append(f"--dependency=afterok:{after}")
    try:
        out = subprocess.run(cmd + [str(script)], capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise ConfigError("cluster=slurm needs `sbatch` on PATH: run on a SLURM login node, or use "
                          "cluster=local") from None
    except subprocess.CalledProcessError as err:
        raise ConfigError(f"sbatch refused {script}: {err.stderr.strip()}. Check cluster.partition / "
                          f"cluster.account / cluster.time against `sinfo`") from None
    return int(out.strip().split(";")[0])


def active_jobs(run_dir: Path) -> dict[str, int]:
    """Jobs of this run's last submission that are still queued or running (per squeue)."""
    path = run_dir / "slurm" / JOBS_FILE
    if not path.exists():
        return {}
    jobs = json.loads(path.read_text())
    ids = ",".join(str(j) for j in jobs.values())
    try:
        out = subprocess.run(["squeue", "--noheader", "--format=%i %T", f"--jobs={ids}"],
                             capture_output=True, text=True).stdout
    except FileNotFoundError:
        return {}
    states = dict(line.split() for line in out.splitlines() if line.strip())
    return {name: j for name, j in jobs.items() if states.get(str(j)) in ACTIVE_STATES}


def unfinished_stages(run_dir: Path, cfg: DictConfig, write: bool) -> list[str]:
    """Stages still to run, checking finished ones against the config now rather than in the queue."""
    order = list(cfg.pipeline.order)
    for i, name in enumerate(order):
        if plan_stage(run_dir, cfg, name, write=write).done is None:
            return order[i:]
    return []


def submit_pipeline(cfg: DictConfig, dry_run: bool = False) -> dict[str, int]:
    """Write the scripts and submit the chain (or print them); returns {job name: job id}."""
    run_dir = Path(cfg.run_dir).resolve()
    if not dry_run:
        busy = active_jobs(run_dir)
        if busy:
            raise ConfigError(f"{run_dir} already has queued or running jobs "
                              f"({', '.join(f'{n} {j}' for n, j in busy.items())}): wait for them or "
                              f"`scancel {' '.join(map(str, busy.values()))}` before submitting again")
        write_pipeline(cfg)
    stages = unfinished_stages(run_dir, cfg, write=not dry_run) if (run_dir / "pipeline.yaml").exists() \
        else list(cfg.pipeline.order)
    if not stages:
        log(f"{run_dir}: every stage is complete; nothing to submit")
        return {}
    jobs = _jobs(run_dir, cfg, stages)
    if dry_run:
        for job in jobs:
            print(f"# ---- {run_dir / 'slurm' / (job.label + '.sbatch')} ----")
            print(render_script(job, cfg))
        return {}
    ids: dict[str, int] = {}
    previous = None
    for job in jobs:
        script = run_dir / "slurm" / f"{job.label}.sbatch"
        script.parent.mkdir(parents=True, exist_ok=True)
        job.log.parent.mkdir(parents=True, exist_ok=True)   # sbatch cannot create the log's folder
        script.write_text(render_script(job, cfg))
        previous = ids[job.name] = _sbatch(script, previous)
        log(f"submitted {job.label}: job {previous}" + (f" (after {list(ids)[-2]})" if len(ids) > 1 else ""))
    (run_dir / "slurm" / JOBS_FILE).write_text(json.dumps(ids, indent=1) + "\n")
    log(f"job ids in {run_dir / 'slurm' / JOBS_FILE}; logs in each stage's logs/slurm-<job>.out; "
        f"watch with `squeue --me`, report with `python -m launch report {run_dir}`")
    return ids

