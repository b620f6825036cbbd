"""Test worker (under torchrun): what each rank of a real layout holds, counted tensor by tensor.

    rank_memory_worker.py <out_dir> <parallel preset> [model preset]

Builds the model, DDP and the distributed optimizer exactly as a stage does (CPU backend, fp32) and
writes ``rank<N>.json``: the rank's coordinates (TP / PP / EP / DP rank), its parameters (dense and
routed-expert elements), its gradient-buffer elements and its optimizer shard (the main-weight
elements Adam keeps two moments for). The planner's memory model must predict these counts.
"""

import json
import sys
from pathlib import Path

from launch.config import load_config
from megatron_ext import distributed, model_builder, optim
from megatron_ext.quiet import quiet_known_warnings


def main(out: str, parallel: str, model: str = "tiny_large") -> None:
    from megatron.core import parallel_state as ps

    quiet_known_warnings()
    cfg = load_config([f"model={model}", f"parallel={parallel}"])
    env = distributed.initialize(cfg.parallel, seed=0)
    config = model_builder.transformer_config(cfg.model, cfg.parallel)
    vocab = model_builder.padded_vocab_size(int(cfg.model.vocab_size), env.tp)
    chunks = model_builder.build_model(cfg.model, config, vocab)
    ddp = optim.wrap_ddp(chunks, config, True)
    opt, _ = optim.build_optimizer(cfg.stages.pretrain.train, ddp, bf16=False, use_distributed_optimizer=True)
    dense = expert = 0
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if ".mlp.experts." in name:
                expert += p.numel()
            else:
                dense += p.numel()
    grads = sum(b.grad_data.numel() for d in ddp for b in [*d.buffers, *d.expert_parallel_buffers])
    inner = getattr(opt, "chained_optimizers", [opt])
    shard = sum(p.numel() for o in inner for group in o.shard_fp32_groups for p in group)
    result = {"vocab": vocab, "pp_rank": ps.get_pipeline_model_parallel_rank(),
              "tp_rank": ps.get_tensor_model_parallel_rank(), "dp": env.dp,
              "dense_params": dense, "expert_params": expert, "grad_buffer": grads, "optimizer_shard": shard}
    Path(out, f"rank{env.rank}.json").write_text(json.dumps(result))
    distributed.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
