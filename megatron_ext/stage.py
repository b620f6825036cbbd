"""The contract between the pipeline runner and a stage.

A stage module (``pretrain.pretrain_stage``, ``posttrain.sft_stage``, ...) exposes
``run(ctx: StageContext) -> StageResult``. It is called on every rank of the stage's torchrun job
after the process groups exist; rank 0 records the result in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from megatron_ext.errors import ConfigError

if TYPE_CHECKING:  # the launcher validates configs with this module without importing torch
    from megatron_ext.distributed import DistEnv

# Model fields a stage may change for itself: none of them changes a parameter's shape, so the
# stage still loads its parent's checkpoint (long-context extension, SFT dropout, recomputation for
# long sequences).
STAGE_MODEL_OVERRIDES = ("seq_length", "rotary_base", "hidden_dropout", "attention_dropout",
                         "recompute_granularity", "recompute_method", "recompute_num_layers")


def stage_model_config(cfg, name: str):
    """``cfg.model`` with the stage's ``model_overrides`` applied."""
    from omegaconf import OmegaConf

    overrides = cfg.stages[name].get("model_overrides") or {}
    bad = sorted(set(overrides) - set(STAGE_MODEL_OVERRIDES))
    if bad:
        raise ConfigError(
            f"stages.{name}.model_overrides.{bad[0]}: a stage may only change {list(STAGE_MODEL_OVERRIDES)} "
            f"(the rest would change parameter shapes); set it in the model preset instead"
        )
    return OmegaConf.merge(cfg.model, overrides)


# Parallel fields a stage may change for itself; the world size (the job's GPUs) stays, so the stage's
# data-parallel size is derived again. Checkpoints reshard between layouts (dist_checkpointing).
STAGE_PARALLEL_OVERRIDES = ("context_parallel_size",)
# Stage kinds whose loss is the token-level LM loss that context parallelism splits (megatron-core's
# get_batch_on_this_cp_rank + the trainer's CP-aware mean); the others (packed SFT masks, generation,
# RL) run a context-parallel layout's ranks as data parallel.
CONTEXT_PARALLEL_KINDS = ("pretrain",)


def stage_parallel_config(cfg, name: str):
    """``cfg.parallel`` for stage ``name``: its ``parallel_overrides`` applied, and context parallelism
    folded into data parallelism for kinds that do not support it (:data:`CONTEXT_PARALLEL_KINDS`)."""
    from omegaconf import OmegaConf

    stage = cfg.stages[name]
    overrides = {k: v for k, v in (stage.get("parallel_overrides") or {}).items() if v is not None}
    bad = sorted(set(overrides) - set(STAGE_PARALLEL_OVERRIDES))
    if bad:
        raise ConfigError(
            f"stages.{name}.parallel_overrides.{bad[0]}: a stage may only change {list(STAGE_PARALLEL_OVERRIDES)}; "
            f"set the rest in the parallel preset"
        )
    if stage.get("kind") not in CONTEXT_PARALLEL_KINDS:
        if int(overrides.get("context_parallel_size") or 1) > 1:
            raise ConfigError(
                f"stages.{name}.parallel_overrides.context_parallel_size={overrides['context_parallel_size']}: "
                f"context parallelism applies to {list(CONTEXT_PARALLEL_KINDS)} stages only, not kind "
                f"{stage.get('kind')!r}; remove the override"
            )
        overrides["context_parallel_size"] = 1
    return OmegaConf.merge(cfg.parallel, overrides)


def ntk_rope_base(base: float, context_scale: float, head_dim: int) -> float:
    """RoPE base for a context ``context_scale`` times longer ("NTK-aware" scaling).

    Scaling the base by ``s ** (d / (d - 2))`` stretches the lowest frequency by ``s`` while leaving
    the highest almost unchanged, so nearby positions stay resolved (the rule Hunyuan-Large's
    dynamic NTK RoPE follows with ``alpha = s``).
    """
    return base * context_scale ** (head_dim / (head_dim - 2))


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    """``<run_dir>/<NN>_<name>``: stage folders sort in pipeline order."""
    return Path(run_dir) / f"{index + 1:02d}_{name}"


@dataclass
class StageContext:
    name: str
    cfg: Any                      # the full resolved config (OmegaConf DictConfig)
    stage_dir: Path
    parent_checkpoint: str | None
    env: DistEnv
    # called by the stage after each checkpoint (rank 0 updates the running manifest)
    on_checkpoint: Callable[[int, int], None] = lambda steps, tokens: None
    # metrics to keep in the manifest even if a later attempt resumes (rank 0 writes)
    record_metrics: Callable[[dict], None] = lambda metrics: None

    @property
    def stage_cfg(self):
        return self.cfg.stages[self.name]

    @property
    def model_cfg(self):
        """The model config this stage trains (the preset plus the stage's ``model_overrides``)."""
        return stage_model_config(self.cfg, self.name)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    def checkpoint_of(self, ref: str, field: str) -> Path:
        """The final checkpoint of an earlier stage of this pipeline (``ref`` is its name), or ``ref``
        itself when it is a path; ``field`` names the config entry in errors."""
        from megatron_ext import manifest

        order = list(self.cfg.pipeline.order)
        if ref not in order:
            path = Path(ref)
            if not (path / "metadata.json").exists():
                raise ConfigError(f"{field}={ref!r}: neither a stage of pipeline.order {order} nor a "
                                  f"checkpoint folder (no metadata.json there)")
            return path
        index = order.index(ref)
        if index >= order.index(self.name):
            raise ConfigError(f"{field}={ref!r}: that stage runs after {self.name!r}; name an earlier one "
                              f"of {order[:order.index(self.name)]}")
        folder = stage_dir(self.run_dir, index, ref)
        done = manifest.read(folder)
        if done is None or done.get("status") != manifest.COMPLETE:
            raise ConfigError(f"{field}={ref!r}: stage {ref!r} has not completed in {folder}")
        return folder / done["checkpoint"]


@dataclass
class StageResult:
    checkpoint: Path              # the final checkpoint folder
    steps: int
    tokens_seen: int
    final_metrics: dict[str, Any]
    data_fingerprint: str | None
    extra: dict[str, Any] = field(default_factory=dict)
