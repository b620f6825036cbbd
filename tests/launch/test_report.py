"""The run report on a fake run folder: files in the formats the stages write, no training."""

import json
import math
import re

import pytest
import yaml
from PIL import Image

from launch.report import write_report
from megatron_ext.errors import ConfigError

MODEL = {"family": "hunyuan_moe", "num_layers": 4, "hidden_size": 64, "num_moe_experts": 4, "moe_router_topk": 1}
PARALLEL = {"nproc_per_node": 1, "nnodes": 1, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}


def write_pipeline(run_dir, order):
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"model": MODEL, "parallel": PARALLEL, "stages": {n: {"kind": n} for n in order},
           "pipeline": {"name": "demo", "order": order}, "run_dir": str(run_dir), "seed": 1234}
    (run_dir / "pipeline.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def write_stage(run_dir, index, name, kind, *, status="complete", steps=10, final_metrics=None, attempts=None,
                metrics=True, rollouts=False):
    """A stage folder as megatron_ext.manifest and megatron_ext.metrics leave it."""
    folder = run_dir / f"{index:02d}_{name}"
    (folder / "metrics").mkdir(parents=True)
    attempts = attempts or [{"started_at": "2026-11-30T15:02:00+0000", "resumed_from_step": None, "elapsed_s": 12.5}]
    manifest = {"stage": name, "kind": kind, "status": status, "parent_checkpoint": None,
                "checkpoint": f"checkpoints/iter_{steps:07d}" if status == "complete" else None,
                "config": {"model": MODEL, "parallel": PARALLEL}, "git_commit": "abc", "data_fingerprint": None,
                "steps": steps, "tokens_seen": steps * 2048, "final_metrics": final_metrics or {},
                "wall_time_s": sum(a["elapsed_s"] for a in attempts) if status == "complete" else 0.0,
                "attempts": attempts}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if not metrics:
        return folder
    rows = []
    for step in range(1, steps + 1):
        rows.append({"step": step, "split": "train", "time": 1.0, "load_balancing_loss": 4.0 + 1 / step,
                     "load_balancing_loss_per_layer": [0.0, 2.0 + 1 / step, 2.0],  # layer 1: dense
                     "loss": 6.0 / step, "grad_norm": 0.8, "lr": 1e-3, "lr_experts": 5e-4, "update_skipped": False,
                     "tokens_per_s": 1e4, "tokens_seen": step * 2048, "step_time_s": 0.2})
        if step % 5 == 0:
            rows.append({"step": step, "split": "valid", "time": 1.0, "loss": 5.0 / step})
        if rollouts and step % 2 == 0:
            rows.append({"step": step, "split": "rollout", "time": 1.0, "reward_mean": 0.1 * step / 2,
                         "verifier_reward_mean": 0.1, "first_draw_reward": 0.2, "pool_pass": 0,
                         "self_verify_acc_correct": 0.5, "self_verify_acc_incorrect": float("nan"),
                         "self_verify_f1": 0.4, "c_ref": -3.0})
    (folder / "metrics" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if rollouts:
        samples = [{"rollout": i // 4, "item": f"t{i}", "mode": None, "finished": True, "reward": float(i % 2),
                    "verifier": float(i % 2), "reason": "", "advantage": 0.1, "self_reward": (i % 10) / 10,
                    "response": "42"} for i in range(40)]
        (folder / "rollouts.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return folder


def table_rows(report):
    """The stage table parsed back: {stage: {column: cell}}."""
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    return {r["stage"]: r for r in rows}


def assert_png(path):
    assert path.exists(), path
    assert path.stat().st_size > 5000
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 150


@pytest.fixture
def full_run(tmp_path):
    run = tmp_path / "run"
    order = ["pretrain", "sft", "rl_stem", "evaluate"]
    write_pipeline(run, order)
    write_stage(run, 1, "pretrain", "pretrain", steps=20,
                final_metrics={"initial_valid_loss": 6.2526, "valid_loss": 0.7911, "train_loss": 0.8})
    write_stage(run, 2, "sft", "sft", steps=10, final_metrics={
        "initial_valid_loss": 2.5, "valid_loss": 1.25,
        "initial_task_accuracy": {"accuracy": 0.1, "n": 10}, "task_accuracy": {"accuracy": 0.4, "n": 10}})
    write_stage(run, 3, "rl_stem", "rl", steps=10, rollouts=True, final_metrics={
        "initial_task_accuracy": {"think": {"accuracy": 0.25}, "no_think": {"accuracy": 0.5}},
        "task_accuracy": {"think": {"accuracy": 0.5}, "no_think": {"accuracy": 0.75}}},
        attempts=[{"started_at": "x", "resumed_from_step": None, "elapsed_s": 10.0, "ended": "preempted"},
                  {"started_at": "y", "resumed_from_step": 4, "elapsed_s": 5.0}])
    folder = write_stage(run, 4, "evaluate", "evaluate", steps=0, metrics=False,
                         final_metrics={"evaluation": {"synthetic": {"n_prompts": 8, "k": 4}}})
    (folder / "evaluation.txt").write_text("checkpoint x, k=4\nset        prompts  K  pass@1\nsynthetic        8  4   25.0%\n")
    return run


def test_report_table_and_plots(full_run):
    path = write_report(full_run)
    assert path == full_run / "report.md"
    report = path.read_text()
    assert "pretrain -> sft -> rl_stem -> evaluate" in report and "hunyuan_moe" in report
    rows = table_rows(report)
    assert list(rows) == ["pretrain", "sft", "rl_stem", "evaluate"]
    pre = rows["pretrain"]
    assert (pre["kind"], pre["status"], pre["steps"], pre["tokens"]) == ("pretrain", "complete", "20", "40,960")
    assert [float(x) for x in pre["valid loss"].split("->")] == [6.2526, 0.7911]
    assert pre["task accuracy"] == "-" and pre["wall time"] == "12.5s"
    assert [float(x) for x in rows["sft"]["task accuracy"].split("->")] == [0.1, 0.4]
    rl = rows["rl_stem"]
    assert rl["task accuracy"] == "think 0.250 / no_think 0.500 -> think 0.500 / no_think 0.750"
    assert rl["attempts"].startswith("2") and rl["wall time"] == "15.0s"
    assert "synthetic        8  4   25.0%" in report  # the evaluation table, verbatim
    for name in ["loss", "lr", "moe_balance", "rl", "calibration"]:
        assert_png(full_run / "report" / f"{name}.png")
        assert f"](report/{name}.png)" in report


def test_unfinished_unknown_and_missing_stages(tmp_path):
    run = tmp_path / "run"
    write_pipeline(run, ["pretrain", "mystery", "sft", "rl_general"])
    write_stage(run, 1, "pretrain", "pretrain", steps=10, final_metrics={"initial_valid_loss": 6.0, "valid_loss": 1.0})
    write_stage(run, 2, "mystery", "brand_new_kind", steps=10, final_metrics={"odd": [1, {"x": None}],
                                                                         "task_accuracy": "n/a"})
    folder = write_stage(run, 3, "sft", "sft", status="running", steps=10,
                         attempts=[{"started_at": "x", "resumed_from_step": None, "elapsed_s": 3.0}])
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["steps"] = 4  # recorded at the last checkpoint; the metrics went on to step 10
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with open(folder / "metrics" / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "split": "tra')  # torn last line of a running stage
    rows = table_rows(write_report(run).read_text())
    assert rows["mystery"]["kind"] == "brand_new_kind" and rows["mystery"]["status"] == "complete"
    assert rows["sft"]["status"].startswith("unfinished") and rows["sft"]["steps"] == "10"  # last logged step
    assert rows["sft"]["wall time"] == "3.0s"
    assert rows["rl_general"]["status"] == "not started"
    assert_png(run / "report" / "loss.png")
    assert not (run / "report" / "rl.png").exists()  # no RL data, no RL plot


def test_preempted_stage_and_stage_without_metrics(tmp_path):
    run = tmp_path / "run"
    write_pipeline(run, ["pretrain"])
    write_stage(run, 1, "pretrain", "pretrain", status="running", steps=4, metrics=False, attempts=[
        {"started_at": "x", "resumed_from_step": None, "elapsed_s": 3.0, "ended": "preempted", "at_step": 4}])
    report = write_report(run).read_text()
    assert table_rows(report)["pretrain"]["status"] == "unfinished (preempted at step 4)"
    assert "## Plots" not in report


def test_missing_run_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        write_report(tmp_path / "nope")
    with pytest.raises(ConfigError, match="not a pipeline run folder"):
        write_report(tmp_path)


def test_nan_metrics_are_skipped(tmp_path):
    run = tmp_path / "run"
    write_pipeline(run, ["pretrain"])
    folder = write_stage(run, 1, "pretrain", "pretrain", steps=10)
    rows = [json.loads(line) for line in (folder / "metrics" / "metrics.jsonl").read_text().splitlines()]
    rows[0]["loss"] = math.nan
    (folder / "metrics" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(run).read_text()
    assert re.search(r"\| pretrain \| pretrain \| complete \| 10 \|", report)
    assert_png(run / "report" / "loss.png")


def test_moe_balance_is_plotted_per_moe_layer(tmp_path):
    from launch.report import find_stages

    write_stage(tmp_path, 1, "pretrain", "pretrain", steps=4)
    (stage,) = find_stages(tmp_path, {})
    per_layer = stage.per_layer("train", "load_balancing_loss_per_layer")
    assert sorted(per_layer) == ["layer 2", "layer 3"]          # the dense layer logged only zeros
    steps, values = per_layer["layer 2"]
    assert steps == [1, 2, 3, 4] and values == [3.0, 2.5, 2.0 + 1 / 3, 2.25]


def test_report_command_line(full_run):
    import subprocess
    import sys

    (full_run / "report.md").unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "launch", "report", str(full_run)], capture_output=True, text=True)
    assert proc.returncode == 0 and (full_run / "report.md").exists(), proc.stderr
    missing = subprocess.run([sys.executable, "-m", "launch", "report", str(full_run / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
