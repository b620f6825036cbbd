"""``cluster=nemo_local`` / ``cluster=nemo_slurm``: the pipeline's jobs as one nemo-run Experiment.

One task per job of the run folder (``launch/pipeline_jobs.py``): ``00_data``, then each unfinished
stage (``01_pretrain``, ...), then ``99_report``, each depending on the one before. A task is a
``run.Partial`` of :func:`run_pipeline_job`, which calls :func:`launch.pipeline_jobs.run_job` and turns
its exit code into the process's (nemo-run ignores return values).

Executors come from ``cfg.cluster``: ``executor: local`` runs the tasks on this machine one after the
other (attached; a failed task fails the launch); ``executor: slurm`` submits one sbatch job per task
through nemo-run's ``SlurmExecutor`` with ``--dependency=afterok`` on the previous one, from this
checkout (``run.Packager()``, no git archive; the run folder and the checkout must be on a file system
the nodes share). nemo-run's state, sbatch scripts and task logs go under ``<run_dir>/nemorun``.

Preemption under Slurm: ``--signal=USR1@preempt_warning_s`` warns the stage, which saves and exits 75;
:func:`run_pipeline_job` then requeues its own job (``scontrol requeue``), which resumes from the
checkpoint, as the scripts of ``cluster=slurm`` do.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from launch.pipeline_jobs import REPO_ROOT, StageFailed, log, stage_index, write_pipeline
from megatron_ext.errors import ConfigError
from megatron_ext.fault_tolerance import PREEMPTED_EXIT_CODE
from megatron_ext.stage import stage_dir

# under the run folder: experiments, sbatch scripts, task logs. Not "nemo_run": nemo-run rewrites every
# "/nemo_run" in a container-less sbatch script (its in-container mount point) to the task's folder.
NEMO_RUN_DIR = "nemorun"
JOBS_FILE = "jobs.json"     # {task: Slurm job id} of the last submission
_RUNDIR_MARK = "/nemo_run"


class TasksFailed(StageFailed):
    """Tasks of an attached (local) experiment that did not succeed."""

    def __init__(self, failed: dict[str, str], exp_dir: str):
        RuntimeError.__init__(self, f"nemo-run tasks did not succeed: {failed}; their logs are under "
                                    f"{exp_dir}/<task>/. Re-running the same command resumes.")
        self.stage, self.returncode, self.log = next(iter(failed)), 1, Path(exp_dir)


def nemo_run_home(run_dir: Path) -> Path:
    return run_dir / NEMO_RUN_DIR


def _import_nemo_run(run_dir: Path):
    """nemo-run reads NEMORUN_HOME when its modules are imported (job registries such as
    ``.local_jobs.json``): point it into the run folder first unless the user set it."""
    os.environ.setdefault("NEMORUN_HOME", str(nemo_run_home(run_dir)))
    try:
        import nemo_run as run
    except ImportError as err:
        raise ConfigError(f"cluster.name=nemo_run needs nemo-run (`pip install nemo_run`): {err}") from None
    return run


# ---- what each task runs -------------------------------------------------------------------------

def run_pipeline_job(job: str, run_dir: str, stage: str | None = None) -> None:
    """A nemo-run task: one job of the run folder. Exits non-zero unless the job is done; a preempted
    stage inside a Slurm job requeues that job (from its first node) so it resumes from its checkpoint."""
    from launch.pipeline_jobs import run_job

    code = run_job(job, run_dir, stage)
    if code == PREEMPTED_EXIT_CODE:
        job_id = os.environ.get("SLURM_JOB_ID")
        if job_id and os.environ.get("SLURM_NODEID", "0") == "0":
            print(f"[turbolaser] preempted: checkpoint saved; requeueing job {job_id}", flush=True)
            subprocess.run(["scontrol", "requeue", job_id], check=False)
        elif not job_id:
            print("[turbolaser] preempted: re-run the same command to resume from the checkpoint",
                  file=sys.stderr, flush=True)
    if code != 0:
        raise SystemExit(code)


# ---- the task list -------------------------------------------------------------------------------

def _unfinished_stages(run_dir: Path, cfg: DictConfig, write: bool) -> list[str]:
    from launch.slurm import unfinished_stages

    if not (run_dir / "pipeline.yaml").exists():   # a dry run of a new run folder
        return list(cfg.pipeline.order)
    return unfinished_stages(run_dir, cfg, write=write)


def pipeline_tasks(run_dir: Path, cfg: DictConfig, write: bool = True) -> list[tuple[str, str, list[str]]]:
    """``(task name, job, run_job arguments)`` for the data job, each unfinished stage and the report;
    stages already complete (under this config) are left out."""
    stages = _unfinished_stages(run_dir, cfg, write)
    tasks = [("00_data", "data", [str(run_dir)])]
    for name in stages:
        label = stage_dir(run_dir, stage_index(cfg, name), name).name
        tasks.append((label, "stage", [str(run_dir), name]))
    tasks.append(("99_report", "report", [str(run_dir)]))
    return tasks


# ---- executors from cfg.cluster ------------------------------------------------------------------

def _python_bin(cl: DictConfig) -> str:
    """The folder of the interpreter tasks start with (nemo-run runs the ``python`` on PATH)."""
    return str(Path(cl.get("python") or sys.executable).parent)


def _pythonpath(workdir: str) -> str:
    return os.pathsep.join(p for p in (workdir, os.environ.get("PYTHONPATH")) if p)


def _local_executor(run, cl: DictConfig):
    path = os.pathsep.join([_python_bin(cl), os.environ.get("PATH", "")])
    return run.LocalExecutor(env_vars={"PATH": path, "PYTHONPATH": _pythonpath(str(REPO_ROOT)),
                                       "PYTHONUNBUFFERED": "1"})


def _sbatch_extra(options) -> dict[str, Any]:
    """``cluster.sbatch_extra`` (``--key=value`` / ``--flag``) as nemo-run's additional_parameters."""
    extra: dict[str, Any] = {}
    for opt in options or []:
        key, sep, value = str(opt).lstrip("-").partition("=")
        extra[key.replace("-", "_")] = value if sep else True
    return extra


def _slurm_executor(run, cfg: DictConfig, run_dir: Path, job: str):
    cl = cfg.cluster
    stage = job == "stage"
    image = cl.container.image
    workdir = str(cl.container.workdir or REPO_ROOT)
    env = {str(k): str(v) for k, v in (cl.env or {}).items()}
    env["PYTHONPATH"] = _pythonpath(workdir)
    if not image:   # tasks start `python`: the launcher's interpreter (shared file system) unless set
        env["PATH"] = f"{_python_bin(cl)}:$PATH"   # nemo-run writes `export K=V` unquoted
    extra = {"kill_on_invalid_dep": "yes"}   # a failed parent cancels its dependants
    if cl.requeue:
        extra["requeue"] = True
    extra.update(_sbatch_extra(cl.sbatch_extra))
    gpus = int(cl.gpus_per_node or 0) if stage else 0
    cpus = int(cl.cpus_per_task if stage else cl.data_job.cpus_per_task if job == "data" else 1)
    return run.SlurmExecutor(
        account=cl.account,
        partition=cl.partition,
        qos=cl.qos,
        job_name_prefix=f"tl-{Path(cfg.run_dir).name}-",
        nodes=int(cfg.parallel.get("nnodes", 1)) if stage else 1,
        ntasks_per_node=1,
        gpus_per_node=gpus or None,
        cpus_per_task=cpus,
        srun_args=[f"--cpus-per-task={cpus}"],   # srun (22.05+) does not inherit it from sbatch
        time=str(cl.time if stage else cl.data_job.time),
        mem=None if cl.mem is None else str(cl.mem),
        exclusive=True if stage and cl.exclusive else None,
        signal=f"USR1@{int(cl.preempt_warning_s)}",
        open_mode="append",
        container_image=image or None,
        container_mounts=[str(m) for m in cl.container.mounts] if image else [],
        env_vars=env,
        additional_parameters=extra,
        packager=run.Packager(),
        tunnel=run.LocalTunnel(job_dir=str(nemo_run_home(run_dir) / "experiments")),
        poll_estimated_start_time=False,
    )


def _check_paths(cfg: DictConfig, run_dir: Path) -> None:
    cl = cfg.cluster
    if cl.executor == "slurm" and not cl.container.image and \
            _RUNDIR_MARK in f"{run_dir}{os.pathsep}{REPO_ROOT}{os.pathsep}{_python_bin(cl)}":
        raise ConfigError(f"run_dir={run_dir} (or the checkout {REPO_ROOT}, or the interpreter) contains "
                          f"{_RUNDIR_MARK!r}, which nemo-run's Slurm scripts replace by the task folder: "
                          f"choose paths without it")


def _executor(run, cfg: DictConfig, run_dir: Path, job: str):
    if cfg.cluster.executor == "local":
        return _local_executor(run, cfg.cluster)
    return _slurm_executor(run, cfg, run_dir, job)


# ---- the experiment ------------------------------------------------------------------------------

def build_experiment(cfg: DictConfig, run_dir: Path, write: bool = True):
    """The Experiment (entered: nemo-run only accepts ``add`` / ``run`` inside its context) with one
    task per job, each depending on the one before. The caller exits the context."""
    _check_paths(cfg, run_dir)
    run = _import_nemo_run(run_dir)
    exp = run.Experiment(f"tl-{run_dir.name}", base_dir=str(nemo_run_home(run_dir)),
                         log_level="WARN", enable_goodbye_message=False,
                         skip_status_at_exit=cfg.cluster.executor == "local")
    exp.__enter__()
    try:
        previous: str | None = None
        for name, job, args in pipeline_tasks(run_dir, cfg, write=write):
            task = run.Partial(run_pipeline_job, job, *args)
            previous = exp.add(task, executor=_executor(run, cfg, run_dir, job), name=name,
                               dependencies=[previous] if previous else None)
    except BaseException:
        exp.__exit__(None, None, None)
        raise
    return exp


def failed_tasks(exp) -> dict[str, str]:
    """Tasks of an attached run that did not succeed: {task: state}."""
    from torchx.specs import AppState

    return {job.id: job.state.name for job in exp.jobs if job.state != AppState.SUCCEEDED}


def run_experiment(cfg: DictConfig, dry_run: bool = False) -> None:
    run_dir = Path(cfg.run_dir).resolve()
    _check_paths(cfg, run_dir)
    if not dry_run:
        write_pipeline(cfg)
    local = cfg.cluster.executor == "local"
    if not dry_run and not _unfinished_stages(run_dir, cfg, write=False):
        log(f"{run_dir}: every stage is complete; nothing to run")
        return
    exp = build_experiment(cfg, run_dir, write=not dry_run)
    logging.getLogger("pipeline").setLevel(logging.INFO)   # nemo-run sets the root logger to WARN
    try:
        if dry_run:
            _dry_run(exp, local)
        else:
            exp.run(sequential=False, detach=bool(cfg.cluster.get("detach", False)) and not local)
    finally:
        exp.__exit__(None, None, None)
    if dry_run:   # nemo-run writes its experiment folder even for a dry run
        shutil.rmtree(exp._exp_dir, ignore_errors=True)
        _remove_empty(nemo_run_home(run_dir))
        return
    log(f"nemo-run experiment {exp._id}: state, sbatch scripts and task logs in {exp._exp_dir}")
    if local:
        failed = failed_tasks(exp)
        if failed:
            raise TasksFailed(failed, exp._exp_dir)
    else:
        ids = {job.id: job_id(job.handle) for job in exp.jobs}
        (nemo_run_home(run_dir) / JOBS_FILE).write_text(json.dumps(ids, indent=1) + "\n")
        log(f"submitted Slurm jobs {ids} (ids in {nemo_run_home(run_dir) / JOBS_FILE}); watch with "
            f"`squeue --me`, report with `python -m launch report {run_dir}`")


def job_id(handle: str) -> int:
    """The Slurm job id in a nemo-run app handle (``slurm_tunnel://nemo_run/<id>/...``)."""
    return int(handle.partition("://")[2].split("/")[1])


def _dry_run(exp, local: bool) -> None:
    """Print the tasks and, for Slurm, each sbatch script whole (nemo-run's own dry-run log wraps them
    to the terminal's width); nothing is submitted and nemo-run's folders are removed again."""
    for job in exp.jobs:
        task = job.task
        print(f"# ---- task {job.id} (after {', '.join(job.dependencies) or 'nothing'}): "
              f"{task.__fn_or_cls__.__name__}{tuple(task.__arguments__.values())!r}")
    exp.dryrun(log=local, delete_exp_dir=False)
    for job in [] if local else exp.jobs:
        script = Path(exp._exp_dir) / f"{job.executor.job_name}_sbatch.sh"
        print(f"# ---- {job.id}: sbatch script ({job.executor.info()}) ----")
        print(script.read_text())


def _remove_empty(folder: Path) -> None:
    if not folder.exists():
        return
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [folder]:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
