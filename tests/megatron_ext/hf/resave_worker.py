"""Test worker (run under torchrun): save a model's weights under the current layout.

    resave_worker.py <src checkpoint | init> <dst root> [model_yaml=<file>] [hydra overrides...]

``init``: random weights (seeded; norm weights randomised too, so a misplaced norm shows), and rank 0
also saves the logits on fixed random tokens to ``<dst root>/logits.pt``. Otherwise ``src``'s weights,
loaded under this layout. Either way the weights are saved as ``<dst root>/iter_0000000`` and (rank 0)
the model config as ``<dst root>/model.yaml``: the same weights end up saved by different layouts.
``model_yaml=`` takes the model config from a file (an imported model's) instead of the presets.
"""

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from launch.config import load_config
from megatron_ext import checkpointing, distributed, model_builder
from megatron_ext.quiet import quiet_known_warnings

VOCAB = 512
BATCH, SEQ = 2, 16


def main(src: str, dst: str, *overrides: str) -> None:
    quiet_known_warnings()
    model_yaml = [o.split("=", 1)[1] for o in overrides if o.startswith("model_yaml=")]
    cfg = load_config([o for o in overrides if not o.startswith("model_yaml=")])
    if model_yaml:
        OmegaConf.set_struct(cfg, False)
        cfg.model = OmegaConf.load(model_yaml[0])
    env = distributed.initialize(cfg.parallel, int(cfg.seed))
    config = model_builder.transformer_config(cfg.model, cfg.parallel)
    chunks = model_builder.build_model(cfg.model, config, VOCAB)
    if src == "init":
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, param in chunks[0].named_parameters():
                if "norm" in name:
                    param.copy_(1 + 0.3 * torch.randn(param.shape, generator=g))
        if env.world_size == 1:
            tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
            chunks[0].eval()
            with torch.no_grad():
                logits = chunks[0](tokens, torch.arange(SEQ).expand(BATCH, -1), None)
            Path(dst).mkdir(parents=True, exist_ok=True)
            torch.save({"tokens": tokens, "logits": logits}, Path(dst) / "logits.pt")
    else:
        checkpointing.load(Path(src), chunks)
    checkpointing.save(Path(dst), 0, chunks)
    if env.is_main:
        OmegaConf.save(cfg.model, Path(dst) / "model.yaml", resolve=True)
    distributed.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
