"""``python -m launch [--dry-run] [hydra overrides]`` (or ``turbolaser ...``): validate the config, then
run the staged pipeline where ``cluster=`` says, and ``python -m launch report <run_dir>``.

Examples::

    python -m launch                                   # the tiny demo pipeline on CPU, this machine
    python -m launch run_dir=runs/tp2 parallel=tp2     # same, tensor parallel over 2 processes
    python -m launch stages.pretrain.train.steps=50    # any field can be overridden
    python -m launch cluster=slurm --dry-run ...       # print the sbatch scripts; without: submit them
    python -m launch report runs/demo                  # report.md + plots from a run folder
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from megatron_ext.errors import ConfigError

def launch(cfg: DictConfig) -> None:
    """Hand a validated config to the launcher ``cluster.name`` names."""
    dry_run = bool(cfg.get("dry_run", False))
    if cfg.cluster.name == "local":
        from launch.runner import describe_pipeline, run_pipeline

        describe_pipeline(cfg) if dry_run else run_pipeline(cfg)
    elif cfg.cluster.name == "slurm":
        from launch.slurm import submit_pipeline

        submit_pipeline(cfg, dry_run=dry_run)
    else:
        assert cfg.cluster.name == "nemo_run", cfg.cluster.name   # validate() allows only these
        from launch.nemo_experiment import run_experiment

        run_experiment(cfg, dry_run=dry_run)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from megatron_ext.quiet import quiet_known_warnings

    quiet_known_warnings()
    from launch.runner import StageFailed, StagePreempted
    from launch.validation import validate
    from megatron_ext.fault_tolerance import PREEMPTED_EXIT_CODE

    try:
        validate(cfg)
        from launch.plan.check import check_memory

        check_memory(cfg)
        launch(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except StagePreempted as err:
        print(f"preempted: {err}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


def _report(args: list[str]) -> int:
    if len(args) != 1:
        print("usage: python -m launch report <run_dir>", file=sys.stderr)
        return 2
    from launch.report import write_report

    try:
        path = write_report(args[0])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"report written to {path}")
    return 0


def main() -> None:
    """Console entry point: ``report`` is a subcommand; ``--dry-run`` becomes ``dry_run=true`` and
    ``--force`` (submit even when the planner predicts a stage over the GPU's memory) ``force=true``;
    everything else goes to Hydra."""
    args = sys.argv[1:]
    if args and args[0] == "report":
        sys.exit(_report(args[1:]))
    flags = {"--dry-run": "dry_run=true", "--force": "force=true"}
    sys.argv = [sys.argv[0]] + [a for a in args if a not in flags] + [flags[a] for a in flags if a in args]
    _hydra_main()


if __name__ == "__main__":
    main()
