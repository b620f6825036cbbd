"""Test worker (run under torchrun): build the tiny preset model under a parallel layout and train it.

    tiny_training.py <out.json> <ckpt_root> <mode> [hydra overrides...]

Modes:
- ``reference``: random init, save the weights at step 0, then record the eval loss and two
  training steps' losses.
- ``from_checkpoint``: load the step-0 weights saved by ``reference`` (possibly under another
  layout), then record the same numbers. Both save the trained weights to ``<out>.weights/``.
- ``compare``: (one process) load ``<ckpt_root>`` and each further checkpoint given as an override
  ``+other=<dir>`` ... and record every tensor's relative difference to the first.
- ``expert_lr``: train 3 steps with a scaled LR for the routed experts, save, train 3 more; restore
  the step-3 checkpoint into a fresh model + optimizer and train the same 3 steps; record every param
  group's LRs at every step and which parameters each group holds.
- ``fit``: ``Trainer.fit`` with the config's steps / save interval, resuming from ``<ckpt_root>`` if
  it holds a checkpoint; metrics go to ``<ckpt_root>/metrics``. ``+nan_steps=[k, ...]`` makes those
  steps' loss NaN. ``TL_TEST_KILL_IN_SAVE_AT=k`` SIGKILLs the process inside the save of step k,
  after the shards are written but before the checkpoint is marked latest. Preemption exits 75.
- ``+grad_accum_fusion=true`` (any mode): the GPU path's gradient-accumulation fusion
  (:mod:`megatron_ext.models.grad_accumulation_fusion`) forced on; ``reference`` records its calls.
- ``resume``: train 2 steps, save, train 2 more ("straight"); then build a fresh model + optimizer,
  restore the step-2 checkpoint and train 2 steps: losses and final weights must equal the straight run.

Batches are random tokens from a fixed seed, identical on every rank and layout.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from launch.config import load_config
from megatron_ext import checkpointing, distributed, model_builder, optim
from megatron_ext.metrics import MetricsWriter
from megatron_ext.models import grad_accumulation_fusion
from megatron_ext.quiet import quiet_known_warnings
from megatron_ext.fault_tolerance import PREEMPTED_EXIT_CODE, Preempted, TrainingDiverged
from megatron_ext.trainer import StepBatches, Trainer, lm_forward_step

VOCAB = 128


def fixed_samples(n: int, seq: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        t = torch.randint(0, VOCAB, (seq + 1,), generator=g)
        out.append({"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(seq), "position_ids": torch.arange(seq)})
    return out


def build_trainer(cfg, env, ckpt_root: Path) -> Trainer:
    from megatron.core import parallel_state

    config = model_builder.transformer_config(cfg.model, cfg.parallel)
    if cfg.get("grad_accum_fusion"):
        config.gradient_accumulation_fusion = grad_accumulation_fusion.install()
    chunks = model_builder.build_model(cfg.model, config, VOCAB)
    ddp = optim.wrap_ddp(chunks, config, True)
    train = cfg.stages.pretrain.train
    from megatron_ext.expert_lr import expert_lr_scale

    scale = expert_lr_scale(train.get("expert_lr"), cfg.model, int(train.global_batch_size) * int(cfg.model.seq_length))
    opt, sched = optim.build_optimizer(train, ddp, bf16=False, use_distributed_optimizer=True,
                                       expert_lr_scale=scale)
    seq = int(cfg.model.seq_length)
    data = fixed_samples(64, seq)
    dp_rank = parallel_state.get_data_parallel_rank()
    batches = StepBatches(data, int(train.micro_batch_size), int(train.global_batch_size), dp_rank, env.dp)
    metrics = MetricsWriter(ckpt_root / "metrics", enabled=env.is_main, tensorboard=False)
    return Trainer(ddp, opt, sched, train, batches, batches, ckpt_root, metrics, seq)


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def main(out: str, ckpt_root: str, mode: str, *overrides: str) -> None:
    quiet_known_warnings()
    cfg = load_config(["model.seq_length=32", "stages.pretrain.train.micro_batch_size=2",
                       "stages.pretrain.train.global_batch_size=4", "stages.pretrain.train.warmup_steps=0",
                       "stages.pretrain.train.eval_iters=1", *overrides])
    env = distributed.initialize(cfg.parallel, int(cfg.seed))
    root = Path(ckpt_root)
    result = {}
    fused_calls = []
    if cfg.get("grad_accum_fusion"):
        accumulate = grad_accumulation_fusion.ops.wgrad_gemm_accum_fp32

        def counted(total_input, grad_output, main_grad):
            fused_calls.append(tuple(main_grad.shape))
            accumulate(total_input, grad_output, main_grad)

        grad_accumulation_fusion.ops.wgrad_gemm_accum_fp32 = counted
    trainer = build_trainer(cfg, env, root)
    if mode == "reference":
        trainer.save()  # step-0 weights, the common starting point of every layout
    elif mode == "from_checkpoint":
        checkpointing.load(checkpointing.iteration_dir(root, 0), trainer.chunks)
    if mode in ("reference", "from_checkpoint"):
        result["eval_loss"] = trainer.evaluate()
        result["steps"] = [trainer.train_step() for _ in range(2)]
        result["train_losses"] = [s["loss"] for s in result["steps"]]
        result["tokens_seen"] = trainer.state.tokens_seen
        model_config = trainer.chunks[0].module.config
        result["recompute"] = [model_config.recompute_granularity, model_config.recompute_method]
        result["eval_loss_after"] = trainer.evaluate()
        result["fused_wgrad_calls"] = len(fused_calls)
        result["linear_classes"] = sorted({type(m).__name__ for chunk in trainer.chunks for m in chunk.modules()
                                           if isinstance(m, (ColumnParallelLinear, RowParallelLinear))})
        checkpointing.save(Path(out + ".weights"), 2, trainer.chunks)
    elif mode == "compare":
        def resolve(path: Path) -> Path:  # a checkpoint folder, or a root whose latest is meant
            return path if (path / "metadata.json").exists() else checkpointing.latest_checkpoint(path)

        checkpointing.load(resolve(root), trainer.chunks[0])
        reference = {k: v.clone() for k, v in trainer.chunks[0].state_dict().items() if torch.is_tensor(v)}
        for other in cfg.other:
            checkpointing.load(resolve(Path(other)), trainer.chunks[0])
            got = trainer.chunks[0].state_dict()
            diff2 = sum(float((got[k] - v).norm()) ** 2 for k, v in reference.items())
            norm2 = sum(float(v.norm()) ** 2 for v in reference.values())
            per_tensor = {k: float((got[k] - v).norm() / v.norm().clamp(min=1e-12)) for k, v in reference.items()}
            result[other] = {"model": (diff2 / norm2) ** 0.5, "worst_tensor": max(per_tensor.values())}
    elif mode == "fit":
        kill_at = int(os.environ.get("TL_TEST_KILL_IN_SAVE_AT", 0))
        if kill_at:
            real_save = checkpointing.dist_checkpointing_save

            def save_then_die(state, path):
                real_save(state, path)
                if state["progress"]["step"] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            checkpointing.dist_checkpointing_save = save_then_die
        nan_steps = set(cfg.get("nan_steps") or [])
        nan_grad_steps = set(cfg.get("nan_grad_steps") or [])
        if nan_steps or nan_grad_steps:
            def poisoned(batch_iter, model):
                output, loss_fn = lm_forward_step(batch_iter, model)
                step = trainer.state.step + 1
                if step in nan_steps:
                    def nan_loss(out):  # a NaN loss, as a real divergence reports it
                        loss, report = loss_fn(out)
                        return loss * float("nan"), {k: v * torch.tensor([float("nan"), 1.0]) for k, v in report.items()}

                    return output, nan_loss
                if step in nan_grad_steps:
                    def nan_grad_loss(out):  # a finite loss whose gradient is NaN (an overflow in backward)
                        loss, report = loss_fn(out)
                        return _NanGrad.apply(loss), report

                    return output, nan_grad_loss
                return output, loss_fn

            trainer.forward_step = poisoned
        trainer.restore(parent_checkpoint=None)
        result["resumed_from"] = trainer.state.resumed_from_step
        try:
            result["last"] = trainer.fit()
        except Preempted as stop:
            result["preempted_at"] = stop.step
            if env.is_main:
                Path(out).write_text(json.dumps(result))
            distributed.destroy()
            sys.exit(PREEMPTED_EXIT_CODE)
        except TrainingDiverged as stop:
            result["diverged"] = str(stop)
        result["step"] = trainer.state.step
    elif mode == "expert_lr":
        def groups(tr):
            names = {p: n for n, p in tr.chunks[0].module.named_parameters()}
            out = [{"lr": g["lr"], "max_lr": g["max_lr"], "min_lr": g["min_lr"], "names": []}
                   for g in tr.optimizer.param_groups]
            for inner in tr.optimizer.chained_optimizers:
                for p, (gi, _) in inner.model_param_group_index_map.items():
                    # chained optimizers list their groups one after another
                    offset = tr.optimizer.param_groups.index(inner.optimizer.param_groups[gi])
                    out[offset]["names"].append(names[p])
            return out

        def run(tr, n):
            seen = []
            for _ in range(n):
                seen.append([{"lr": g["lr"], "max_lr": g["max_lr"], "min_lr": g["min_lr"]} for g in tr.optimizer.param_groups])
                tr.train_step()
            return seen

        result["groups"] = groups(trainer)
        result["first"] = run(trainer, 3)
        trainer.save()
        result["straight"] = run(trainer, 3)
        fresh = build_trainer(cfg, env, root)
        fresh.restore(parent_checkpoint=None)
        result["groups_after_restore"] = groups(fresh)
        result["resumed"] = run(fresh, 3)
    elif mode == "resume":
        result["first_losses"] = [trainer.train_step()["loss"] for _ in range(2)]
        trainer.save()
        result["straight_losses"] = [trainer.train_step()["loss"] for _ in range(2)]
        straight = {k: v.clone() for k, v in trainer.chunks[0].state_dict().items() if torch.is_tensor(v)}
        fresh = build_trainer(cfg, env, root)  # a different random init: the RNG has advanced
        fresh.restore(parent_checkpoint=None)
        result["restored_step"] = fresh.state.step
        result["resumed_losses"] = [fresh.train_step()["loss"] for _ in range(2)]
        after = fresh.chunks[0].state_dict()
        result["weights_equal_after_resume"] = all(torch.equal(v, after[k]) for k, v in straight.items())
    if env.is_main:
        Path(out).write_text(json.dumps(result))
    distributed.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
