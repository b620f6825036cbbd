"""The staged pipeline runner: prepares data once, then runs ``pipeline.order`` stage by stage.

Each stage runs as its own torchrun job in ``<run_dir>/<NN>_<stage>/`` and hands its final checkpoint
to the next. Re-running the same command skips stages whose manifest says ``complete`` and resumes an
unfinished one from its latest checkpoint. A finished stage is never re-run or overwritten: if the
config that defines it changed, the runner stops and says what changed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from megatron_ext import manifest
from megatron_ext.errors import ConfigError
from megatron_ext.fault_tolerance import PREEMPTION_SIGNALS
from megatron_ext.quiet import quiet_known_warnings
from megatron_ext.stage import stage_dir


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, log: Path):
        super().__init__(
            f"stage {stage!r} failed with exit code {returncode}; its log is {log}. "
            f"Re-running the same command resumes it from its last checkpoint."
        )
        self.stage, self.returncode, self.log = stage, returncode, log


class StagePreempted(RuntimeError):
    def __init__(self, stage: str, detail: str):
        super().__init__(f"stage {stage!r}: {detail}. Re-run the same command (or requeue) to resume.")
        self.stage = stage


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _describe_changes(old: dict, new: dict, limit: int = 5) -> str:
    a, b = _flatten(old), _flatten(new)
    changed = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    more = f" (and {len(changed) - limit} more)" if len(changed) > limit else ""
    return "; ".join(changed[:limit]) + more


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_logger = logging.getLogger("pipeline")


def _log(msg: str) -> None:
    _logger.info(msg)


def _copy_output(pipe, log) -> None:
    """Stream a stage's output to the console and its log as it arrives (progress bars included)."""
    while chunk := os.read(pipe.fileno(), 65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        log.write(chunk)
        log.flush()


def _launch(sdir: Path, name: str, parallel: DictConfig, cluster: DictConfig) -> None:
    """Run one stage with torchrun, streaming its output to the console and to logs/worker.log."""
    port = cluster.get("master_port") or _free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={parallel.nproc_per_node}", f"--nnodes={parallel.get('nnodes', 1)}",
        "--master_addr=127.0.0.1", f"--master_port={port}",
        # pass preemption notices on to the workers, which save and exit (fault_tolerance), and give
        # them time to finish the step and the save before torchrun kills them
        f"--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,{','.join(s.name for s in PREEMPTION_SIGNALS)}",
        f"--shutdown-timeout={int(cluster.get('shutdown_timeout_s', 300))}",
        "-m", "launch.stage_worker", str(sdir),
    ]
    log_path = sdir / "logs" / "worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    repo_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        reader = threading.Thread(target=_copy_output, args=(proc.stdout, log), daemon=True)
        reader.start()
        # a preemption notice to the runner goes to the stage, which checkpoints and exits
        forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
        previous = {sig: signal.signal(sig, forward) for sig in PREEMPTION_SIGNALS}
        try:
            returncode = proc.wait()
        except BaseException:  # Ctrl-C or an error in the runner: stop the stage too
            proc.terminate()
            proc.wait()
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        # a process the stage left behind may hold the pipe open: do not wait for it forever
        reader.join(timeout=10)
        if reader.is_alive():
            _log(f"{sdir.name}: a leftover process still holds the stage's output; no longer reading it")
    if returncode != 0:
        attempt = (manifest.read(sdir) or {}).get("attempts", [{}])[-1]
        if attempt.get("ended") == "preempted":
            raise StagePreempted(name, attempt["detail"])
        raise StageFailed(name, returncode, log_path)


def run_pipeline(cfg: DictConfig) -> list[dict]:
    """Run (or resume) every stage of ``cfg.pipeline.order``; returns their manifests."""
    quiet_known_warnings()
    from data_pipelines.prepare import prepare_data

    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "pipeline.yaml", resolve=True)
    full = OmegaConf.to_container(cfg, resolve=True)

    _log(f"run folder {run_dir}")
    _log("preparing data (reused when already prepared)")
    prepared = prepare_data(cfg.data, run_dir / "data", int(cfg.seed))
    sources = ", ".join(f"{name} {st['documents']} docs / {st['tokens']} tokens"
                        for name, st in prepared.stats["sources"].items())
    _log(f"data ready in {run_dir / 'data'}: vocab {prepared.stats['vocab_size']}; {sources}")

    manifests = []
    parent: str | None = None
    for index, name in enumerate(cfg.pipeline.order):
        sdir = stage_dir(run_dir, index, name)
        start_from = cfg.stages[name].get("init_from") or parent
        wanted = manifest.stage_identity(full, name, start_from)
        existing = manifest.read(sdir)
        if existing is not None:
            recorded = manifest.stage_identity(existing["config"], name, existing["parent_checkpoint"])
            if recorded != wanted:
                state = "finished" if existing["status"] == manifest.COMPLETE else "started"
                raise ConfigError(
                    f"stage {name!r} in {sdir} was {state} with a different config "
                    f"({_describe_changes(recorded, wanted)}). A stage is never silently overwritten: "
                    f"use a new run_dir=..., or delete {sdir} to run it again"
                )
            if existing["status"] == manifest.COMPLETE:
                _log(f"{sdir.name}: complete ({existing['steps']} steps), skipping")
                manifests.append(existing)
                parent = str(sdir / existing["checkpoint"])
                continue
            _log(f"{sdir.name}: unfinished, resuming")
        else:
            _log(f"{sdir.name}: starting" + (f" from {start_from}" if start_from else " from random init"))
        sdir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(
            OmegaConf.create({"stage_name": name, "parent_checkpoint": start_from, "config": full}),
            sdir / "config.yaml",
        )
        _launch(sdir, name, cfg.parallel, cfg.cluster)
        done = manifest.read(sdir)
        assert done is not None and done["status"] == manifest.COMPLETE, f"{sdir}: worker exited without completing"
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in done["final_metrics"].items() if isinstance(v, float))
        _log(f"{sdir.name}: complete in {done['wall_time_s']:.1f}s ({metrics})")
        manifests.append(done)
        parent = str(sdir / done["checkpoint"])
    table = summary_table(manifests)
    (run_dir / "summary.txt").write_text(table + "\n")
    _log(f"summary (also in {run_dir / 'summary.txt'}):\n" + table)
    return manifests


def _accuracy(value: Any) -> str | None:
    """A stage's task accuracy for the table: one number, or one per thinking mode."""
    if not isinstance(value, dict):
        return None
    if "accuracy" in value:
        return f"{value['accuracy']:.3f}"
    return " / ".join(f"{mode} {v['accuracy']:.3f}" for mode, v in value.items() if isinstance(v, dict))


def summary_table(manifests: list[dict]) -> str:
    """One line per stage: steps, tokens, validation loss and verifiable-task accuracy before -> after
    (post-training stages; before = the parent's, e.g. the pretrained model's for SFT), wall time."""
    rows = [("stage", "steps", "tokens", "valid loss", "task accuracy", "wall time")]
    for m in manifests:
        fm = m["final_metrics"]
        before, after = fm.get("initial_valid_loss"), fm.get("valid_loss")
        loss = f"{before:.4f} -> {after:.4f}" if before is not None and after is not None else "-"
        acc_before, acc_after = _accuracy(fm.get("initial_task_accuracy")), _accuracy(fm.get("task_accuracy"))
        acc = f"{acc_before} -> {acc_after}" if acc_before and acc_after else "-"
        rows.append((m["stage"], str(m["steps"]), f"{m['tokens_seen']:,}", loss, acc, f"{m['wall_time_s']:.1f}s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
