"""Activation recomputation from the model config trades memory for compute without changing numbers:
the same losses (eval and two training steps) as without it, for both model families. Recycle
routing draws random numbers, so this also checks they are replayed identically in the recompute."""

import json

import pytest

WORKER = __file__.replace("test_recompute.py", "tiny_training.py")
FULL = ["model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=2"]   # tiny_large: whole CLA pairs
SELECTIVE = ["model.recompute_granularity=selective"]


def run_each_recompute(torchrun, tmp_path, *overrides, nproc: int = 1) -> dict:
    """The reference run without recomputation, with full and with selective: {name: result}."""
    runs = {}
    for name, recompute in (("none", []), ("full", FULL), ("selective", SELECTIVE)):
        out = tmp_path / f"{name}.json"
        torchrun(WORKER, out, tmp_path / name, "reference", *overrides, *recompute, nproc=nproc)
        runs[name] = json.loads(out.read_text())
    return runs


@pytest.mark.parametrize("model", ["tiny_large", "tiny_turbos"])
def test_recompute_keeps_the_losses(torchrun, tmp_path, model):
    runs = run_each_recompute(torchrun, tmp_path, f"model={model}")
    assert [runs[n]["recompute"] for n in runs] == [[None, None], ["full", "uniform"], ["selective", None]]
    for name in ("full", "selective"):
        assert runs[name]["train_losses"] == pytest.approx(runs["none"]["train_losses"], rel=1e-6, abs=1e-6), name
        assert runs[name]["eval_loss_after"] == pytest.approx(runs["none"]["eval_loss_after"], rel=1e-6), name


def test_recompute_under_context_parallelism_keeps_the_losses(torchrun, tmp_path):
    """Recomputed core attention replays the K/V ring in the backward: CP2 with full and selective
    recomputation gives the losses and grad norms of CP2 without it (tiny_large: CLA pairs)."""
    runs = run_each_recompute(torchrun, tmp_path, "model=tiny_large", "parallel=cp2", nproc=2)
    for name in ("full", "selective"):
        assert runs[name]["recompute"][0] == name
        assert runs[name]["train_losses"] == pytest.approx(runs["none"]["train_losses"], rel=1e-6, abs=1e-6), name
        assert [s["grad_norm"] for s in runs[name]["steps"]] == pytest.approx(
            [s["grad_norm"] for s in runs["none"]["steps"]], rel=1e-6), name
