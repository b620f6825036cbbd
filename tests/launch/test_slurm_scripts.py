"""The sbatch scripts ``cluster=slurm`` writes, and the dry runs of both launchers (no cluster needed)."""

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from launch.config import load_config
from launch.pipeline_jobs import Rendezvous, rendezvous, stage_command, worker_env
from launch.slurm import _jobs, render_script


def _scripts(*overrides: str) -> dict[str, str]:
    cfg = load_config(["cluster=slurm", "run_dir=/lustre/runs/x", *overrides])
    return {job.name: render_script(job, cfg) for job in _jobs(Path(cfg.run_dir), cfg, list(cfg.pipeline.order))}


def _sbatch_options(script: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_stage_script_asks_for_the_layout_and_runs_one_launcher_per_node():
    scripts = _scripts("parallel=h200_node", "parallel.nnodes=4", "cluster.partition=batch",
                       "cluster.account=proj", "cluster.time=12:00:00", "pipeline.order=[pretrain,anneal]")
    opts = _sbatch_options(scripts["pretrain"])
    for expected in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=batch",
                     "--account=proj", "--time=12:00:00", "--requeue", "--open-mode=append",
                     "--signal=USR1@600", "--exclusive", "--output=/lustre/runs/x/01_pretrain/logs/slurm-%j.out"):
        assert expected in opts, (expected, opts)
    body = scripts["pretrain"]
    assert "-m launch.pipeline_jobs stage /lustre/runs/x pretrain" in body
    assert "srun --ntasks-per-node=1" in body and "export CUDA_DEVICE_MAX_CONNECTIONS=1" in body
    assert "if [ $rc -eq 75 ]; then" in body and 'scontrol requeue "${SLURM_JOB_ID}"' in body
    # the data job: one task, no GPU, no exclusive node
    data = _sbatch_options(scripts["data"])
    assert "--nodes=1" in data and not any(o.startswith("--gpus") or o == "--exclusive" for o in data)
    assert "-m launch.pipeline_jobs data /lustre/runs/x" in scripts["data"]


def test_container_image_and_mounts_go_to_srun():
    scripts = _scripts("cluster.container.image=/img/tl.sqsh", "cluster.container.mounts=[/lustre:/lustre]",
                       "cluster.container.workdir=/workspace/turbolaser")
    line = next(ln for ln in scripts["pretrain"].splitlines() if ln.startswith("srun "))
    assert "--container-image=/img/tl.sqsh" in line and "--container-mounts=/lustre:/lustre" in line
    assert "--container-workdir=/workspace/turbolaser" in line and " python -m launch.pipeline_jobs" in line
    assert "cd /workspace/turbolaser" in scripts["pretrain"]


def test_scripts_are_valid_bash():
    for script in _scripts().values():
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_rendezvous_on_this_machine_and_in_a_slurm_allocation():
    cfg = load_config(["cluster=slurm"])
    local = rendezvous(cfg.parallel, cfg.cluster, env={})
    assert (local.nnodes, local.node_rank, local.master_addr) == (1, 0, "127.0.0.1")
    in_job = rendezvous(cfg.parallel, cfg.cluster,
                        env={"SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
                             "SLURM_JOB_NODELIST": "localhost"})
    assert in_job == Rendezvous(1, 0, "127.0.0.1", 20000 + 4242)


def test_a_single_process_stage_runs_its_worker_without_torchrun(monkeypatch):
    """torchrun's agent would be a second Python (and torch import) per stage with no rank to watch."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    one, two = load_config([]), load_config(["parallel=tp2"])
    here = Rendezvous(1, 0, "127.0.0.1", 29555)
    cmd = stage_command(Path("/r/01_pretrain"), one.parallel, one.cluster, here)
    assert cmd[1:] == ["-m", "launch.stage_worker", "/r/01_pretrain"]
    env = worker_env(one.parallel, one.cluster, here)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == \
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}
    two_procs = stage_command(Path("/r/01_pretrain"), two.parallel, two.cluster, here)
    assert two_procs[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in two_procs
    assert two_procs[-3:] == ["-m", "launch.stage_worker", "/r/01_pretrain"]
    # one process on each of two nodes still meets the others through torchrun's rendezvous
    nodes = stage_command(Path("/r/01_pretrain"), one.parallel, one.cluster, Rendezvous(2, 1, "node0", 20042))
    assert nodes[1:3] == ["-m", "torch.distributed.run"] and "--nnodes=2" in nodes
    assert worker_env(two.parallel, two.cluster, here).get("RANK") == os.environ.get("RANK")   # torchrun's job
    # one CPU thread per rank unless the user or the cluster's env says otherwise
    assert env["OMP_NUM_THREADS"] == "1"
    assert worker_env(one.parallel, OmegaConf.create({**OmegaConf.to_container(one.cluster), "env": {"OMP_NUM_THREADS": 4}}))["OMP_NUM_THREADS"] == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_env(one.parallel, one.cluster)["OMP_NUM_THREADS"] == "3"


def test_dry_runs_print_and_write_nothing(tmp_path):
    run_dir = tmp_path / "run"
    for cluster, expected in (("local", "-m launch.stage_worker"), ("slurm", "#SBATCH --requeue")):
        cmd = [sys.executable, "-m", "launch", "--dry-run", f"cluster={cluster}", f"run_dir={run_dir}",
               "hydra.run.dir=" + str(tmp_path / "hydra")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert expected in proc.stdout and "01_pretrain" in proc.stdout
        assert not run_dir.exists()


def test_config_records_the_cluster_choice():
    cfg = load_config(["cluster=slurm_cpu"])
    assert OmegaConf.to_container(cfg.cluster, resolve=True)["gpus_per_node"] == 0
    assert cfg.cluster.name == "slurm" and cfg.cluster.env is None
