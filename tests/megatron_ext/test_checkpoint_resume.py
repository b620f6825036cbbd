"""A dist_checkpointing save/load round trip restores model, optimizer and schedule exactly."""

import json

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
