"""The pipeline as jobs: one data job, then one job per stage, each runnable on its own.

Every launcher uses these: the local runner calls them in turn, a SLURM stage script and a nemo-run
task run them as commands on the nodes of an allocation::

    python -m launch.pipeline_jobs data   <run_dir>           # tokenizer + indexed datasets, once
    python -m launch.pipeline_jobs stage  <run_dir> <stage>   # one stage: torchrun on this node
    python -m launch.pipeline_jobs report <run_dir>           # summary.txt, report.md and its plots

A stage job reads everything from the run folder (``pipeline.yaml``, the parent's manifest), so it
can start on any node, any number of times: a finished stage is skipped, an unfinished one resumes
from its latest checkpoint. Paths inside the run folder are stored relative to it
(``megatron_ext.manifest.relative_in``), so a run folder can be moved or copied and go on where it
is now. On SLURM the command runs once per node (``srun --ntasks-per-node=1``) and each node starts
its share of the ranks with torchrun's static rendezvous on the first node.
Exit codes: 0 done, 75 preempted (requeue to resume), 2 config error, 1 failure.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from launch import stage_forks
from megatron_ext import manifest
from megatron_ext.errors import ConfigError
from megatron_ext.fault_tolerance import PREEMPTED_EXIT_CODE, PREEMPTION_SIGNALS
from megatron_ext.stage import stage_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
PIPELINE_FILE = "pipeline.yaml"
_logger = logging.getLogger("pipeline")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, log: Path):
        super().__init__(
            f"stage {stage!r} failed with exit code {returncode}; its log is {log}. "
            f"Re-running the same command resumes it from its last checkpoint."
        )
        self.stage, self.returncode, self.log = stage, returncode, log


class StagePreempted(RuntimeError):
    def __init__(self, stage: str, detail: str):
        super().__init__(f"stage {stage!r}: {detail}. Re-run the same command (or requeue) to resume.")
        self.stage = stage


def log(msg: str) -> None:
    _logger.info(msg)


# ---- the run folder ---------------------------------------------------------------------------------

def stored_config(cfg: DictConfig) -> dict:
    """The resolved config as the run folder keeps it (``pipeline.yaml``, each stage's ``config.yaml``):
    ``run_dir`` is ``"."``, the folder itself, so the folder can move; whoever reads it sets ``run_dir``
    to where the folder is now."""
    return {**OmegaConf.to_container(cfg, resolve=True), "run_dir": "."}


def write_pipeline(cfg: DictConfig) -> Path:
    """Create the run folder and record the resolved config every job of this run reads."""
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(stored_config(cfg)), run_dir / PIPELINE_FILE)
    return run_dir


def load_pipeline(run_dir: str | Path) -> DictConfig:
    path = Path(run_dir) / PIPELINE_FILE
    if not path.exists():
        raise ConfigError(f"{path} does not exist: {run_dir} is not a run folder. Start the run with "
                          f"`python -m launch run_dir={run_dir} ...` (it writes {PIPELINE_FILE})")
    cfg = OmegaConf.load(path)
    cfg.run_dir = str(Path(run_dir).resolve())   # where the folder is now, wherever it was written
    return cfg


def stage_index(cfg: DictConfig, name: str) -> int:
    order = list(cfg.pipeline.order)
    if name not in order:
        raise ConfigError(f"stage {name!r} is not in pipeline.order {order}")
    return order.index(name)


def prepare(run_dir: Path, cfg: DictConfig):
    """The data job: tokenizer and indexed datasets under ``<run_dir>/data`` (reused when present)."""
    from data_pipelines.prepare import prepare_data

    log("preparing data (reused when already prepared)")
    prepared = prepare_data(cfg.data, run_dir / "data", int(cfg.seed))
    sources = ", ".join(f"{name} {st['documents']} docs / {st['tokens']} tokens"
                        for name, st in prepared.stats["sources"].items())
    log(f"data ready in {run_dir / 'data'}: vocab {prepared.stats['vocab_size']}; {sources}")
    return prepared


# ---- one stage: where it starts from, whether it is done -------------------------------------------

def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _describe_changes(old: dict, new: dict, limit: int = 5) -> str:
    a, b = _flatten(old), _flatten(new)
    changed = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    more = f" (and {len(changed) - limit} more)" if len(changed) > limit else ""
    return "; ".join(changed[:limit]) + more


def parent_checkpoint(run_dir: Path, cfg: DictConfig, name: str) -> str | None:
    """Where a stage starts, as an absolute path: its ``init_from`` (relative to the working directory,
    where validation found it), else the final checkpoint (which must be complete) of its ``parent``
    stage, by default the previous one in ``pipeline.order`` (a ``parent`` further back branches the
    run: several stages start from one checkpoint, e.g. the arms of a study), else random init for the
    first stage."""
    if cfg.stages[name].get("init_from"):
        return os.path.abspath(str(cfg.stages[name].init_from))
    index = stage_index(cfg, name)
    if index == 0:
        return None
    previous = cfg.stages[name].get("parent") or cfg.pipeline.order[index - 1]
    pdir = stage_dir(run_dir, stage_index(cfg, previous), previous)
    done = manifest.read(pdir)
    if done is None or done["status"] != manifest.COMPLETE:
        raise ConfigError(f"stage {name!r} starts from {previous!r}, which has not completed "
                          f"({pdir}); run {previous!r} first (the launchers order them)")
    return str(pdir / done["checkpoint"])


@dataclass(frozen=True)
class StagePlan:
    name: str
    dir: Path
    parent: str | None
    done: dict | None   # the manifest when the stage is already complete


def plan_stage(run_dir: Path, cfg: DictConfig, name: str, write: bool = True) -> StagePlan:
    """Decide start / resume / skip, refusing to touch a stage recorded under another config, and
    (``write``) write the stage's ``config.yaml`` (what its workers read) unless it is complete."""
    sdir = stage_dir(run_dir, stage_index(cfg, name), name)
    start_from = parent_checkpoint(run_dir, cfg, name)
    full = OmegaConf.to_container(cfg, resolve=True)
    wanted = manifest.stage_identity(full, name, start_from, run_dir)
    existing = manifest.read(sdir)
    if existing is not None:
        recorded = manifest.recorded_identity(existing, name, run_dir)
        if recorded != wanted:
            state = "finished" if existing["status"] == manifest.COMPLETE else "started"
            raise ConfigError(
                f"stage {name!r} in {sdir} was {state} with a different config "
                f"({_describe_changes(recorded, wanted)}). A stage is never silently overwritten: "
                f"use a new run_dir=..., or delete {sdir} to run it again"
            )
        if existing["status"] == manifest.COMPLETE:
            return StagePlan(name, sdir, start_from, existing)
    if not write:
        return StagePlan(name, sdir, start_from, None)
    sdir.mkdir(parents=True, exist_ok=True)
    staged = OmegaConf.create({"stage_name": name, "parent_checkpoint": manifest.relative_in(start_from, run_dir),
                               "config": stored_config(cfg)})
    tmp = sdir / f".config.yaml.{socket.gethostname()}.{os.getpid()}"
    OmegaConf.save(staged, tmp)   # every node of a job writes the same file: atomic replace
    os.replace(tmp, sdir / "config.yaml")
    return StagePlan(name, sdir, start_from, None)


# ---- torchrun (or the single worker) on this node ---------------------------------------------------

@dataclass(frozen=True)
class Rendezvous:
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous(parallel: DictConfig, cluster: DictConfig, env: dict | None = None) -> Rendezvous:
    """Where this node's ranks meet the others: this machine alone, or the first node of the SLURM
    allocation (port fixed per job id so every node agrees without talking)."""
    env = os.environ if env is None else env
    nnodes = int(parallel.get("nnodes", 1))
    port = cluster.get("master_port")
    if "SLURM_JOB_ID" not in env:
        if nnodes != 1:
            raise ConfigError(f"parallel.nnodes={nnodes} needs a cluster: launch with cluster=slurm "
                              f"(or cluster=nemo_run with a Slurm executor), or use nnodes=1 here")
        return Rendezvous(1, 0, "127.0.0.1", int(port or _free_port()))
    slurm_nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", 1)))
    if slurm_nodes != nnodes:
        raise ConfigError(f"parallel.nnodes={nnodes} but the SLURM allocation has {slurm_nodes} nodes; "
                          f"submit with --nodes={nnodes} (the generated scripts do)")
    master = "127.0.0.1"
    if nnodes > 1:
        master = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
                                capture_output=True, text=True, check=True).stdout.split()[0]
    return Rendezvous(nnodes, int(env.get("SLURM_NODEID", 0)), master,
                      int(port or 20000 + int(env["SLURM_JOB_ID"]) % 20000))


# signals torchrun passes on to its ranks (the preemption ones make them save before exiting)
_FORWARDED_SIGNALS = list(dict.fromkeys(["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT",
                                         *(s.name for s in PREEMPTION_SIGNALS)]))


def torchrun_command(sdir: Path, parallel: DictConfig, cluster: DictConfig, rdzv: Rendezvous) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={parallel.nproc_per_node}", f"--nnodes={rdzv.nnodes}",
        f"--node_rank={rdzv.node_rank}", f"--master_addr={rdzv.master_addr}",
        f"--master_port={rdzv.master_port}",
        # pass preemption notices on to the workers, which save and exit (fault_tolerance), and give
        # them time to finish the step and the save before torchrun kills them
        f"--signals-to-handle={','.join(_FORWARDED_SIGNALS)}",
        f"--shutdown-timeout={int(cluster.get('shutdown_timeout_s', 300))}",
        "-m", "launch.stage_worker", str(sdir),
    ]


def single_process(parallel: DictConfig, rdzv: Rendezvous) -> bool:
    """One rank in all: the worker needs no torchrun to start it or other ranks to meet."""
    return rdzv.nnodes == 1 and int(parallel.nproc_per_node) == 1


def stage_command(sdir: Path, parallel: DictConfig, cluster: DictConfig, rdzv: Rendezvous) -> list[str]:
    """The command that runs this node's ranks of a stage: torchrun, or for a single process the
    worker itself (torchrun's agent would cost a second Python and torch import per stage, and has
    no other rank to watch; the launcher forwards preemption signals to the worker either way)."""
    if single_process(parallel, rdzv):
        return [sys.executable, "-m", "launch.stage_worker", str(sdir)]
    return torchrun_command(sdir, parallel, cluster, rdzv)


def worker_env(parallel: DictConfig, cluster: DictConfig, rdzv: Rendezvous | None = None) -> dict[str, str]:
    """The ranks' environment: the cluster's variables (NCCL, CUDA), the repository importable, and
    one CPU thread per rank unless OMP_NUM_THREADS is set (here or in ``cluster.env``). A single
    process started without torchrun (``rdzv`` given, :func:`single_process`) gets the variables
    torchrun would set.

    One thread is torchrun's own default for several ranks, and on CPU it is the fastest for the tiny
    models: their ops are too small to split, and a second thread only adds synchronisation (measured
    on the 2-core dev box, 60 pretraining steps of tiny_large: 38.5 s with 2 threads, 20.9 s with 1).
    GPU ranks do not compute on the CPU."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if rdzv is not None and single_process(parallel, rdzv):
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", GROUP_RANK="0",
                   MASTER_ADDR=rdzv.master_addr, MASTER_PORT=str(rdzv.master_port))
    env.update({str(k): str(v) for k, v in (cluster.get("env") or {}).items()})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _copy_output(pipe, log_file) -> None:
    """Stream a stage's output to the console and its log as it arrives (progress bars included)."""
    while chunk := os.read(pipe.fileno(), 65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        log_file.write(chunk)
        log_file.flush()


def _launch(sdir: Path, name: str, cfg: DictConfig) -> Rendezvous:
    """Run this node's ranks of one stage, streaming their output to the console and logs/."""
    rdzv = rendezvous(cfg.parallel, cfg.cluster)
    cmd = stage_command(sdir, cfg.parallel, cfg.cluster, rdzv)
    suffix = f"-node{rdzv.node_rank}" if rdzv.nnodes > 1 else ""
    log_path = sdir / "logs" / f"worker{suffix}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = worker_env(cfg.parallel, cfg.cluster, rdzv)
    with log_path.open("ab") as log:
        proc = None
        if single_process(cfg.parallel, rdzv) and cfg.cluster.get("fork_stages", False):
            # the same worker, without a fresh Python's imports
            proc = stage_forks.start(sdir, env, server_env=worker_env(cfg.parallel, cfg.cluster))
        if proc is None:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        reader = threading.Thread(target=_copy_output, args=(proc.stdout, log), daemon=True)
        reader.start()
        # a preemption notice to this process goes to the stage, which checkpoints and exits
        forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
        previous = {sig: signal.signal(sig, forward) for sig in PREEMPTION_SIGNALS}
        try:
            returncode = proc.wait()
        except BaseException:  # Ctrl-C or an error in the launcher: stop the stage too
            proc.terminate()
            proc.wait()
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        # a process the stage left behind may hold the pipe open: do not wait for it forever
        reader.join(timeout=10)
        if reader.is_alive():
            log(f"{sdir.name}: a leftover process still holds the stage's output; no longer reading it")
    if returncode != 0:
        attempt = (manifest.read(sdir) or {}).get("attempts", [{}])[-1]
        if attempt.get("ended") == "preempted":
            raise StagePreempted(name, attempt["detail"])
        raise StageFailed(name, returncode, log_path)
    return rdzv


def run_stage(run_dir: Path, cfg: DictConfig, name: str) -> dict:
    """The stage job: plan it, run it unless complete, return its manifest."""
    plan = plan_stage(run_dir, cfg, name)
    if plan.done is not None:
        log(f"{plan.dir.name}: complete ({plan.done['steps']} steps), skipping")
        return plan.done
    if manifest.read(plan.dir) is not None:
        log(f"{plan.dir.name}: unfinished, resuming")
    else:
        log(f"{plan.dir.name}: starting" + (f" from {plan.parent}" if plan.parent else " from random init"))
    rdzv = _launch(plan.dir, name, cfg)
    done = manifest.read(plan.dir)
    if rdzv.node_rank != 0:  # the first node's rank 0 keeps the manifest and may not have finished it
        log(f"{plan.dir.name}: node {rdzv.node_rank} done")
        return done or {}
    assert done is not None and done["status"] == manifest.COMPLETE, f"{plan.dir}: worker exited without completing"
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in done["final_metrics"].items() if isinstance(v, float))
    log(f"{plan.dir.name}: complete in {done['wall_time_s']:.1f}s ({metrics})")
    return done


# ---- command line ----------------------------------------------------------------------------------

def finish(run_dir: Path, cfg: DictConfig) -> list[dict]:
    """The report job: ``summary.txt`` and ``report.md`` once every stage is complete."""
    from launch.report import summary_table, write_report

    manifests = [plan_stage(run_dir, cfg, name, write=False).done for name in cfg.pipeline.order]
    missing = [name for name, m in zip(cfg.pipeline.order, manifests) if m is None]
    if missing:
        raise ConfigError(f"stages {missing} of {run_dir} are not complete; run them first")
    table = summary_table(manifests)
    (run_dir / "summary.txt").write_text(table + "\n")
    log(f"summary (also in {run_dir / 'summary.txt'}):\n" + table)
    log(f"report with plots: {write_report(run_dir)}")
    return manifests


JOBS = ("data", "stage", "report")
USAGE = "usage: python -m launch.pipeline_jobs {data <run_dir> | stage <run_dir> <stage> | report <run_dir>}"


def run_job(job: str, run_dir: str, stage: str | None = None) -> int:
    """One job of a run folder by name (what the command line and nemo-run tasks call); returns the
    exit code: 0 done, 75 preempted, 2 config error, 1 failure."""
    from megatron_ext.quiet import quiet_known_warnings

    quiet_known_warnings()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s", force=True)
    path = Path(run_dir).resolve()
    try:
        if job not in JOBS or (job == "stage") != (stage is not None):
            raise ConfigError(f"job {job!r} (stage {stage!r}): {USAGE}")
        cfg = load_pipeline(path)
        if job == "data":
            prepare(path, cfg)
        elif job == "report":
            finish(path, cfg)
        else:
            run_stage(path, cfg, stage)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr, flush=True)
        return 2
    except StagePreempted as err:
        print(f"preempted: {err}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT_CODE
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(USAGE, file=sys.stderr)
        return 2
    return run_job(*argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
