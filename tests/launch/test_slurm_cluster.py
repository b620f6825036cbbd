"""The local Slurm cluster the launcher's tests run against: jobs, srun tasks, requeue, cancel,
and that it leaves no process behind."""

import os
import time
from pathlib import Path

from tests.slurm_cluster import LocalSlurmCluster


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + body)
    path.chmod(0o755)
    return path


def wait_for_lines(path: Path, text: str, count: int, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        lines = [line for line in (path.read_text().splitlines() if path.exists() else [])
                 if text in line]
        if len(lines) >= count:
            return lines
        time.sleep(0.1)
    raise AssertionError(f"{path} has {len(lines)} lines with {text!r}, wanted {count}")


def alive(pid: int) -> bool:
    """True for a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_batch_job_completes(slurm_cluster, tmp_path):
    marker = tmp_path / "marker"
    script = write_script(tmp_path / "job.sh", f"echo \"$SLURM_JOB_ID\" > {marker}\n")
    jobid = slurm_cluster.submit(script, f"--output={tmp_path / 'out.txt'}")
    assert slurm_cluster.wait_for(jobid, {"COMPLETED"}, timeout=30) == "COMPLETED"
    assert marker.read_text().strip() == str(jobid)


def test_srun_runs_two_tasks(slurm_cluster, tmp_path):
    script = write_script(tmp_path / "job.sh",
                          f"srun -n 2 bash -c 'echo \"task $SLURM_PROCID of $SLURM_NTASKS\" "
                          f"> {tmp_path}/task.$SLURM_PROCID'\n")
    jobid = slurm_cluster.submit(script, "-n", "2", f"--output={tmp_path / 'out.txt'}")
    slurm_cluster.wait_for(jobid, {"COMPLETED"}, timeout=30)
    for rank in range(2):
        assert (tmp_path / f"task.{rank}").read_text().strip() == f"task {rank} of 2"


def test_requeued_job_restarts_and_completes(slurm_cluster, tmp_path):
    log = tmp_path / "out.txt"
    # The first run waits to be requeued; the restarted one (SLURM_RESTART_COUNT=1) finishes.
    script = write_script(tmp_path / "job.sh",
                          "echo \"start restart=${SLURM_RESTART_COUNT:-0}\"\n"
                          "if [ \"${SLURM_RESTART_COUNT:-0}\" = 0 ]; then sleep 120; fi\n"
                          "echo finished\n")
    jobid = slurm_cluster.submit(script, f"--output={log}", "--open-mode=append")
    wait_for_lines(log, "start", 1)
    slurm_cluster.requeue(jobid)
    slurm_cluster.wait_for(jobid, {"COMPLETED"}, timeout=30)
    assert wait_for_lines(log, "start", 2) == ["start restart=0", "start restart=1"]
    assert slurm_cluster.job_info(jobid)["Restarts"] == "1"


def test_cancelled_job_ends_cancelled(slurm_cluster, tmp_path):
    script = write_script(tmp_path / "job.sh", "sleep 120\n")
    jobid = slurm_cluster.submit(script, f"--output={tmp_path / 'out.txt'}")
    slurm_cluster.wait_for(jobid, {"RUNNING"}, timeout=30)
    slurm_cluster.cancel(jobid)
    assert slurm_cluster.wait_for(jobid, {"CANCELLED"}, timeout=30) == "CANCELLED"


def test_exit_leaves_no_process(slurm_available, tmp_path):
    """A second cluster (beside the session's), left with a running job, cleans up on exit."""
    script = write_script(tmp_path / "job.sh", f"echo started > {tmp_path}/started\nsleep 300\n")
    with LocalSlurmCluster(kill_wait=5) as cluster:
        root = cluster.root
        jobid = cluster.submit(script, f"--output={tmp_path / 'out.txt'}")
        cluster.wait_for(jobid, {"RUNNING"}, timeout=30)
        wait_for_lines(tmp_path / "started", "started", 1)
        pids = {**cluster.daemon_pids, **{f"job:{pid}": pid for pid in cluster.stray_pids()}}
        assert {"munged", "slurmctld", "slurmd"} <= pids.keys()
        assert any(key.startswith("job:") for key in pids)
        assert all(alive(pid) for pid in pids.values())
    assert {name: pid for name, pid in pids.items() if alive(pid)} == {}
    assert not os.path.exists(root)
