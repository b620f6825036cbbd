"""Crashes lose nothing: exact resume after SIGKILL (also inside a save), SIGTERM/SIGUSR1
preemption, and the NaN guard. Single-process and 2-process gloo runs of the tiny model."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_ext.checkpointing import latest_checkpoint
from megatron_ext.metrics import read_metrics
from tests.conftest import REPO_ROOT

WORKER = __file__.replace("test_fault_tolerance.py", "tiny_training.py")
STEPS = ["stages.pretrain.train.steps=6", "stages.pretrain.train.save_interval=2",
         "stages.pretrain.train.eval_interval=100"]


def worker(out, root, mode, *overrides, nproc=1, env=None, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", WORKER, str(out), str(root), mode, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT, **(env or {})}
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def losses(root):
    return [(r["step"], r["loss"]) for r in read_metrics(Path(root) / "metrics" / "metrics.jsonl")]


def weight_diff(tmp_path, a, b):
    out = tmp_path / "cmp.json"
    proc = worker(out, a, "compare", f"+other=[{b}]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())[str(b)]["model"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    proc = worker(root / "out.json", root, "fit", *STEPS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_kill_inside_save_keeps_previous_checkpoint_and_resume_is_exact(straight, tmp_path):
    root = tmp_path / "killed"
    proc = worker(tmp_path / "a.json", root, "fit", *STEPS, env={"TL_TEST_KILL_IN_SAVE_AT": "4"})
    assert proc.returncode != 0  # SIGKILLed inside the step-4 save
    assert (root / "iter_0000004").is_dir()  # its shards were written ...
    assert latest_checkpoint(root) == root / "iter_0000002"  # ... but it never became latest

    proc = worker(tmp_path / "b.json", root, "fit", *STEPS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "b.json").read_text())["resumed_from"] == 2
    assert latest_checkpoint(root) == root / "iter_0000006"
    assert losses(root) == losses(straight)  # step by step, bitwise
    assert weight_diff(tmp_path, straight / "iter_0000006", root / "iter_0000006") == 0.0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_and_exits_for_requeue(straight, tmp_path, sig):
    root = tmp_path / "preempted"
    long = ["stages.pretrain.train.steps=400", "stages.pretrain.train.save_interval=1000",
            "stages.pretrain.train.eval_interval=1000"]
    proc = worker(tmp_path / "a.json", root, "fit", *long, nproc=2, start_new_session=True)
    metrics = root / "metrics" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)  # to torchrun, which passes it to both ranks
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun reports the signal; the runner reads the manifest instead
    # the worker wrote its result only on the Preempted path, right before exiting with code 75
    assert (tmp_path / "a.json").exists(), output[-3000:]
    stopped_at = json.loads((tmp_path / "a.json").read_text())["preempted_at"]
    assert 3 <= stopped_at < 400
    assert latest_checkpoint(root) == root / f"iter_{stopped_at:07d}"  # saved after the last step
    assert max(step for step, _ in losses(root)) == stopped_at


def test_nan_step_is_skipped_and_training_continues(tmp_path):
    root = tmp_path / "nan"
    proc = worker(tmp_path / "a.json", root, "fit", *STEPS, "+nan_steps=[3]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["step"]: r for r in read_metrics(root / "metrics" / "metrics.jsonl")}
    assert records[3]["update_skipped"] is True and records[3]["loss"] != records[3]["loss"]  # NaN
    assert records[4]["lr"] == records[3]["lr"]  # the schedule did not advance on the skipped step
    assert all(records[s]["update_skipped"] is False and records[s]["loss"] == records[s]["loss"]
               for s in (1, 2, 4, 5, 6))
    assert "update skipped" in proc.stdout


def test_nan_gradient_with_finite_loss_skips_the_update(tmp_path):
    # the optimizer's own gradient norm is the check (no isfinite scan of the gradient buffers)
    root = tmp_path / "nan_grad"
    proc = worker(tmp_path / "a.json", root, "fit", *STEPS, "+nan_grad_steps=[3,4]",
                  "stages.pretrain.train.keep_last_checkpoints=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["step"]: r for r in read_metrics(root / "metrics" / "metrics.jsonl")}
    for s in (3, 4):
        assert records[s]["update_skipped"] is True and records[s]["loss"] == records[s]["loss"]
        assert records[s]["grad_norm"] != records[s]["grad_norm"]  # the NaN norm that caused the skip
    assert records[5]["lr"] == records[3]["lr"]  # the schedule did not advance on the skipped steps
    assert all(records[s]["update_skipped"] is False and math.isfinite(records[s]["grad_norm"])
               for s in (1, 2, 5, 6))
    assert weight_diff(tmp_path, root / "iter_0000002", root / "iter_0000004") == 0.0
    assert weight_diff(tmp_path, root / "iter_0000004", root / "iter_0000006") > 0.0


def test_consecutive_nan_steps_stop_with_last_good_checkpoint(tmp_path):
    root = tmp_path / "diverged"
    proc = worker(tmp_path / "a.json", root, "fit", *STEPS, "+nan_steps=[3,4,5,6]",
                  "stages.pretrain.train.max_skipped_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "a.json").read_text())
    assert "3 consecutive steps (up to step 5)" in result["diverged"]
    assert "max_skipped_steps" in result["diverged"]
    # step 4's checkpoint holds the step-2 weights (steps 3 and 4 changed nothing); it is latest
    assert latest_checkpoint(root) == root / "iter_0000004"
    assert weight_diff(tmp_path, root / "iter_0000002", root / "iter_0000004") == 0.0


def test_async_saves_train_and_checkpoint_like_sync_saves(straight, tmp_path):
    root = tmp_path / "async"
    # in its own session, so the writers' Manager server processes can be cleaned up afterwards
    proc = worker(tmp_path / "a.json", root, "fit", *STEPS, "stages.pretrain.train.async_save=true",
                  start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, output[-3000:]
    assert latest_checkpoint(root) == root / "iter_0000006"
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_0000004", "iter_0000006"]  # keep_last 2
    assert losses(root) == losses(straight)
    assert weight_diff(tmp_path, straight / "iter_0000006", root / "iter_0000006") == 0.0
