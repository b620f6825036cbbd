"""Supervised fine-tuning stage (Hunyuan-TurboS post-training, SFT).

Data: the synthetic verifiable tasks (``data_pipelines.verifiable_tasks``), each one conversation
``[user: prompt, assistant: worked solution]`` in the chat layout of ``data_pipelines.chat_format``
(loss on the assistant's tokens and its end of turn only), packed into rows of the stage's
``seq_length`` by ``data_pipelines.packing``. A hash split of the task ids gives the held-out
conversations the evaluation loss is measured on.

Packing and the forward step are :mod:`posttrain.sft_data`'s. The stage reports the verifiable-task
accuracy (``eval/synthetic_tasks.yaml``) of its parent (the pretrained model in the demo) and its own.

Starts from the previous stage's weights (``Trainer.restore``); Hunyuan's SFT dropout is a
``model_overrides`` setting of the stage preset (``stage/sft.yaml``, ``stage/sft_turbos.yaml``).
"""

from __future__ import annotations

from typing import Sequence

from data_pipelines.prepare import prepared_tokenizer
from data_pipelines.verifiable_tasks import Task, generate_tasks, split_tasks
from megatron_ext.stage import StageContext, StageResult
from megatron_ext.stage_training import build_stage_model
from posttrain.chat_sampling import eval_tasks, initial_task_accuracy, stage_task_accuracy
from posttrain.sft_data import Example, build_sft_data, chat_examples, train_sft


def task_conversation(task: Task) -> list[dict[str, str]]:
    return [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": task.solution}]


def sft_examples(tasks: Sequence[Task], tokenizer, thinking: str | None) -> list[Example]:
    """``(ids, loss_mask)`` per task, loss on the assistant turn only (``chat_format.format_chat``)."""
    return chat_examples([(task_conversation(t), thinking) for t in tasks], tokenizer)


def run(ctx: StageContext) -> StageResult:
    cfg, st, model_cfg = ctx.cfg, ctx.stage_cfg, ctx.model_cfg
    tasks_cfg = st.tasks
    tokenizer = prepared_tokenizer(cfg.data, ctx.run_dir / "data", cfg.seed)

    tasks = generate_tasks(list(tasks_cfg.kinds), int(tasks_cfg.num_tasks), int(cfg.seed),
                           difficulties=list(tasks_cfg.difficulties))
    train_tasks, held_out_tasks = split_tasks(tasks, float(tasks_cfg.held_out_fraction), int(cfg.seed))
    eval_ids = {t.id for t in eval_tasks(st.eval, int(cfg.seed))}
    train_tasks = [t for t in train_tasks if t.id not in eval_ids]
    thinking = tasks_cfg.get("thinking")
    data = build_sft_data(sft_examples(train_tasks, tokenizer, thinking),
                          sft_examples(held_out_tasks, tokenizer, thinking),
                          int(model_cfg.seq_length), tokenizer.pad, st.get("packing"))

    model = build_stage_model(ctx, tokenizer)

    def accuracy(chunks) -> dict:
        return stage_task_accuracy(chunks, tokenizer, model.vocab_size, st.eval, int(cfg.seed), model_cfg)

    def initial_accuracy(chunks) -> dict:
        return initial_task_accuracy(ctx, chunks, tokenizer, model.vocab_size, st.eval)

    outcome, final = train_sft(ctx, tokenizer, model, data, accuracy, initial_accuracy)
    trainer = outcome.trainer
    gbs = int(st.train.global_batch_size)
    return StageResult(
        checkpoint=outcome.checkpoint,
        steps=trainer.state.step,
        tokens_seen=trainer.state.tokens_seen,
        final_metrics=final,
        data_fingerprint=data.fingerprint,
        extra={
            "sft_data": {**data.sizes, "epochs": round(trainer.state.step * gbs / len(data.train), 3),
                         "thinking": thinking},
            "expert_lr_scale": outcome.expert_lr_scale,
        },
    )
