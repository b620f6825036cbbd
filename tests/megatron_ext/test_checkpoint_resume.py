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
