"""The post-training study (issue 19): does each post-training stage make the tiny model better?

    .venv/bin/python benchmarks/posttrain_study.py [--run-dir runs/study] [--out benchmarks/results/posttrain_study.json]
                                                  [--no-run] [overrides...]

Runs ``python -m launch pipeline=study`` (launch/conf/pipeline/study.yaml: pretraining and SFT, CoT
fusion and two deliberation rounds, RL from the SFT checkpoint in two arms, plain GRPO and GRPO +
LaSeR, three rollout seeds each, and a 16-sample evaluation of every arm and of the SFT model), or with
``--no-run`` reads a finished run folder, and writes what it measured: each figure with its mean and
spread over the seeds, the claims it tests (held or not), and plots in ``<out stem>/``:

- greedy accuracy on the 120 held-out tasks: pretrained (SFT's "before"), SFT, GRPO, GRPO + LaSeR;
- LaSeR's self-verification (F1 of ``r_s > 0.5`` and AUROC against the verifier) on the policy's own
  samples: the first rollout (before any update) and the last one, and on the held-out tasks after RL;
  plain GRPO's and the SFT model's untrained score, read with the same constants, as the control;
- inference-time scaling at K = 4, 8, 16: majority vs self-reward-weighted majority vs best-of-K;
- CoT fusion: per difficulty, accuracy and response tokens of the fused model asked in short and in
  long mode against the SFT model's, and left to choose its mode: the share of short answers;
- deliberation: each round's model against the previous round's (win rate over judged pairs).

The run folder resumes like any pipeline run: re-running the command skips finished stages.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_record import REPO, command, git_commit, library_versions, machine, write_result  # noqa: E402

from megatron_ext.metrics import read_metrics  # noqa: E402

SEEDS = (0, 1, 2)
ARMS = ("grpo", "laser")
K_CURVE = ("4", "8", "16")
VOTES = ("pass_at_1", "majority", "weighted_majority", "best_of_k", "pass_at_k")


# A finished run folder's files, each read once (the sections below ask for them many times).
@functools.cache
def stage(run: Path, name: str) -> dict:
    found = sorted(run.glob(f"[0-9][0-9]_{name}/manifest.json"))
    if not found:
        raise SystemExit(f"{run}: no finished stage {name!r}; run the study first (without --no-run)")
    m = json.loads(found[0].read_text())
    if m.get("status") != "complete":
        raise SystemExit(f"{found[0]}: stage {name!r} is {m.get('status')}; re-run the study to finish it")
    return {**m, "dir": found[0].parent}


def spread(values: list[float | None]) -> dict:
    """Mean, sample std, min, max and the values themselves (None where a value is undefined)."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None, "values": values}
    return {"mean": round(statistics.fmean(xs), 4), "std": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
            "min": round(min(xs), 4), "max": round(max(xs), 4), "values": values}


@functools.cache
def rollouts(run: Path, name: str) -> list[dict]:
    return read_metrics(stage(run, name)["dir"] / "metrics" / "metrics.jsonl", split="rollout")


@functools.cache
def evaluation(run: Path, name: str) -> dict:
    return json.loads((stage(run, name)["dir"] / "evaluation.json").read_text())["results"]["synthetic"]


def accuracy_section(run: Path) -> dict:
    sft = stage(run, "sft")["final_metrics"]
    out = {"pretrained": sft["initial_task_accuracy"]["accuracy"], "sft": sft["task_accuracy"]["accuracy"]}
    for arm in ARMS:
        out[arm] = spread([stage(run, f"rl_{arm}_s{s}")["final_metrics"]["task_accuracy"]["accuracy"] for s in SEEDS])
    return out


def verification_section(run: Path) -> dict:
    def first_last(key: str) -> dict:
        return {"first_rollout": spread([rollouts(run, f"rl_laser_s{s}")[0].get(key) for s in SEEDS]),
                "last_rollout": spread([rollouts(run, f"rl_laser_s{s}")[-1].get(key) for s in SEEDS])}

    return {
        "laser_on_own_samples": {"f1": first_last("self_verify_f1"), "auroc": first_last("self_verify_auroc")},
        "held_out_after_rl": {arm: {m: spread([evaluation(run, f"eval_{arm}_s{s}")[m] for s in SEEDS])
                                    for m in ("f1", "auroc")} for arm in ARMS},
        "held_out_sft": {m: evaluation(run, "eval_sft")[m] for m in ("f1", "auroc")},
    }


def scaling_section(run: Path) -> dict:
    def at(result: dict, k: str) -> dict:
        return result if k == str(result["k"]) else result["at_k"][k]

    out = {"sft": {k: {v: at(evaluation(run, "eval_sft"), k)[v] for v in VOTES} for k in K_CURVE}}
    for arm in ARMS:
        out[arm] = {k: {v: spread([at(evaluation(run, f"eval_{arm}_s{s}"), k)[v] for s in SEEDS]) for v in VOTES}
                    for k in K_CURVE}
    return out


def fusion_section(run: Path, fusion_stage: Path | None) -> dict:
    """Greedy accuracy and response tokens per difficulty of the SFT model and the fused one, asked in
    short and in long mode, and (``auto``, with ``fusion.model_picks_mode``) left to choose: then the
    share of each mode it chose per difficulty."""
    folder = fusion_stage or stage(run, "cot_fusion")["dir"]
    fm = json.loads((Path(folder) / "manifest.json").read_text())["final_metrics"]

    def per_mode(accuracies: dict) -> dict:
        return {mode: {"accuracy": a["accuracy"], "by_difficulty": a["by_difficulty"],
                       "mean_response_tokens": round(a["mean_response_tokens"], 2),
                       "response_tokens_by_difficulty": a.get("response_tokens_by_difficulty"),
                       **({"mode_share_by_difficulty": a["mode_share_by_difficulty"]}
                          if "mode_share_by_difficulty" in a else {})}
                for mode, a in accuracies.items()}

    return {"stage": str(folder), "sft": per_mode(fm["initial_task_accuracy"]), "fused": per_mode(fm["task_accuracy"])}


def deliberation_section(run: Path) -> dict:
    """A deliberation stage judges its *parent* (the candidate) against references, then trains. So
    round r's trained model is judged by round r + 1 (its candidate): ``judged_in`` names the stage
    whose win rates are this model's. The last round's model has no later judge: accuracy only."""
    rounds = sorted((p.parent.name.split("_", 1)[1] for p in run.glob("[0-9][0-9]_deliberation_*/manifest.json")),
                    key=lambda name: int(name.rsplit("_", 1)[1]))
    out = {}
    for i, name in enumerate(rounds):
        m = stage(run, name)
        entry = {"accuracy_before_after": [m["final_metrics"]["initial_task_accuracy"]["accuracy"],
                                           m["final_metrics"]["task_accuracy"]["accuracy"]]}
        if i + 1 < len(rounds):
            win = stage(run, rounds[i + 1])["deliberation"]["win_rates"]
            entry.update({"judged_in": rounds[i + 1], "n_pairs": win["overall"]["n"],
                          "win_rate_by_reference": {ref: round(w["win_rate"], 4)
                                                    for ref, w in win["by_reference"].items()}})
        out[name] = entry
    first = stage(run, rounds[0])["deliberation"]["win_rates"]
    out["cot_fusion"] = {"judged_in": rounds[0], "n_pairs": first["overall"]["n"],
                         "win_rate_by_reference": {ref: round(w["win_rate"], 4)
                                                   for ref, w in first["by_reference"].items()}}
    return out


def curves(run: Path) -> dict:
    keys = ("verifier_reward_mean", "self_verify_auroc", "self_verify_f1", "laser_groups_over_std_threshold")
    return {f"{arm}_s{s}": {k: [r.get(k) for r in rollouts(run, f"rl_{arm}_s{s}")] for k in keys}
            for arm in ARMS for s in SEEDS}


def claims(result: dict) -> list[dict]:
    """Each claim the study tests, with the numbers that decide it. Where seeds differ, "held" needs
    every seed to show it (the worst seed beyond the baseline), so one lucky seed cannot make a claim
    hold; the evidence gives the sizes, to be read against the held-out set's standard error."""
    acc, ver, sc = result["accuracy"], result["self_verification"], result["inference_scaling"]
    out = []

    def add(claim: str, held: bool, evidence: str) -> None:
        out.append({"claim": claim, "held": bool(held), "evidence": evidence})

    n = result["held_out_tasks"]
    stderr = math.sqrt(acc["sft"] * (1 - acc["sft"]) / n)     # of one accuracy on n held-out tasks
    for arm in ARMS:
        a = acc[arm]
        add(f"RL ({arm}) raises greedy accuracy over SFT (every seed)", a["min"] > acc["sft"],
            f"SFT {acc['sft']:.3f}; {arm} {a['mean']:.3f} +- {a['std']:.3f} (min {a['min']:.3f}); the gain "
            f"{a['mean'] - acc['sft']:+.3f} = {round((a['mean'] - acc['sft']) * n):+d} of {n} tasks, against a "
            f"standard error of {stderr:.3f} for one accuracy on {n} tasks")
    after = ver["held_out_after_rl"]
    add("LaSeR's self-reward tells right from wrong (held-out AUROC above plain GRPO's untrained score)",
        after["laser"]["auroc"]["min"] > after["grpo"]["auroc"]["max"],
        f"AUROC LaSeR {after['laser']['auroc']['mean']:.3f} +- {after['laser']['auroc']['std']:.3f}, "
        f"GRPO {after['grpo']['auroc']['mean']:.3f} +- {after['grpo']['auroc']['std']:.3f}, "
        f"SFT {ver['held_out_sft']['auroc']:.3f}; F1 LaSeR {after['laser']['f1']['mean']}")
    add("LaSeR matches plain GRPO's accuracy (within the seeds' spread)",
        abs(acc["laser"]["mean"] - acc["grpo"]["mean"]) <= max(acc["laser"]["std"], acc["grpo"]["std"]) * 2,
        f"LaSeR {acc['laser']['mean']:.3f}, GRPO {acc['grpo']['mean']:.3f}")
    k16 = sc["laser"]["16"]
    add("self-reward-weighted majority beats plain majority at K = 16 (LaSeR arm)",
        k16["weighted_majority"]["mean"] > k16["majority"]["mean"],
        f"weighted {k16['weighted_majority']['mean']:.3f} vs majority {k16['majority']['mean']:.3f} "
        f"(best-of-K {k16['best_of_k']['mean']:.3f}, pass@1 {k16['pass_at_1']['mean']:.3f})")
    fused, sft = result["cot_fusion"]["fused"], result["cot_fusion"]["sft"]
    add("CoT fusion keeps short-mode accuracy while adding a long mode",
        fused["short"]["accuracy"] >= sft["short"]["accuracy"],
        f"short {sft['short']['accuracy']:.3f} -> {fused['short']['accuracy']:.3f}, "
        f"long {sft['long']['accuracy']:.3f} -> {fused['long']['accuracy']:.3f}")
    if "auto" in fused:
        auto = fused["auto"]
        share = {d: v["short"] for d, v in auto["mode_share_by_difficulty"].items()}
        easy, hard = min(share), max(share)
        add("the fused model, left to choose, answers easy tasks in short mode more often than hard ones",
            share[easy] > share[hard],
            f"short-mode share by difficulty {share}; accuracy {auto['accuracy']:.3f} (always short "
            f"{fused['short']['accuracy']:.3f}, always long {fused['long']['accuracy']:.3f}); response tokens "
            f"{auto['response_tokens_by_difficulty']} vs short {fused['short']['response_tokens_by_difficulty']}, "
            f"long {fused['long']['response_tokens_by_difficulty']}")
    delib = result["deliberation"]
    judged = [name for name in delib if name.startswith("deliberation_") and "win_rate_by_reference" in delib[name]]
    previous = {name: ("cot_fusion" if i == 0 else judged[i - 1]) for i, name in enumerate(judged)}
    rates = {name: delib[name]["win_rate_by_reference"].get(previous[name]) for name in judged}
    add("each deliberation round's model beats the previous round's (round 1: the CoT-fusion model it started from)",
        all(r is not None and r > 0.5 for r in rates.values()),
        "; ".join(f"{name} vs {previous[name]}: {rates[name]} ({delib[name]['n_pairs']} judged pairs, ties count "
                  f"half; all references {delib[name]['win_rate_by_reference']})" for name in judged)
        + "; greedy accuracy before -> after each round: "
        + ", ".join(f"{name} {delib[name]['accuracy_before_after']}" for name in delib if name != "cot_fusion"))
    return out


def _figure(folder: Path, file: str, panels: tuple, draw, height: float = 3.5) -> str:
    """One row of ``len(panels)`` plots, ``draw(ax, panel)`` each, saved as ``folder / file``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, height))
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        draw(ax, panel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / file, dpi=100)
    return file


def plots(result: dict, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)

    def learning_curve(ax, panel) -> None:
        key, title = panel
        for name, c in result["curves"].items():
            if key == "self_verify_auroc" and name.startswith("grpo"):
                continue
            ax.plot([v if v is not None else math.nan for v in c[key]], label=name,
                    color="tab:orange" if name.startswith("laser") else "tab:blue", alpha=0.8)
        ax.set_title(title)
        ax.set_xlabel("rollout (= update)")

    def histogram(ax, arm) -> None:
        scores = result["score_samples"][arm]
        ax.hist([scores["correct"], scores["incorrect"]], bins=30, label=["correct", "incorrect"],
                color=["tab:green", "tab:red"], alpha=0.7, histtype="stepfilled")
        ax.set_title(f"held-out r_s: {arm}" + ("" if arm == "sft" else ", seed 0"))

    def voting_curve(ax, arm) -> None:
        curve = result["inference_scaling"][arm]
        for vote in VOTES[:4]:
            ys = [curve[k][vote]["mean"] if arm != "sft" else curve[k][vote] for k in K_CURVE]
            ax.plot([int(k) for k in K_CURVE], ys, marker="o", label=vote)
        ax.set_xscale("log", base=2)
        ax.set_xticks([int(k) for k in K_CURVE], labels=list(K_CURVE))
        ax.set_title(f"held-out accuracy vs K: {arm}")
        ax.set_xlabel("K samples")

    curves = (("verifier_reward_mean", "verifier reward per rollout"),
              ("self_verify_auroc", "self-reward AUROC per rollout (own samples)"))
    return [_figure(folder, "learning_curves.png", curves, learning_curve, height=4),
            _figure(folder, "self_reward_histograms.png", ("sft",) + ARMS, histogram),
            _figure(folder, "voting_curves.png", ("sft",) + ARMS, voting_curve)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "study"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "posttrain_study.json"))
    parser.add_argument("--no-run", action="store_true", help="only read a finished run folder")
    parser.add_argument("--fusion-stage", default=None,
                        help="read the CoT-fusion numbers from this cot_fusion stage folder instead of the run's")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the study pipeline")
    args = parser.parse_args()
    run = Path(args.run_dir).resolve()
    wall = None
    if not args.no_run:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "launch", "pipeline=study", f"run_dir={run}", *args.overrides],
                              cwd=REPO)
        if proc.returncode != 0:
            sys.exit(f"the study pipeline failed ({proc.returncode}); re-run to resume it (logs in {run})")
        wall = round(time.perf_counter() - start, 1)

    result = {
        "command": command(), "commit": git_commit(), "machine": machine(), "libraries": library_versions(),
        "run_dir": str(run), "wall_time_s": wall,
        "stage_wall_time_s": {p.parent.name: round(json.loads(p.read_text())["wall_time_s"], 1)
                              for p in sorted(run.glob("[0-9][0-9]_*/manifest.json"))},
        "seeds": list(SEEDS),
        "held_out_tasks": stage(run, "sft")["final_metrics"]["task_accuracy"]["n"],
        "accuracy": accuracy_section(run),
        "self_verification": verification_section(run),
        "inference_scaling": scaling_section(run),
        "cot_fusion": fusion_section(run, Path(args.fusion_stage).resolve() if args.fusion_stage else None),
        "deliberation": deliberation_section(run),
        "curves": curves(run),
        "score_samples": {"sft": evaluation(run, "eval_sft")["scores"],
                          **{arm: evaluation(run, f"eval_{arm}_s0")["scores"] for arm in ARMS}},
    }
    result["claims"] = claims(result)
    out = Path(args.out)
    folder = out.resolve().parent / out.stem
    result["plots"] = [str(folder / p) if not folder.is_relative_to(REPO) else str((folder / p).relative_to(REPO))
                       for p in plots(result, folder)]
    write_result(out, result)
    for c in result["claims"]:
        print(f"[{'held' if c['held'] else 'did not hold'}] {c['claim']}: {c['evidence']}")


if __name__ == "__main__":
    main()
