"""Wall time of the demo pipeline (``make demo``'s run) on this machine's CPUs, stage by stage.

    .venv/bin/python benchmarks/demo_wall_time.py [--out benchmarks/results/demo_wall_time.json] [overrides...]

Runs ``python -m launch run_dir=<fresh folder> <overrides>`` as ``make demo`` does (venv set-up not
included) and records the total, each stage's own wall time (its manifest's ``wall_time_s``: build,
train, evaluate, save), what lies between stages (process start, imports, process groups: the total
minus the stages' sum), the summary table, the load average before the run (timings are only
comparable on an otherwise idle machine) and the commit and library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_record import REPO, command, git_commit, library_versions, machine, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "demo_wall_time.json"))
    parser.add_argument("--run-dir", default=None, help="default: a temporary folder, removed afterwards")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as ARGS= of make demo")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="demo_wall_time_") as tmp:
        run_dir = Path(args.run_dir or Path(tmp) / "run")
        load_before = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "launch", f"run_dir={run_dir}", *args.overrides],
                              cwd=REPO, capture_output=True, text=True)
        total = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"the demo failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        stages = {}
        for manifest_file in sorted(run_dir.glob("[0-9][0-9]_*/manifest.json")):
            m = json.loads(manifest_file.read_text())
            stages[manifest_file.parent.name] = round(float(m["wall_time_s"]), 1)
        summary = (run_dir / "summary.txt").read_text()

    result = {
        "command": command(), "commit": git_commit(), "machine": machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "libraries": library_versions(),
        "total_s": round(total, 1),
        "stages_s": stages,
        "between_stages_s": round(total - sum(stages.values()), 1),
        "summary": summary.splitlines(),
    }
    write_result(args.out, result)
    print(json.dumps({k: result[k] for k in ("total_s", "stages_s", "between_stages_s")}, indent=2))


if __name__ == "__main__":
    main()
