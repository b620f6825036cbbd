"""A dist_checkpointing save/load round trip restores model, optimizer and schedule exactly."""

import json

import pytest

WORKER = __file__.replace("test_checkpoint_resume.py", "tiny_training.py")


def test_resume_equals_straight_run(torchrun, tmp_path):
    out = tmp_path / "resume.json"
    torchrun(WORKER, out, tmp_path / "ckpt", "resume", nproc=1)
    got = json.loads(out.read_text())
    assert got["restored_step"] == 2
    assert got["resumed_losses"] == got["straight_losses"]  # bitwise on CPU
    assert got["weights_equal_after_resume"] is True
    assert got["first_losses"] != got["straight_losses"]


def _fit(torchrun_run, tmp_path, root, steps, *overrides, nproc=1):
    out = tmp_path / f"fit_{steps}_{nproc}.json"
    torchrun_run(WORKER, out, root, "fit", f"stages.pretrain.train.steps={steps}",
                 "stages.pretrain.train.save_interval=2", "stages.pretrain.train.eval_interval=100",
                 *overrides, nproc=nproc)
    return json.loads(out.read_text())


def test_resume_under_another_data_parallel_size(torchrun, tmp_path):
    root = tmp_path / "ckpt"
    _fit(torchrun, tmp_path, root, 4)
    got = _fit(torchrun, tmp_path, root, 6, "parallel=dp2", nproc=2)  # optimizer state reshards over DP
    assert got["resumed_from"] == 4 and got["step"] == 6


def test_resume_under_another_model_parallel_layout_is_refused_clearly(torchrun, tmp_path):
    import subprocess
    import sys

    root = tmp_path / "ckpt"
    _fit(torchrun, tmp_path, root, 4)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           WORKER, str(tmp_path / "x.json"), str(root), "fit", "parallel=tp2",
                           "stages.pretrain.train.steps=6"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "saved with tensor/pipeline/expert parallel sizes [1, 1, 1]; this run uses [2, 1, 1]" in out
    assert "init_from=" in out


def test_resume_across_context_parallel_sizes(torchrun, tmp_path):
    """A CP2 checkpoint (weights, distributed-optimizer state, schedule) resumes under CP1 and a CP1
    one under CP2, each continuing as the run that never changed layout (fp32: 1e-5). Dropless routing:
    with a capacity, CP changes which tokens compete for an expert (as TP does; test_parallel_parity)."""
    import shutil

    dropless = ("model.moe_routing_mode=dropless", "model.moe_expert_capacity_factor=null")
    single, cp2_first = tmp_path / "single", tmp_path / "cp2_first"
    _fit(torchrun, tmp_path, single, 4, *dropless)
    shutil.copytree(single, tmp_path / "single_then_cp2")
    straight = _fit(torchrun, tmp_path, single, 6, *dropless)
    then_cp2 = _fit(torchrun, tmp_path, tmp_path / "single_then_cp2", 6, "parallel=cp2", *dropless, nproc=2)
    _fit(torchrun, tmp_path, cp2_first, 4, "parallel=cp2", *dropless, nproc=2)
    then_single = _fit(torchrun, tmp_path, cp2_first, 6, *dropless)
    for got in (then_cp2, then_single):
        assert got["resumed_from"] == 4 and got["step"] == 6
        assert got["last"]["loss"] == pytest.approx(straight["last"]["loss"], rel=1e-5)
        assert got["last"]["grad_norm"] == pytest.approx(straight["last"]["grad_norm"], rel=1e-5)
