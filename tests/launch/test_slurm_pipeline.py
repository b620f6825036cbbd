"""The SLURM launcher on a real one-node Slurm: the generated sbatch scripts run the pipeline,
a requeued or warned job resumes from its checkpoint, a cancelled one is never marked done.

The cluster is ``tests/slurm_cluster.py`` (Debian's slurmctld / slurmd / munge, started for this
session); the pipeline is the tiny CPU one, as in test_runner.py.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_ext import checkpointing
from megatron_ext.metrics import read_metrics

TINY_DATA = ["data.sources.prose.num_docs=300", "data.sources.arithmetic.num_docs=300",
             "data.sources.code.num_docs=200"]


def _train(stage: str, steps: int, save: int) -> list[str]:
    t = f"stages.{stage}.train"
    return [f"{t}.steps={steps}", f"{t}.warmup_steps=1", f"{t}.save_interval={save}",
            f"{t}.eval_interval={steps}", f"{t}.eval_iters=1"]


def submit(cluster, run_dir: Path, *overrides: str) -> dict[str, int]:
    """`python -m launch cluster=slurm_cpu ...` as a user types it; returns the submitted job ids."""
    cmd = [sys.executable, "-m", "launch", "cluster=slurm_cpu", f"run_dir={run_dir}", *TINY_DATA, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **cluster.env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs_file = run_dir / "slurm" / "jobs.json"
    return json.loads(jobs_file.read_text()) if jobs_file.exists() else {}


def manifest(run_dir: Path, folder: str) -> dict:
    return json.loads((run_dir / folder / "manifest.json").read_text())


def wait_done(cluster, jobs: dict[str, int], run_dir: Path, timeout: float = 400) -> None:
    for name, job in jobs.items():
        state = cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout)
        logs = "\n".join(p.read_text()[-2000:] for p in run_dir.rglob("slurm-*.out"))
        assert state == "COMPLETED", f"job {name} ({job}) ended {state}\n{logs}"


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_pipeline_runs_through_generated_sbatch_scripts(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    jobs = submit(slurm_cluster, run_dir, "pipeline.order=[pretrain,anneal]",
                  *_train("pretrain", 6, 6), *_train("anneal", 3, 3))
    assert list(jobs) == ["data", "pretrain", "anneal", "report"]
    wait_done(slurm_cluster, jobs, run_dir)
    assert (run_dir / "report.md").exists() and (run_dir / "report" / "loss.png").exists()

    pre, ann = manifest(run_dir, "01_pretrain"), manifest(run_dir, "02_anneal")
    assert pre["status"] == ann["status"] == "complete"
    assert (pre["steps"], ann["steps"]) == (6, 3)
    assert ann["parent_checkpoint"] == f"01_pretrain/{pre['checkpoint']}"   # relative to the run folder
    script = (run_dir / "slurm" / "02_anneal.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --open-mode=append" in script
    log = (run_dir / "02_anneal" / "logs" / f"slurm-{jobs['anneal']}.out").read_text()
    assert f"job {jobs['anneal']} (restart 0)" in log and "02_anneal: complete" in log

    # a second submission finds nothing left to do and submits nothing
    cmd = [sys.executable, "-m", "launch", "cluster=slurm_cpu", f"run_dir={run_dir}", *TINY_DATA,
           "pipeline.order=[pretrain,anneal]", *_train("pretrain", 6, 6), *_train("anneal", 3, 3)]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                           env={**os.environ, **slurm_cluster.env})
    assert again.returncode == 0 and "nothing to submit" in again.stdout + again.stderr


def _start_long_pretrain(cluster, run_dir: Path, steps: int) -> int:
    jobs = submit(cluster, run_dir, "pipeline.order=[pretrain]", *_train("pretrain", steps, 10))
    cluster.wait_for(jobs["pretrain"], {"RUNNING"}, 300)
    latest = run_dir / "01_pretrain" / "checkpoints" / "latest"
    wait_until(latest.exists, 300, "the first checkpoint")
    return jobs["pretrain"]


def _assert_resumed_and_finished(run_dir: Path, steps: int) -> dict:
    done = manifest(run_dir, "01_pretrain")
    assert done["status"] == "complete" and done["steps"] == steps
    assert len(done["attempts"]) >= 2
    resumed = done["attempts"][-1]["resumed_from_step"]
    assert resumed is not None and 0 < resumed < steps
    logged = [r["step"] for r in read_metrics(run_dir / "01_pretrain" / "metrics" / "metrics.jsonl")]
    assert logged == list(range(1, steps + 1))   # no step lost or counted twice across the restart
    return done


def test_requeued_training_job_resumes_from_its_checkpoint(slurm_cluster, tmp_path):
    run_dir, steps = tmp_path / "run", 100
    job = _start_long_pretrain(slurm_cluster, run_dir, steps)
    slurm_cluster.requeue(job)   # what an admin or a node failure does
    wait_done(slurm_cluster, {"pretrain": job}, run_dir)
    _assert_resumed_and_finished(run_dir, steps)
    log = (run_dir / "01_pretrain" / "logs" / f"slurm-{job}.out").read_text()
    assert "(restart 0)" in log and "(restart 1)" in log   # one log across attempts


def test_time_limit_warning_checkpoints_and_requeues_itself(slurm_cluster, tmp_path):
    """``--signal=USR1@...`` before the time limit: the stage saves after its step, exits 75, and the
    script requeues the job (here the warning is sent by hand instead of by the clock)."""
    run_dir, steps = tmp_path / "run", 100
    job = _start_long_pretrain(slurm_cluster, run_dir, steps)
    slurm_cluster.run(["scancel", "--signal=USR1", str(job)])
    wait_until(lambda: slurm_cluster.job_state(job) in {"PENDING", "REQUEUED"}, 120, "the job to requeue itself")
    first = manifest(run_dir, "01_pretrain")["attempts"][0]
    assert first["ended"] == "preempted"
    slurm_cluster.start_now(job)
    wait_done(slurm_cluster, {"pretrain": job}, run_dir)
    done = _assert_resumed_and_finished(run_dir, steps)
    assert done["attempts"][1]["resumed_from_step"] == first["at_step"]   # the warning's checkpoint


def test_cancelled_job_is_never_marked_done_and_a_resubmission_finishes(slurm_cluster, tmp_path):
    run_dir, steps = tmp_path / "run", 100
    overrides = ["pipeline.order=[pretrain,anneal]", *_train("pretrain", steps, 10), *_train("anneal", 3, 3)]
    jobs = submit(slurm_cluster, run_dir, *overrides)
    slurm_cluster.wait_for(jobs["pretrain"], {"RUNNING"}, 300)
    wait_until((run_dir / "01_pretrain" / "checkpoints" / "latest").exists, 300, "the first checkpoint")
    slurm_cluster.cancel(jobs["pretrain"])
    assert slurm_cluster.wait_for(jobs["pretrain"], {"CANCELLED"}, 120) == "CANCELLED"
    # its dependant does not wait forever for a parent that will never succeed
    assert slurm_cluster.wait_for(jobs["anneal"], {"CANCELLED", "FAILED"}, 120) in {"CANCELLED", "FAILED"}

    cancelled = manifest(run_dir, "01_pretrain")
    assert cancelled["status"] != "complete" and cancelled["steps"] < steps
    assert not (run_dir / "02_anneal" / "manifest.json").exists()
    latest = checkpointing.latest_checkpoint(run_dir / "01_pretrain" / "checkpoints")
    assert latest is not None and (latest / ".metadata").exists()   # the marker names a whole checkpoint

    again = submit(slurm_cluster, run_dir, *overrides)
    assert list(again) == ["data", "pretrain", "anneal", "report"]
    wait_done(slurm_cluster, again, run_dir)
    _assert_resumed_and_finished(run_dir, steps)
    assert manifest(run_dir, "02_anneal")["status"] == "complete"


@pytest.mark.parametrize("field,value,message", [
    ("cluster.time", "00:01:00", "preempt_warning_s=120 is not shorter"),
    ("cluster.time", "four hours", "not a SLURM time"),
    ("cluster.gpus_per_node", "2", "one rank per GPU"),
])
def test_bad_cluster_settings_are_refused_before_submitting(tmp_path, field, value, message):
    cmd = [sys.executable, "-m", "launch", "cluster=slurm_cpu", f"run_dir={tmp_path / 'run'}", f"{field}={value}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "run" / "slurm").exists()
