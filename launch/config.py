"""Compose the Hydra config tree without the command line (tests, notebooks, nemo-run)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONFIG_DIR = Path(__file__).resolve().parent / "conf"


def load_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved root config with Hydra overrides applied, e.g. ``["model=tiny_large"]``."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))
