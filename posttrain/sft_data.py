"""Chat conversations -> packed SFT rows -> megatron-core batches: what every SFT-style stage trains on.

Shared by the SFT, CoT-fusion and deliberation stages (a stage never imports another stage).
Conversations are laid out by ``data_pipelines.chat_format`` (loss on the assistant's tokens and its
end of turn only) and packed into rows of ``seq_length`` by ``data_pipelines.packing``.

Packing is only correct if documents never see each other: :func:`sft_forward_step` gives
megatron-core's local attention the block-diagonal causal mask of each row (``attention_mask``
``[b, 1, s, s]``, True = masked). Positions restart per document (``position_ids`` from packing); RoPE
scores depend only on relative positions, so with the mask a document is scored exactly as if alone.
Mamba layers (``turbos_hybrid``) take no mask: their state still flows across the documents of a row.
The dense mask suits the local (CPU) attention of the demo; at 32K tokens a row it is 1 GiB, and the
GPU path should instead hand ``packing.packed_seq_params`` (THD) to a varlen attention kernel.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from data_pipelines.chat_format import format_chat
from data_pipelines.packing import IGNORE_LABEL, PackedSequence, PackingStats, attention_mask, pack_examples
from megatron_ext.stage_training import train_stage
from megatron_ext.trainer import masked_mean_loss

Example = tuple[list[int], list[int]]  # (ids, loss_mask) of one conversation


def chat_examples(conversations: Sequence[tuple[list[dict[str, str]], str | None]], tokenizer,
                  learn_mode: bool = False) -> list[Example]:
    """``(ids, loss_mask)`` per ``(messages, thinking)``, loss on the assistant turns only (and on
    their mode token with ``learn_mode``: the model learns to choose it)."""
    return [format_chat(messages, tokenizer, thinking=thinking, learn_mode=learn_mode)
            for messages, thinking in conversations]


class PackedSFTDataset:
    """Map-style dataset of packed rows for :class:`StepBatches`.

    ``cu_seqlens`` is padded to ``max_segments + 1`` entries by repeating ``seq_length`` (empty
    trailing segments), so rows stack into one tensor; the dense ``[s, s]`` mask is built per
    micro-batch in :func:`sft_forward_step` rather than stored (it is ``s**2`` per row).
    """

    def __init__(self, rows: Sequence[PackedSequence], seq_length: int, max_segments: int):
        assert rows, "no packed rows"
        self.rows = list(rows)
        self.seq_length = seq_length
        self.max_segments = max_segments

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        cu = row.cu_seqlens.to(torch.int64)
        pad = self.max_segments + 1 - len(cu)
        assert pad >= 0, (len(cu), self.max_segments)
        return {
            "tokens": row.tokens,
            "labels": row.labels,
            "loss_mask": row.loss_mask,
            "position_ids": row.position_ids,
            "cu_seqlens": torch.cat([cu, torch.full((pad,), self.seq_length, dtype=torch.int64)]),
        }


def sft_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model and loss receive for a packed micro-batch.

    ``attention_mask``: each row's block-diagonal causal mask, ``[b, 1, s, s]``, True = masked.
    ``labels``: megatron's cross entropy needs valid ids, so ``IGNORE_LABEL`` positions (a
    document's last token, padding) get id 0 and ``loss_mask`` 0 there.
    """
    tokens = batch["tokens"]
    seq = tokens.size(1)
    mask = torch.stack([attention_mask(cu, seq) for cu in batch["cu_seqlens"]]).to(tokens.device)
    labels = batch["labels"]
    has_target = labels != IGNORE_LABEL
    return {
        "tokens": tokens,
        "position_ids": batch["position_ids"],
        "attention_mask": mask,
        "labels": torch.where(has_target, labels, torch.zeros_like(labels)),
        "loss_mask": batch["loss_mask"].float() * has_target.float(),
    }


def sft_forward_step(batch_iter, model):
    """megatron-core forward step for packed SFT batches (the Trainer's ``forward_step``)."""
    inputs = sft_inputs(next(batch_iter))
    output = model(inputs["tokens"], inputs["position_ids"], inputs["attention_mask"], labels=inputs["labels"])
    return output, lambda out: masked_mean_loss(inputs["loss_mask"], out)


def _pack(examples, seq_length: int, pad_id: int, packing_cfg) -> tuple[list[PackedSequence], PackingStats]:
    return pack_examples(examples, seq_length, pad_id,
                         overflow=packing_cfg.get("overflow", "truncate"),
                         strategy=packing_cfg.get("strategy", "first_fit"))


def _rows_fingerprint(rows: Sequence[PackedSequence]) -> str:
    """sha256 of exactly what the stage trains on: every row's tokens, labels and loss mask."""
    h = hashlib.sha256()
    for row in rows:
        for t in (row.tokens, row.labels, row.loss_mask, row.cu_seqlens):
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def _data_sizes(examples, rows: Sequence[PackedSequence], stats: PackingStats) -> dict[str, Any]:
    return {
        "examples": len(examples),
        "packed_sequences": len(rows),
        "tokens": sum(len(ids) for ids, _ in examples),
        "trained_tokens": int(sum(float(row.loss_mask.sum()) for row in rows)),
        "padding_tokens": stats.num_padding_tokens,
        "truncated_examples": stats.num_truncated,
        "dropped_examples": stats.num_dropped,
    }


@dataclass
class SFTData:
    """Packed train / held-out datasets and what the manifest records about them."""

    train: PackedSFTDataset
    valid: PackedSFTDataset | None
    sizes: dict[str, Any]
    fingerprint: str


def build_sft_data(train_examples: Sequence[Example], valid_examples: Sequence[Example], seq_length: int,
                   pad_id: int, packing_cfg) -> SFTData:
    """Pack both splits (``packing_cfg``: ``overflow``, ``strategy``) into datasets of equal row shape."""
    packing_cfg = packing_cfg or {}
    train_rows, train_stats = _pack(train_examples, seq_length, pad_id, packing_cfg)
    valid_rows, valid_stats = _pack(valid_examples, seq_length, pad_id, packing_cfg)
    assert train_rows, "no SFT rows to train on"
    max_segments = max(len(r.cu_seqlens) - 1 for r in train_rows + valid_rows)
    return SFTData(
        train=PackedSFTDataset(train_rows, seq_length, max_segments),
        valid=PackedSFTDataset(valid_rows, seq_length, max_segments) if valid_rows else None,
        sizes={"train": _data_sizes(train_examples, train_rows, train_stats),
               "held_out": _data_sizes(valid_examples, valid_rows, valid_stats)},
        fingerprint=_rows_fingerprint(train_rows + valid_rows),
    )


def train_sft(ctx, tokenizer, model, data: SFTData, accuracy: Callable[[list], Any],
              initial_accuracy: Callable[[list], Any] | None = None):
    """Train an SFT-style stage's ``model`` on ``data`` (``megatron_ext.stage_training.train_stage``)
    and measure ``accuracy(chunks)`` of the result; ``initial_accuracy(chunks)`` (default
    ``accuracy``) gives the parent's weights' (before the first step, recorded once; e.g. the parent's
    own recorded result, ``posttrain.chat_sampling.initial_task_accuracy``).
    Returns ``(outcome, final_metrics)``."""
    before = initial_accuracy or accuracy
    outcome = train_stage(ctx, tokenizer, data.train, data.valid, forward_step=sft_forward_step, model=model,
                          initial_metrics=lambda chunks: {"initial_task_accuracy": before(chunks)})
    return outcome, {**outcome.final_metrics, "task_accuracy": accuracy(outcome.trainer.chunks)}
