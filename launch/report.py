"""A run report: ``<run_dir>/report.md`` with PNG plots under ``<run_dir>/report/``.

``summary.txt`` gives one line per stage, and only once the whole pipeline finished; reading a run
otherwise means opening a dozen ``metrics.jsonl`` files. The report reads only what stages leave on
disk (``manifest.json``, ``metrics/metrics.jsonl``, ``rollouts.jsonl``, ``evaluation.txt``) and
decides what to show from the data, not from the stage kind, so it works on a partial or running
run and on stage kinds it has never heard of (a manifest row and whatever curves were logged).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Figure, not pyplot: no global state or backend to switch; savefig draws PNGs with Agg
from matplotlib.figure import Figure

from megatron_ext import manifest as manifest_io
from megatron_ext.errors import ConfigError

REPORT_FILE = "report.md"
PLOT_DIR = "report"
# megatron-core's router aux-loss tracker names; the trainer logs each summed over MoE layers
MOE_BALANCE_KEYS = ("load_balancing_loss", "seq_load_balancing_loss", "global_load_balancing_loss", "z_loss")
PLOT_NOTES = {
    "loss.png": "Validation loss from step 0 (the starting weights) where recorded. RL stages: the "
                "policy-gradient loss.",
    "lr.png": "`lr`: default param groups, `lr_experts`: routed experts with a scaled LR.",
    "moe_balance.png": "megatron-core's switch load-balancing loss per MoE layer (unscaled): 1 when the "
                       "router spreads tokens evenly, up to the number of experts when one expert takes all. "
                       "Runs that logged only the sum over layers show the sum.",
    "rl.png": "Per rollout: reward, and how well the self-reward score (> 0.5 predicts correct) separates "
              "correct from incorrect responses.",
}
REWARD_KEYS = ("reward_mean", "verifier_reward_mean", "first_draw_reward")
SELF_VERIFY_KEYS = ("self_verify_acc_correct", "self_verify_acc_incorrect", "self_verify_f1")


@dataclass
class Stage:
    """One ``NN_<stage>`` folder (or a stage of ``pipeline.order`` that has none yet)."""

    name: str
    folder: Path | None
    manifest: dict | None
    rows: dict[str, list[dict]] = field(default_factory=dict)  # metrics.jsonl records by split

    def series(self, split: str, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one logged key, skipping rows without a finite number for it."""
        pts = [(r["step"], r[key]) for r in self.rows.get(split, [])
               if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    def per_layer(self, split: str, key: str) -> dict[str, tuple[list[int], list[float]]]:
        """A per-layer list key (``<name>_per_layer``) as one series per layer, dropping layers that
        never logged a value (dense, attention or Mamba layers of a hybrid)."""
        rows = [r for r in self.rows.get(split, []) if isinstance(r.get(key), list)]
        width = max((len(r[key]) for r in rows), default=0)
        out = {}
        for layer in range(width):
            pts = [(r["step"], r[key][layer]) for r in rows if layer < len(r[key])
                   and isinstance(r[key][layer], (int, float)) and math.isfinite(r[key][layer])]
            if any(v for _, v in pts):
                out[f"layer {layer + 1}"] = ([p[0] for p in pts], [p[1] for p in pts])
        return out


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and its plots for the run folder ``run_dir``; returns the Markdown's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} does not exist: pass the run_dir of a pipeline run (the "
                          f"folder holding pipeline.yaml and the NN_<stage> folders)")
    pipeline = _read_yaml(run_dir / "pipeline.yaml")
    stages = find_stages(run_dir, pipeline)
    if not stages:
        raise ConfigError(f"{run_dir} is not a pipeline run folder: it has no pipeline.yaml and no NN_<stage> "
                          f"folders; pass the run_dir the pipeline was launched with")
    cfg = pipeline or next((s.manifest["config"] for s in stages if s.manifest and "config" in s.manifest), {})
    plot_dir = run_dir / PLOT_DIR
    plot_dir.mkdir(exist_ok=True)
    parts = [_header(run_dir, cfg), "## Stages\n\n" + stage_table(stages), rl_table(stages),
             _evaluations(stages), _plots(stages, plot_dir)]
    path = run_dir / REPORT_FILE
    path.write_text("\n\n".join(p for p in parts if p) + "\n")
    return path


# -- reading the run folder ------------------------------------------------------------------------
def _read_yaml(path: Path) -> dict:
    cfg = yaml.safe_load(path.read_text()) if path.exists() else None
    return cfg if isinstance(cfg, dict) else {}


def json_lines(path: Path) -> list[dict]:
    """The records of a JSON-lines file, skipping a torn last line (a running stage's)."""
    def parse(line: str) -> Any:
        try:
            return json.loads(line)
        except ValueError:
            return None
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(parse, lines) if isinstance(r, dict)]


def read_rows(path: Path) -> dict[str, list[dict]]:
    """``metrics.jsonl`` records by split, in step order; the last record of a step wins (a resumed
    stage replays the steps after its checkpoint)."""
    by_split: dict[str, dict[int, dict]] = {}
    for record in json_lines(path):
        if isinstance(record.get("step"), int):
            by_split.setdefault(record.get("split", "train"), {})[record["step"]] = record
    return {split: [rows[s] for s in sorted(rows)] for split, rows in by_split.items()}


def find_stages(run_dir: Path, pipeline: dict) -> list[Stage]:
    """Stage folders in their ``NN_`` order, then stages of ``pipeline.order`` not started yet."""
    stages = []
    for folder in sorted(p for p in run_dir.iterdir() if p.is_dir() and re.match(r"\d+_.", p.name)):
        stages.append(Stage(folder.name.split("_", 1)[1], folder, manifest_io.read(folder),
                            read_rows(folder / "metrics" / "metrics.jsonl")))
    seen = {s.name for s in stages}
    order = (pipeline.get("pipeline") or {}).get("order") or []
    return stages + [Stage(name, None, None) for name in order if name not in seen]


# -- the stage table -------------------------------------------------------------------------------
def _status(stage: Stage) -> str:
    m = stage.manifest
    if stage.folder is None:
        return "not started"
    if m is None:
        return "unfinished (no manifest)"
    if m.get("status") == manifest_io.COMPLETE:
        return "complete"
    last = (m.get("attempts") or [{}])[-1]
    if last.get("ended"):
        return f"unfinished ({last['ended']} at step {last.get('at_step', '?')})"
    return "unfinished (running or killed)"


def accuracy_text(value: Any) -> str | None:
    """Task accuracy: ``{accuracy}`` or one ``{accuracy}`` per thinking mode."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("accuracy"), (int, float)):
        return f"{value['accuracy']:.3f}"
    modes = [f"{mode} {v['accuracy']:.3f}" for mode, v in value.items()
             if isinstance(v, dict) and isinstance(v.get("accuracy"), (int, float))]
    return " / ".join(modes) or None


def _before_after(before: str | None, after: str | None) -> str:
    return f"{before or '?'} -> {after or '?'}" if before or after else "-"


def _fmt(value: Any, spec: str = ".4f") -> str | None:
    return f"{value:{spec}}" if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _table_row(stage: Stage) -> list[str]:
    m = stage.manifest or {}
    fm = m.get("final_metrics") or {}
    if not m:
        return [stage.name, "?", _status(stage)] + ["-"] * 6
    # an unfinished stage's manifest has the steps of its last checkpoint; its metrics may go further
    steps = max([m.get("steps") or 0] + stage.series("train", "loss")[0][-1:])
    attempts = m.get("attempts") or []
    wall = m.get("wall_time_s") if m.get("status") == manifest_io.COMPLETE else \
        sum(a.get("elapsed_s", 0.0) for a in attempts)
    resumes = f" ({len(attempts) - 1} resumed)" if len(attempts) > 1 else ""
    return [stage.name, str(m.get("kind", "?")), _status(stage), str(steps), _fmt(m.get("tokens_seen"), ",") or "-",
            _before_after(_fmt(fm.get("initial_valid_loss")), _fmt(fm.get("valid_loss"))),
            _before_after(accuracy_text(fm.get("initial_task_accuracy")), accuracy_text(fm.get("task_accuracy"))),
            f"{wall:.1f}s" if _fmt(wall) else "-", f"{len(attempts)}{resumes}"]


def stage_table(stages: list[Stage]) -> str:
    """Markdown table, one row per stage; "before" is the parent's value (e.g. the pretrained model's
    valid loss for SFT), as the stages record it."""
    header = ["stage", "kind", "status", "steps", "tokens", "valid loss", "task accuracy", "wall time", "attempts"]
    return _markdown_table(header, [_table_row(s) for s in stages])


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header)] + rows)


def rl_table(stages: list[Stage]) -> str:
    """RL stages' manifest results: the first-draw reward per pass over the prompt pool (every pass
    draws the same prompts, so passes compare like with like) and the self-reward's verification
    of held-out answers (LaSeR's test-time evaluation)."""
    rows = []
    for s in stages:
        fm = (s.manifest or {}).get("final_metrics") or {}
        if "reward_by_pool_pass" in fm or "self_reward_eval" in fm:
            held_out = fm.get("self_reward_eval") or {}
            passes = " / ".join(f"{v:.3f}" for v in (fm.get("reward_by_pool_pass") or {}).values())
            rows.append([s.name, str(fm.get("rollouts", "-")), _fmt(fm.get("c_ref"), ".2f") or "-", passes or "-"]
                        + [_fmt(held_out.get(k), ".3f") or "-" for k in ("acc_correct", "acc_incorrect", "f1")])
    header = ["stage", "rollouts", "c_ref", "reward per pool pass", "self-verify acc correct", "acc incorrect", "F1"]
    return "## RL\n\n" + _markdown_table(header, rows) if rows else ""


def _header(run_dir: Path, cfg: dict) -> str:
    pipe, model, par = cfg.get("pipeline") or {}, cfg.get("model") or {}, cfg.get("parallel") or {}
    shape = ", ".join(f"{k} {model[k]}" for k in ("num_layers", "hidden_size", "num_moe_experts", "moe_router_topk")
                      if model.get(k) is not None)
    return "\n".join([
        f"# Run report: {pipe.get('name', run_dir.name)}", "",
        f"- run folder: `{run_dir.resolve()}`",
        f"- pipeline order: {' -> '.join(pipe.get('order') or []) or '?'}",
        f"- model: {model.get('family', '?')}" + (f" ({shape})" if shape else ""),
        f"- parallel layout: {', '.join(f'{k}={v}' for k, v in par.items()) or '?'}",
        f"- written: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
    ])


# -- plots -----------------------------------------------------------------------------------------
Panel = tuple[str, dict[str, tuple[list, list]]]  # (title, {line label: (steps, values)})


def grid_plot(path: Path, title: str, panels: list[Panel], ylabel: str, cols: int = 3,
              ylim: tuple[float, float] | None = None) -> Path | None:
    """One small subplot per panel (stages have their own step counters and loss scales, so one axis
    would mislead); None, and no file, when nothing was logged."""
    panels = [(t, {k: v for k, v in lines.items() if v[0]}) for t, lines in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    cols = min(cols, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.6 * nrows + 0.4), dpi=100)
    fig.suptitle(title)
    for i, (panel_title, lines) in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, markersize=3, linewidth=1.2, label=label)
        _style(ax, panel_title, "step", ylabel, legend=len(lines) > 1)
        if ylim:
            ax.set_ylim(*ylim)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _style(ax, title: str, xlabel: str, ylabel: str, legend: bool) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7)


def _valid_loss(stage: Stage) -> tuple[list, list]:
    """Logged validation losses, from step 0 (the starting weights, in the manifest) when recorded."""
    steps, values = stage.series("valid", "loss")
    initial = ((stage.manifest or {}).get("final_metrics") or {}).get("initial_valid_loss")
    if isinstance(initial, (int, float)) and steps and steps[0] != 0:
        steps, values = [0] + steps, [initial] + values
    return steps, values


def calibration_plot(path: Path, stages: list[Stage]) -> Path | None:
    """LaSeR self-reward calibration from the logged samples (``rollouts.jsonl``): the share of
    responses the verifier accepts per self-reward score bin (equal-count bins). LaSeR's MSE loss
    trains the score toward the 0/1 verifier reward (``posttrain/laser.py``), so a calibrated
    score lies on y = x."""
    points = {}
    for s in stages:
        rows = json_lines(s.folder / "rollouts.jsonl") if s.folder else []
        pts = [(r["self_reward"], float(r["verifier"])) for r in rows
               if isinstance(r.get("self_reward"), (int, float)) and isinstance(r.get("verifier"), (int, float))]
        if pts:
            points[s.name] = pts
    if not points:
        return None
    fig = Figure(figsize=(4.5, 3.6), dpi=100)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    for name, pts in points.items():
        pts.sort()
        n_bins = max(1, min(8, len(pts) // 5))
        bins = [pts[i * len(pts) // n_bins:(i + 1) * len(pts) // n_bins] for i in range(n_bins)]
        xs = [sum(p[0] for p in b) / len(b) for b in bins if b]
        ys = [sum(p[1] for p in b) / len(b) for b in bins if b]
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{name} ({len(pts)} samples)")
    _style(ax, "self-reward calibration", "self-reward score (bin mean)", "share the verifier accepts", legend=True)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _plots(stages: list[Stage], plot_dir: Path) -> str:
    """Each plot whose data exists, as a Markdown section linking the PNG by relative path."""
    def lines(split, match):  # every logged key that matches, one line each
        return [(s.name, {k: s.series(split, k) for k in sorted({k for r in s.rows.get(split, []) for k in r
                                                                 if match(k)})}) for s in stages]

    loss = [(s.name, {"train": s.series("train", "loss"), "valid": _valid_loss(s)}) for s in stages]
    rl = [panel for s in stages for panel in (
        (f"{s.name}: reward", {k: s.series("rollout", k) for k in REWARD_KEYS}),
        (f"{s.name}: self-verification", {k.removeprefix("self_verify_"): s.series("rollout", k)
                                          for k in SELF_VERIFY_KEYS}))]
    # per layer where logged (the trainer's ``*_per_layer`` lists), else the sums over layers
    moe = [(s.name, s.per_layer("train", "load_balancing_loss_per_layer")
            or {k: s.series("train", k) for k in MOE_BALANCE_KEYS}) for s in stages]
    specs = [
        ("Training loss", "loss.png", loss, "loss", {}),
        ("Learning rates per param group", "lr.png", lines("train", lambda k: k == "lr" or k.startswith("lr_")),
         "lr", {}),
        ("MoE load balance per layer", "moe_balance.png", moe, "load-balancing loss", {}),
        ("RL reward and self-verification", "rl.png", rl, "share", {"cols": 2, "ylim": (0, 1.05)}),
    ]
    sections = []
    for title, name, panels, ylabel, layout in specs:
        if grid_plot(plot_dir / name, title, panels, ylabel, **layout):
            sections.append(f"### {title}\n\n![{title}]({PLOT_DIR}/{name})\n\n{PLOT_NOTES[name]}")
    if calibration_plot(plot_dir / "calibration.png", stages):
        sections.append(f"### Self-reward calibration\n\n![calibration]({PLOT_DIR}/calibration.png)\n\n"
                        "From the samples logged in each RL stage's `rollouts.jsonl`.")
    return "## Plots\n\n" + "\n\n".join(sections) if sections else ""


def _evaluations(stages: list[Stage]) -> str:
    texts = [(s.name, (s.folder / "evaluation.txt").read_text().rstrip()) for s in stages
             if s.folder and (s.folder / "evaluation.txt").exists()]
    return "\n\n".join(f"## Evaluation ({name})\n\n```\n{text}\n```" for name, text in texts)


def summary_table(manifests: list[dict]) -> str:
    """``summary.txt``: one line per stage: steps, tokens, validation loss and verifiable-task accuracy before -> after
    (post-training stages; before = the parent's, e.g. the pretrained model's for SFT), wall time."""
    rows = [("stage", "steps", "tokens", "valid loss", "task accuracy", "wall time")]
    for m in manifests:
        fm = m["final_metrics"]
        before, after = fm.get("initial_valid_loss"), fm.get("valid_loss")
        loss = f"{before:.4f} -> {after:.4f}" if before is not None and after is not None else "-"
        acc_before, acc_after = accuracy_text(fm.get("initial_task_accuracy")), accuracy_text(fm.get("task_accuracy"))
        acc = f"{acc_before} -> {acc_after}" if acc_before and acc_after else "-"
        rows.append((m["stage"], str(m["steps"]), f"{m['tokens_seen']:,}", loss, acc, f"{m['wall_time_s']:.1f}s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
