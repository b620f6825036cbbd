"""Test worker (run under torchrun, one process): a tiny turbos_hybrid model's weights, logits and greedy
generations, for comparison with the same weights exported to transformers' ``nemotron_h``.

    nemotron_h_worker.py <out_dir> reference [hydra overrides...]
    nemotron_h_worker.py <out_dir> import <model_cfg.json> <state_dict.pt>

``reference`` writes to ``<out_dir>``: ``state_dict.pt`` (the single-process parameter names,
``_extra_state`` dropped), ``logits.pt`` (fp32 logits on :func:`fixed_tokens`) and ``result.json`` (the
resolved model config, the padded vocabulary size, the prompts and their greedy continuations with and
without the KV / Mamba-state cache). ``import`` builds the model config given as JSON (an imported HF
model's), loads the given weights strictly and writes ``logits.pt``.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from launch.config import load_config
from megatron_ext import distributed, model_builder
from megatron_ext.generation import Generator, SamplingParams
from megatron_ext.mcore_compat import canonical_state_dict, load_canonical_state_dict
from megatron_ext.quiet import quiet_known_warnings

VOCAB = 100  # padded to 128 by the builder: the export carries the padded size
NEW_TOKENS = 8
PROMPT_LENGTHS = (5, 9, 3)


def fixed_tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def imported(out_dir: str, model_cfg_json: str, state_path: str) -> None:
    quiet_known_warnings()
    cfg = load_config(["model.seq_length=64"])
    model_cfg = json.loads(Path(model_cfg_json).read_text())
    env = distributed.initialize(cfg.parallel, int(cfg.seed))
    config = model_builder.transformer_config(model_cfg, cfg.parallel)
    (model,) = model_builder.build_model(model_cfg, config,
                                         model_builder.padded_vocab_size(model_cfg["vocab_size"], env.tp))
    missing, unexpected = load_canonical_state_dict(model, torch.load(state_path), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    model.eval()
    tokens = fixed_tokens()
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), attention_mask=None).float()
    torch.save(logits, Path(out_dir) / "logits.pt")
    dist.destroy_process_group()


def main(out_dir: str, mode: str, *args: str) -> None:
    if mode == "import":
        return imported(out_dir, *args)
    assert mode == "reference", mode
    overrides = args
    quiet_known_warnings()
    cfg = load_config(["model.seq_length=64", *overrides])
    env = distributed.initialize(cfg.parallel, int(cfg.seed))
    assert env.tp == 1 and dist.get_world_size() == 1, "the export reference runs in one process"
    config = model_builder.transformer_config(cfg.model, cfg.parallel)
    padded = model_builder.padded_vocab_size(VOCAB, env.tp)
    (model,) = model_builder.build_model(cfg.model, config, padded)
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in canonical_state_dict(model).items()}
    torch.save(state, out / "state_dict.pt")

    tokens = fixed_tokens()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, positions, attention_mask=None).float()
    torch.save(logits, out / "logits.pt")

    greedy = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS)
    result = {
        "model_cfg": OmegaConf.to_container(cfg.model, resolve=True),
        "vocab_size": VOCAB,
        "padded_vocab_size": padded,
        "prompts": prompts(),
        "greedy_cached": [g.tokens for g in Generator([model], VOCAB, max_batch_size=4).generate(prompts(), greedy)],
        "greedy_uncached": [g.tokens for g in Generator([model], VOCAB, max_batch_size=4, use_cache=False)
                            .generate(prompts(), greedy)],
    }
    (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
