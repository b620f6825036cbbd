"""The staged pipeline runner: stage folders and manifests, skip, refuse, kill and resume.

These run the real pipeline (data preparation, torchrun workers, megatron-core training) on the tiny
model with few steps.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_ext.fault_tolerance import PREEMPTED_EXIT_CODE
from megatron_ext.metrics import read_metrics

SMALL = [
    # Pretraining and SFT; the sampling stages after SFT need a model that answers some tasks right
    # (tests/posttrain/test_posttrain_pipeline.py runs them).
    "pipeline.order=[pretrain,anneal,long_context,sft]",
    "stages.sft.eval.max_eval_tasks=8",
    "data.sources.prose.num_docs=300", "data.sources.arithmetic.num_docs=300", "data.sources.code.num_docs=200",
    "stages.pretrain.train.steps=8", "stages.pretrain.train.warmup_steps=2",
    "stages.pretrain.train.save_interval=4", "stages.pretrain.train.eval_interval=4",
    "stages.pretrain.train.eval_iters=1",
    "stages.anneal.train.steps=4", "stages.anneal.train.save_interval=4",
    "stages.anneal.train.eval_interval=4", "stages.anneal.train.eval_iters=1",
    "stages.long_context.train.steps=4", "stages.long_context.train.warmup_steps=1",
    "stages.long_context.train.save_interval=4", "stages.long_context.train.eval_interval=4",
    "stages.long_context.train.eval_iters=1",
    "stages.sft.tasks.num_tasks=400", "stages.sft.train.steps=8", "stages.sft.train.warmup_steps=1",
    "stages.sft.train.save_interval=8", "stages.sft.train.eval_interval=8", "stages.sft.train.eval_iters=1",
]


def launch(run_dir, *overrides, timeout=300, background=False, **popen):
    cmd = [sys.executable, "-m", "launch", f"run_dir={run_dir}", *SMALL, *overrides]
    if popen or background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def manifest(run_dir, folder):
    return json.loads((Path(run_dir) / folder / "manifest.json").read_text())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    proc = launch(run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def test_each_stage_leaves_manifest_and_checkpoint(finished_run):
    pre, ann = manifest(finished_run, "01_pretrain"), manifest(finished_run, "02_anneal")
    for m, steps in ((pre, 8), (ann, 4)):
        assert m["status"] == "complete"
        assert m["steps"] == steps
        assert m["tokens_seen"] == steps * 16 * 128  # steps x global batch x sequence length
        assert (finished_run / f"0{1 if m is pre else 2}_{m['stage']}" / m["checkpoint"] / "metadata.json").exists()
        assert len(m["data_fingerprint"]) == 64
        assert m["git_commit"]
        assert m["wall_time_s"] > 0
        assert m["config"]["model"]["family"] == "hunyuan_moe"
        assert len(m["attempts"]) == 1 and m["attempts"][0]["resumed_from_step"] is None
        # a single-process local stage is forked from the runner's preloaded server (launch.stage_forks)
        assert m["attempts"][0]["process"]["forked"] is True
    assert pre["attempts"][0]["process"]["pid"] != ann["attempts"][0]["process"]["pid"]   # a process per stage
    assert pre["parent_checkpoint"] is None
    assert ann["parent_checkpoint"] == f"01_pretrain/{pre['checkpoint']}"   # relative to the run folder
    # annealing draws a different mix, so its data fingerprint differs
    assert ann["data_fingerprint"] != pre["data_fingerprint"]
    assert pre["data_mix"] == {"prose": 0.6, "arithmetic": 0.2, "code": 0.2}
    assert set(pre["data_inputs"]) == {"prose", "arithmetic", "code"}
    assert all(len(sha) == 64 for sha in pre["data_inputs"].values())


def test_run_ends_with_summary_and_report(finished_run):
    summary = (finished_run / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary[1:]] == ["pretrain", "anneal", "long_context", "sft"]
    report = (finished_run / "report.md").read_text()
    assert "| sft | sft | complete | 8 |" in report and "(report/loss.png)" in report
    assert (finished_run / "report" / "loss.png").stat().st_size > 1000


def test_long_context_stage_trains_longer_sequences_from_the_annealed_weights(finished_run):
    ann, long = manifest(finished_run, "02_anneal"), manifest(finished_run, "03_long_context")
    assert long["status"] == "complete"
    assert long["parent_checkpoint"] == f"02_anneal/{ann['checkpoint']}"
    assert long["tokens_seen"] == 4 * 8 * 256  # steps x global batch x the stage's sequence length
    assert long["config"]["stages"]["long_context"]["model_overrides"]["rotary_base"] == 22082


def test_sft_stage_trains_packed_task_conversations_from_the_long_context_weights(finished_run):
    long, sft = manifest(finished_run, "03_long_context"), manifest(finished_run, "04_sft")
    assert sft["status"] == "complete" and sft["steps"] == 8
    assert sft["parent_checkpoint"] == f"03_long_context/{long['checkpoint']}"
    assert sft["tokens_seen"] == 8 * 8 * 256  # steps x global batch x the stage's sequence length
    assert (finished_run / "04_sft" / sft["checkpoint"] / "metadata.json").exists()
    assert len(sft["data_fingerprint"]) == 64
    # held-out conversations: the loss falls from where the long-context weights start
    metrics = sft["final_metrics"]
    assert metrics["valid_loss"] < metrics["initial_valid_loss"]
    data = sft["sft_data"]
    train, held_out = data["train"], data["held_out"]
    assert train["examples"] + held_out["examples"] == 400 and held_out["examples"] > 0
    for part in (train, held_out):
        assert 0 < part["packed_sequences"] < part["examples"]  # several conversations per row
        assert 0 < part["trained_tokens"] < part["tokens"]  # the user's prompts are not trained on
    assert sft["config"]["stages"]["sft"]["model_overrides"]["hidden_dropout"] == 0.0


def test_pretraining_loss_falls_and_anneal_starts_from_it(finished_run):
    pre, ann = manifest(finished_run, "01_pretrain"), manifest(finished_run, "02_anneal")
    start, end = pre["final_metrics"]["initial_valid_loss"], pre["final_metrics"]["valid_loss"]
    assert end < start - 0.5
    # the anneal stage starts from the pretrained weights, not from a random init
    assert ann["final_metrics"]["initial_valid_loss"] < start - 0.5
    steps = read_metrics(finished_run / "01_pretrain" / "metrics" / "metrics.jsonl")
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(r["tokens_per_s"] > 0 for r in steps)


def test_rerun_skips_finished_stages(finished_run):
    files = [f"{stage}/{name}" for stage in ("01_pretrain", "02_anneal") for name in ("manifest.json", "logs/worker.log")]
    before = {f: (finished_run / f).read_bytes() for f in files}
    proc = launch(finished_run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "01_pretrain: complete (8 steps), skipping" in proc.stdout
    assert "02_anneal: complete (4 steps), skipping" in proc.stdout
    for f, content in before.items():  # no worker ran: logs and manifests untouched
        assert (finished_run / f).read_bytes() == content


def test_changed_config_of_finished_stage_is_refused(finished_run):
    before = (finished_run / "01_pretrain" / "manifest.json").read_text()
    proc = launch(finished_run, "stages.pretrain.train.lr=0.001")
    assert proc.returncode == 2
    assert "stage 'pretrain'" in proc.stderr and "stage.train.lr: 0.003 -> 0.001" in proc.stderr
    assert "never silently overwritten" in proc.stderr
    assert (finished_run / "01_pretrain" / "manifest.json").read_text() == before


def test_killed_stage_resumes_from_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    long = ["stages.pretrain.train.steps=60", "stages.pretrain.train.save_interval=10",
            "stages.pretrain.train.eval_interval=30"]
    proc = launch(run_dir, *long, start_new_session=True)
    latest = run_dir / "01_pretrain" / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner, torchrun and the worker
    proc.wait()
    killed = manifest(run_dir, "01_pretrain")
    assert killed["status"] == "running"
    assert killed["steps"] < 60

    again = launch(run_dir, *long, "cluster.fork_stages=false")   # the resume in a fresh python
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "01_pretrain: unfinished, resuming" in again.stdout
    done = manifest(run_dir, "01_pretrain")
    assert done["status"] == "complete" and done["steps"] == 60
    assert len(done["attempts"]) == 2
    assert [a["process"]["forked"] for a in done["attempts"]] == [True, False]
    resumed = done["attempts"][1]["resumed_from_step"]
    assert resumed is not None and resumed % 10 == 0 and 10 <= resumed < 60
    assert "initial_valid_loss" in done["final_metrics"]  # kept from the first attempt
    steps = [r["step"] for r in read_metrics(run_dir / "01_pretrain" / "metrics" / "metrics.jsonl")]
    assert steps == list(range(1, 61))
    assert manifest(run_dir, "02_anneal")["status"] == "complete"


def files_naming(run_dir: Path, text: str) -> list[str]:
    """The files of a run folder that contain ``text``, but for logs (they keep what happened where),
    megatron-core's dataset index cache (it names the absolute data path in each index's description
    and hash, so it indexes again after a move) and binary files (the checkpoints' own metadata)."""
    found = []
    for path in run_dir.rglob("*"):
        rel = path.relative_to(run_dir)
        if path.is_symlink() or not path.is_file() or "logs" in rel.parts or rel.parts[:2] == ("data", "cache"):
            continue
        content = path.read_bytes()
        if b"\0" not in content and text.encode() in content:
            found.append(str(rel))
    return found


def test_moved_run_folder_skips_its_finished_stages_and_resumes_the_unfinished_one(tmp_path):
    """Clusters purge scratch, so runs get copied to project storage: the copy, run with its new
    run_dir, is the same run. Nothing in it names the old folder."""
    scratch, project = tmp_path / "scratch" / "run", tmp_path / "project" / "run"
    two = ["pipeline.order=[pretrain,anneal]", "stages.anneal.train.steps=20", "stages.anneal.train.save_interval=5",
           "stages.anneal.train.eval_interval=10"]
    proc = launch(scratch, *two, start_new_session=True)
    latest = scratch / "02_anneal" / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint of the anneal stage appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner, torchrun and the worker
    proc.wait()
    saved = int(latest.read_text().strip().split("_")[-1])
    assert manifest(scratch, "02_anneal")["status"] == "running" and saved < 20
    pretrain_files = [f"01_pretrain/{name}" for name in ("manifest.json", "logs/worker.log", "config.yaml")]
    before = {f: (scratch / f).read_bytes() for f in [*pretrain_files, "data/data_manifest.json"]}

    shutil.copytree(scratch, project, symlinks=True)
    shutil.rmtree(scratch)
    again = launch(project, *two)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "01_pretrain: complete (8 steps), skipping" in again.stdout
    for f, content in before.items():  # not retrained, data not prepared again
        assert (project / f).read_bytes() == content, f
    assert "02_anneal: unfinished, resuming" in again.stdout
    assert f"resuming from {project / '02_anneal' / 'checkpoints' / f'iter_{saved:07d}'}" in again.stdout
    pre, ann = manifest(project, "01_pretrain"), manifest(project, "02_anneal")
    assert ann["status"] == "complete" and ann["steps"] == 20
    assert [a["resumed_from_step"] for a in ann["attempts"]] == [None, saved]
    assert ann["parent_checkpoint"] == f"01_pretrain/{pre['checkpoint']}"
    steps = [r["step"] for r in read_metrics(project / "02_anneal" / "metrics" / "metrics.jsonl")]
    assert steps == list(range(1, 21))

    assert files_naming(project, str(scratch)) == []

    # moved once more, finished: every stage is skipped and nothing rewritten
    archive = tmp_path / "archive" / "run"
    shutil.move(project, archive)
    done = {f: (archive / f).read_bytes() for f in ("01_pretrain/manifest.json", "02_anneal/manifest.json")}
    third = launch(archive, *two)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "02_anneal: complete (20 steps), skipping" in third.stdout
    assert all((archive / f).read_bytes() == content for f, content in done.items())
    # while a config that really changed is still refused
    changed = launch(archive, *two, "stages.anneal.train.lr=0.002")
    assert changed.returncode == 2 and "stage 'anneal'" in changed.stderr
    assert "stage.train.lr: 0.001 -> 0.002" in changed.stderr


def test_tiny_turbos_hybrid_trains_in_the_pipeline(tmp_path):
    """The hybrid Mamba2 / attention / MoE family goes through the same runner and stage."""
    run_dir = tmp_path / "run"
    proc = launch(run_dir, "model=tiny_turbos", "pipeline.order=[pretrain]")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = manifest(run_dir, "01_pretrain")
    assert m["status"] == "complete" and m["config"]["model"]["family"] == "turbos_hybrid"
    assert m["final_metrics"]["valid_loss"] < m["final_metrics"]["initial_valid_loss"] - 0.5


def test_context_parallel_layout_runs_long_context_and_post_training_as_data_parallel(tmp_path):
    """``parallel=cp2``: the long-context stage splits its sequences over the two ranks (hybrid: K/V
    ring for attention, all-to-all for Mamba2); SFT, which cannot, runs the same two ranks as DP2."""
    run_dir = tmp_path / "run"
    proc = launch(run_dir, "model=tiny_turbos", "parallel=cp2", "pipeline.order=[long_context,sft]")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    long_context, sft = manifest(run_dir, "01_long_context"), manifest(run_dir, "02_sft")
    assert long_context["config"]["parallel"]["context_parallel_size"] == 2
    assert sft["config"]["parallel"]["context_parallel_size"] == 1
    final = long_context["final_metrics"]
    assert final["valid_loss"] < final["initial_valid_loss"]
    assert sft["status"] == "complete"
    assert "layout: TP1 x PP1 x CP2 x DP1" in (run_dir / "01_long_context" / "logs" / "worker.log").read_text()
    assert "layout: TP1 x PP1 x CP1 x DP2" in (run_dir / "02_sft" / "logs" / "worker.log").read_text()


def test_sigterm_to_the_runner_checkpoints_and_exits_for_requeue(tmp_path):
    """What SLURM does before preemption: the stage saves after its current step, the runner exits
    with the requeue code, and the next run resumes from that step."""
    run_dir = tmp_path / "run"
    long = ["stages.pretrain.train.steps=200", "stages.pretrain.train.save_interval=1000",
            "pipeline.order=[pretrain]"]
    proc = launch(run_dir, *long, background=True)
    metrics = run_dir / "01_pretrain" / "metrics" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
    assert "preempted" in output
    m = manifest(run_dir, "01_pretrain")
    assert m["status"] == "running" and m["attempts"][0]["ended"] == "preempted"
    stopped = m["attempts"][0]["at_step"]
    assert (run_dir / "01_pretrain" / "checkpoints" / f"iter_{stopped:07d}").is_dir()

    again = launch(run_dir, *long)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    done = manifest(run_dir, "01_pretrain")
    assert done["status"] == "complete" and done["attempts"][1]["resumed_from_step"] == stopped
