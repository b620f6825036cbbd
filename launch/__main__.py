"""``python -m launch [hydra overrides]``: validate the config, then run the staged pipeline.

Examples::

    python -m launch                                   # the tiny demo pipeline on CPU
    python -m launch run_dir=runs/tp2 parallel=tp2     # same, tensor parallel over 2 processes
    python -m launch stages.pretrain.train.steps=50    # any field can be overridden
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from megatron_ext.errors import ConfigError


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from launch.runner import StageFailed, StagePreempted, run_pipeline
    from megatron_ext.fault_tolerance import PREEMPTED_EXIT_CODE
    from launch.validation import validate

    try:
        validate(cfg)
        run_pipeline(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except StagePreempted as err:
        print(f"preempted: {err}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
