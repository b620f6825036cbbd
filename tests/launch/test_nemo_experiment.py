"""The pipeline as a nemo-run Experiment: the tiny pipeline end to end with the local executor and
through nemo-run's SlurmExecutor on the local one-node Slurm (tests/slurm_cluster.py), the sbatch
scripts of a dry run, and the task list of a partly complete run."""

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from launch.nemo_experiment import pipeline_tasks
from launch.pipeline_jobs import REPO_ROOT, write_pipeline
from megatron_ext import manifest as manifests
from tests.launch.test_slurm_pipeline import TINY_DATA, _train, manifest

PIPELINE = ["pipeline.order=[pretrain,anneal]", *_train("pretrain", 6, 6), *_train("anneal", 3, 3)]


def launch(run_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch", f"run_dir={run_dir}", *TINY_DATA, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_pipeline_complete(run_dir: Path) -> None:
    pre, ann = manifest(run_dir, "01_pretrain"), manifest(run_dir, "02_anneal")
    assert pre["status"] == ann["status"] == "complete"
    assert (pre["steps"], ann["steps"]) == (6, 3)
    assert ann["parent_checkpoint"] == f"01_pretrain/{pre['checkpoint']}"   # relative to the run folder
    assert (run_dir / "report.md").exists()


def test_local_executor_runs_the_pipeline(tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(run_dir, "cluster=nemo_local", *PIPELINE)
    assert_pipeline_complete(run_dir)
    experiments = list((run_dir / "nemorun" / "experiments").glob("*/*"))   # state kept in the run folder
    assert len(experiments) == 1 and (experiments[0] / "01_pretrain").is_dir()
    assert "SUCCEEDED" in proc.stdout + proc.stderr


def test_slurm_dry_run_renders_one_chained_sbatch_script_per_job(tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(run_dir, "--dry-run", "cluster=nemo_slurm", "cluster.partition=batch", "cluster.account=proj",
                  "cluster.time=02:00:00", "parallel.nnodes=2", *PIPELINE)
    out = proc.stdout
    scripts = dict(zip(["00_data", "01_pretrain", "02_anneal", "99_report"],
                       out.split("sbatch script (SlurmExecutor")[1:]))
    assert len(scripts) == 4, out[-3000:]
    # every task after the first depends on the one before (nemo-run turns that into afterok on submit)
    assert "# ---- task 01_pretrain (after 00_data): run_pipeline_job('stage', " in out
    assert "# ---- task 99_report (after 02_anneal)" in out
    pre = scripts["01_pretrain"]
    for line in ("--nodes=2", "--gpus-per-node=1", "--partition=batch", "--account=proj", "--time=02:00:00",
                 "--exclusive", "--requeue", "--open-mode=append", "--signal=USR1@600", "--kill-on-invalid-dep=yes"):
        assert f"#SBATCH {line}\n" in pre, line
    assert "python -m nemo_run.core.runners.fdl_runner -n 01_pretrain" in pre
    assert f"export PYTHONPATH={REPO_ROOT}" in pre
    data = scripts["00_data"]
    assert "#SBATCH --nodes=1\n" in data and "gpus-per-node" not in data and "--exclusive" not in data
    assert "#SBATCH --time=04:00:00\n" in data   # cluster.data_job.time
    assert not (run_dir / "pipeline.yaml").exists() and not (run_dir / "nemorun").exists()


def _compose(run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "launch" / "conf"), version_base="1.3"):
        return compose("config", [f"run_dir={run_dir}", "cluster=nemo_local", *TINY_DATA, *PIPELINE, *overrides])


def _complete(run_dir: Path, cfg, index: int, name: str, parent: str | None) -> None:
    from omegaconf import OmegaConf

    folder = run_dir / f"{index:02d}_{name}"
    full = OmegaConf.to_container(cfg, resolve=True)
    manifests.begin_attempt(folder, name, name, full, parent, None)
    manifests.complete(folder, "checkpoints/iter_0000006", 6, 0, {}, None, 1.0)


def test_task_list_skips_complete_stages(tmp_path):
    run_dir = tmp_path / "run"
    cfg = _compose(run_dir)
    write_pipeline(cfg)
    names = lambda: [name for name, _, _ in pipeline_tasks(run_dir, cfg, write=False)]  # noqa: E731
    assert names() == ["00_data", "01_pretrain", "02_anneal", "99_report"]
    _complete(run_dir, cfg, 1, "pretrain", None)
    assert names() == ["00_data", "02_anneal", "99_report"]
    tasks = pipeline_tasks(run_dir, cfg, write=False)
    assert tasks[1] == ("02_anneal", "stage", [str(run_dir), "anneal"])


def test_slurm_executor_runs_the_pipeline_on_a_real_cluster(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    launch(run_dir, "cluster=nemo_slurm_cpu", *PIPELINE, env=slurm_cluster.env)
    jobs = json.loads((run_dir / "nemorun" / "jobs.json").read_text())
    assert list(jobs) == ["00_data", "01_pretrain", "02_anneal", "99_report"]
    anneal = slurm_cluster.job_info(jobs["02_anneal"])
    assert f"afterok:{jobs['01_pretrain']}" in anneal.get("Dependency", "") or anneal["JobState"] != "PENDING"
    for name, job in jobs.items():
        state = slurm_cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 400)
        logs = "\n".join(p.read_text()[-2000:] for p in (run_dir / "nemorun").rglob("*.out"))
        assert state == "COMPLETED", f"task {name} (job {job}) ended {state}\n{logs}"
    assert_pipeline_complete(run_dir)


def test_slurm_refuses_a_run_dir_nemo_run_would_rewrite(tmp_path):
    cmd = [sys.executable, "-m", "launch", "--dry-run", "cluster=nemo_slurm", f"run_dir={tmp_path / 'nemo_run' / 'x'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "'/nemo_run'" in proc.stderr


def test_slurm_executor_stage_requeues_itself_after_the_time_limit_warning(slurm_cluster, tmp_path):
    """As with cluster=slurm: the warning (sent by hand here) makes the stage save and exit 75, the task
    requeues its own job, and the restart resumes from that checkpoint."""
    from tests.launch.test_slurm_pipeline import wait_until

    run_dir, steps = tmp_path / "run", 100
    launch(run_dir, "cluster=nemo_slurm_cpu", "pipeline.order=[pretrain]", *_train("pretrain", steps, 10),
           env=slurm_cluster.env)
    job = json.loads((run_dir / "nemorun" / "jobs.json").read_text())["01_pretrain"]
    slurm_cluster.wait_for(job, {"RUNNING"}, 300)
    wait_until((run_dir / "01_pretrain" / "checkpoints" / "latest").exists, 300, "the first checkpoint")
    slurm_cluster.run(["scancel", "--signal=USR1", str(job)])
    wait_until(lambda: slurm_cluster.job_state(job) in {"PENDING", "REQUEUED"}, 120, "the job to requeue itself")
    slurm_cluster.start_now(job)
    assert slurm_cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, 400) == "COMPLETED"
    done = manifest(run_dir, "01_pretrain")
    first = done["attempts"][0]
    assert done["status"] == "complete" and done["steps"] == steps and first["ended"] == "preempted"
    assert done["attempts"][1]["resumed_from_step"] == first["at_step"]
