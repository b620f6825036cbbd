"""The sampling post-training stages in a real pipeline run: SFT -> CoT fusion -> two deliberation rounds
-> RL stage I -> RL stage II.

SFT starts from random init on one easy task kind (largest / smallest of three digits), which the
tiny model learns in ~100 steps to roughly 40-50% greedy accuracy, so the later stages see both
verified and failed answers. About two minutes on 2 cores.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines.verifiable_tasks import generate_tasks, verify
from launch.config import load_config

STAGES = ["sft", "cot_fusion", "deliberation_1", "deliberation_2", "rl_stem", "rl_general", "evaluate"]
TASKS = ["stages.{s}.eval.kinds=[comparison]", "stages.{s}.eval.difficulties=[1]",
         "stages.{s}.eval.num_tasks=400", "stages.{s}.eval.max_eval_tasks=24"]
SAMPLING = ["stages.{s}.prompts.kinds=[comparison]", "stages.{s}.prompts.difficulties=[1]",
            "stages.{s}.prompts.num_tasks=40"]
TRAIN = ["stages.{s}.train.steps=4", "stages.{s}.train.warmup_steps=1", "stages.{s}.train.save_interval=4",
         "stages.{s}.train.eval_interval=4", "stages.{s}.train.eval_iters=1"]
RL = ["stages.{s}.prompts.num_prompts=32", "stages.{s}.prompts.sources.synthetic.kinds=[comparison]",
      "stages.{s}.prompts.sources.synthetic.difficulties=[1]", "stages.{s}.rl.groups=4",
      "stages.{s}.rl.group_size=4", "stages.{s}.rl.max_sampling_rounds=2", "stages.{s}.train.micro_batch_size=4",
      "stages.{s}.train.global_batch_size=8", "stages.{s}.self_reward_eval.num_tasks=6",
      "stages.{s}.laser.loss_warmup_steps=0", "stages.{s}.laser.adv_warmup_steps=2"]
OVERRIDES = [
    f"pipeline.order=[{','.join(STAGES)}]",
    "data.sources.prose.num_docs=300", "data.sources.arithmetic.num_docs=300", "data.sources.code.num_docs=200",
    "stages.sft.tasks.kinds=[comparison]", "stages.sft.tasks.difficulties=[1]", "stages.sft.tasks.num_tasks=400",
    "stages.sft.train.steps=120", "stages.sft.train.lr=2e-3", "stages.sft.train.save_interval=120",
    "stages.sft.train.eval_interval=120", "stages.sft.train.eval_iters=1",
    "stages.cot_fusion.fusion.k_short=2", "stages.cot_fusion.fusion.max_long_attempts=2",
    "stages.deliberation_1.budget=24", "stages.deliberation_2.budget=24",
    *[o.format(s=s) for s in STAGES for o in TASKS],
    *[o.format(s=s) for s in STAGES[1:4] for o in SAMPLING],
    *[o.format(s=s) for s in STAGES[1:6] for o in TRAIN],
    *[o.format(s=s) for s in STAGES[4:6] for o in RL],
    "stages.evaluate.k=2", "stages.evaluate.scaling_k=[1]", "stages.evaluate.max_problems=4",
    "stages.evaluate.sets=[amc23]",
    "stages.rl_general.prompts.sources.instruction.weight=0.5",
    # RL samples (and so scores z_c) at 0.9; the evaluate stage samples at its own 0.7 and must still
    # score at 0.9
    "stages.rl_stem.sampling.temperature=0.9", "stages.rl_general.sampling.temperature=0.9",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("posttrain") / "run"
    proc = subprocess.run([sys.executable, "-m", "launch", f"run_dir={run_dir}", *OVERRIDES],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def manifest(run_dir: Path, index: int) -> dict:
    return json.loads((run_dir / f"{index + 1:02d}_{STAGES[index]}" / "manifest.json").read_text())


def tasks_by_id(n: int = 40, seed_offset: int = 1) -> dict:
    cfg = load_config([])
    return {t.id: t for t in generate_tasks(["comparison"], n, int(cfg.seed) + seed_offset, difficulties=[1])}


def test_every_stage_completes_and_reports_task_accuracy(run):
    for i, name in enumerate(STAGES[:-1]):
        m = manifest(run, i)
        assert m["status"] == "complete", name
        assert (run / f"{i + 1:02d}_{name}" / m["checkpoint"] / "metadata.json").exists()
        assert "task_accuracy" in m["final_metrics"] and "initial_task_accuracy" in m["final_metrics"]
        if i:  # each stage starts from the one before it
            prev = manifest(run, i - 1)
            assert m["parent_checkpoint"].endswith(prev["checkpoint"])
    sft = manifest(run, 0)["final_metrics"]
    # From random init to a model that answers some of the held-out tasks right.
    assert sft["initial_task_accuracy"]["accuracy"] == 0.0
    assert sft["task_accuracy"]["accuracy"] > 0.15
    assert "task accuracy" in (run / "summary.txt").read_text()


def test_a_stage_before_is_its_parents_after_measured_once(run):
    """Greedy answers of the same weights on the same tasks are the same answers: a stage whose parent
    measured exactly its eval (same model config, preset, seed) reads that instead of a second pass."""
    reused = []
    for i in range(1, len(STAGES) - 1):
        before = manifest(run, i)["final_metrics"]["initial_task_accuracy"]
        parent_after = manifest(run, i - 1)["final_metrics"]["task_accuracy"]
        candidates = [parent_after, *(v for v in parent_after.values() if isinstance(v, dict))]
        for result in (before.values() if "accuracy" not in before else [before]):
            if "from_parent" in result:
                assert result["from_parent"] == f"{i:02d}_{STAGES[i - 1]}"
                match = [c for c in candidates if c.get("measured_with") == result["measured_with"]]
                assert match and {**match[0], "from_parent": result["from_parent"]} == result
                reused.append(STAGES[i])
    # every stage measures the same single-mode preset as its parent, except cot_fusion (two modes)
    assert {"deliberation_2", "rl_stem", "rl_general"} <= set(reused), reused


def test_cot_fusion_routes_by_pass_rate_and_every_target_verifies(run):
    st = load_config([]).stages.cot_fusion.fusion
    folder = run / "02_cot_fusion" / "fused"
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    summary = json.loads((folder / "summary.json").read_text())
    tasks = tasks_by_id()
    assert records and summary["n_kept"] == len(records)
    assert summary["n_items"] == summary["n_kept"] + summary["n_dropped"]
    for r in records:
        task = tasks[r["item_id"]]
        assert verify(task, r["target"])[0] == 1.0, r
        if r["mode"] == "short":
            assert r["pass_rate"] >= st.easy_threshold and r["difficulty_label"] == "easy"
        else:
            assert r["pass_rate"] < st.easy_threshold and r["difficulty_label"] == "hard"
            assert r["target"] == r["short_attempt"] + st.bridge + r["continuation"]
            assert verify(task, r["short_attempt"])[0] == 0.0
    m = manifest(run, 1)
    assert m["fused_data"]["examples"] == len(records)
    assert m["fused_data"]["short"] + m["fused_data"]["long"] == len(records)
    accuracy = m["final_metrics"]["task_accuracy"]
    assert set(accuracy) == {"short", "long", "auto"}     # fusion.model_picks_mode: the model also chooses
    for shares in accuracy["auto"]["mode_share_by_difficulty"].values():
        assert sum(shares.values()) == pytest.approx(1.0)
    # SFT never learned to choose a mode: asked without one, it starts with its answer
    assert m["final_metrics"]["initial_task_accuracy"]["auto"]["mode_share_by_difficulty"]["1"]["none"] == 1.0
    assert summary["generation"]["tokens_per_s"] > 0


@pytest.mark.parametrize("index,references", [(2, ["sft"]), (3, ["sft", "cot_fusion"])])
def test_deliberation_rounds_keep_battles_win_rates_and_verified_data(run, index, references):
    folder = run / f"{index + 1:02d}_{STAGES[index]}" / "round"
    battles = [json.loads(line) for line in (folder / "battles.jsonl").read_text().splitlines()]
    table = json.loads((folder / "win_rates.json").read_text())
    data = [json.loads(line) for line in (folder / "training_data.jsonl").read_text().splitlines()]
    assert table["round"] == index - 1
    assert {b["reference"] for b in battles} == set(references) == set(table["by_reference"])
    wins = sum(b["winner"] == "candidate" for b in battles)
    ties = sum(b["winner"] == "tie" for b in battles)
    assert table["overall"]["win_rate"] == pytest.approx((wins + ties / 2) / len(battles))
    assert set(table["categories"]) == {"comparison"}
    tasks = tasks_by_id(seed_offset=10 + index - 1)
    assert data and len(data) <= 24
    for r in data:  # only answers the verifier accepts become training data
        assert verify(tasks[r["item_id"]], r["answer"])[0] == 1.0
    m = manifest(run, index)
    assert m["final_metrics"]["win_rate"] == table["overall"]["win_rate"]
    assert m["deliberation"]["selected"] == len(data)
    assert set(m["deliberation"]["references"]) == set(references)


@pytest.mark.parametrize("index", [4, 5])
def test_rl_stages_log_rollouts_and_the_self_reward(run, index):
    folder = run / f"{index + 1:02d}_{STAGES[index]}"
    m = manifest(run, index)
    fm = m["final_metrics"]
    assert m["steps"] == 4 and m["rl"]["updates_per_rollout"] == 2  # 4 groups x 4 answers / 8 a step
    records = [json.loads(line) for line in (folder / "metrics" / "metrics.jsonl").read_text().splitlines()]
    rollouts = [r for r in records if r["split"] == "rollout"]
    updates = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in rollouts] == [0, 2] and len(updates) == 4
    for r in rollouts:
        assert 0 <= r["reward_mean"] <= 1 and r["kept_groups"] <= 4
        assert r["c_ref"] == fm["c_ref"]
        assert r["truncated"] == pytest.approx(1 - r["finished"])
        assert 0 <= r["laser_groups_over_std_threshold"] <= 1
    # advantages take the self-reward from update 2 on (rl_stem: loss warm-up 0 + 2; rl_general: 0 + 2)
    assert [r["laser_in_advantages"] for r in rollouts] == [0.0, 1.0]
    assert len(m["data_fingerprint"]) == 64
    assert all("kl" in u and "clip_frac" in u and math.isfinite(u["loss"]) for u in updates)
    # c_ref is estimated once, from stage I's first rollout, kept for resumes and inherited by stage II
    c_ref = json.loads((folder / "laser_c_ref.json").read_text())
    stem = json.loads((run / "05_rl_stem" / "laser_c_ref.json").read_text())
    assert stem["estimated_at_rollout"] == 0 and stem["c_ref"] < 0
    assert c_ref["c_ref"] == fm["c_ref"] == stem["c_ref"]
    assert (c_ref["beta"], c_ref["temperature"]) == (0.1, 0.9)
    if index == 5:
        assert c_ref["inherited_from"] == "05_rl_stem/laser_c_ref.json"   # relative: the run folder may move
    logged = [json.loads(line) for line in (folder / "rollouts.jsonl").read_text().splitlines()]
    assert [r["rollout"] for r in logged] == [0] * 8 + [1] * 8
    assert all(r["reason"] and (r["verifier"] == 1.0 or r["reason"] != "correct") for r in logged)
    assert all((r["self_reward"] is None) == (not r["finished"]) for r in logged)   # truncated: no score
    ev = fm["self_reward_eval"]
    assert ev["n_prompts"] == 6 and ev["k"] == 4
    assert 0 <= ev["pass_at_1"] <= ev["pass_at_k"] <= 1
    assert list(fm["reward_by_pool_pass"]) and fm["task_accuracy"]["n"] == 24


def test_evaluate_writes_the_scaling_table_and_hands_on_the_checkpoint(run):
    m = manifest(run, 6)
    assert m["status"] == "complete" and m["steps"] == 0
    assert (run / "07_evaluate" / "checkpoint").resolve() == (run / "06_rl_general" / manifest(run, 5)["checkpoint"]).resolve()
    assert os.readlink(run / "07_evaluate" / "checkpoint") == f"../06_rl_general/{manifest(run, 5)['checkpoint']}"
    results = m["final_metrics"]["evaluation"]
    assert set(results) == {"synthetic", "amc23"}
    synthetic = results["synthetic"]
    assert synthetic["n_prompts"] == 4 and synthetic["k"] == 2 and synthetic["skipped_too_long"] == 0
    assert synthetic["pass_at_1"] <= synthetic["pass_at_k"]
    one = synthetic["at_k"]["1"]     # each prompt's first answer: pass@K is pass@1
    assert one["k"] == 1 and one["pass_at_k"] == one["pass_at_1"]
    assert results["amc23"]["n_prompts"] + results["amc23"]["skipped_too_long"] == 4
    table = (run / "evaluation.txt").read_text()
    for column in ("pass@1", "maj@K", "weighted maj@K", "best-of-K", "self-verify F1"):
        assert column in table
    evaluation = json.loads((run / "07_evaluate" / "evaluation.json").read_text())
    # the self-reward is scored with the constants RL trained it with, not the evaluate stage's sampling
    assert evaluation["laser"] == {"c_ref": manifest(run, 5)["final_metrics"]["c_ref"], "beta": 0.1,
                                   "temperature": 0.9}
    assert evaluation["sampling_temperature"] == 0.7
    assert len(m["data_fingerprint"]) == 64
