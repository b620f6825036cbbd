"""Pack tokenized SFT examples into fixed-length sequences whose documents never see each other.

Packing removes the padding waste of one-example-per-row batches; it is only correct if attention,
labels and positions all stop at document boundaries. Per packed row of ``seq_length`` tokens:

- ``tokens``: the documents back to back, then ``pad_id`` up to ``seq_length``.
- ``labels[i] = tokens[i + 1]`` inside a document; ``IGNORE_LABEL`` on each document's last token
  (its next token belongs to another document) and on padding.
- ``loss_mask[i] = example_mask[i + 1]``: a mask marks the tokens to *predict*, and position ``i``
  predicts token ``i + 1``; 0 on last tokens and padding.
- ``position_ids`` restart at 0 per document (RoPE sees each document as if alone).
- ``cu_seqlens``: int32 ``[0, len_0, len_0 + len_1, ..., seq_length]``, megatron-core's
  ``PackedSeqParams`` ``thd`` format. Padding, when present, is one more segment, so
  ``cu_seqlens[-1] == seq_length`` always (THD kernels cover every token of the row) and no dense
  mask row is fully masked (a fully masked softmax row is NaN).

Bins are filled greedily first-fit (or strictly in order) over the input order: deterministic, and
the same examples always give the same rows.
"""

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from data_pipelines.errors import DataConfigError

IGNORE_LABEL = -1
"""Label of positions with no target. Megatron's vocab-parallel cross entropy treats an out-of-range
target as a zero logit and the loss mask then drops it; plain torch callers pass ignore_index=-1."""

OVERFLOW_POLICIES = ("truncate", "drop")
STRATEGIES = ("first_fit", "in_order")


@dataclass(frozen=True)
class PackedSequence:
    """One row of ``seq_length`` tokens; the layout is described in the module docstring."""

    tokens: torch.Tensor  # int64 [seq_length]
    labels: torch.Tensor  # int64 [seq_length]
    loss_mask: torch.Tensor  # float32 [seq_length]
    position_ids: torch.Tensor  # int64 [seq_length]
    cu_seqlens: torch.Tensor  # int32 [num_segments + 1]
    max_seqlen: int
    example_indices: tuple[int, ...]  # input positions of the documents, in row order


@dataclass
class PackingStats:
    """Counts to log, so silent truncation or a padding-heavy packing shows up in the run."""

    num_examples: int = 0
    num_packed: int = 0
    num_truncated: int = 0
    num_dropped: int = 0
    num_sequences: int = 0
    num_padding_tokens: int = 0
    truncated_tokens: int = 0


def _checked_examples(
    examples: Iterable[tuple[Sequence[int], Sequence[int]]],
    seq_length: int,
    overflow: str,
    stats: PackingStats,
) -> list[tuple[int, list[int], list[int]]]:
    kept = []  # (input position, ids, mask)
    for n, (ids, mask) in enumerate(examples):
        stats.num_examples += 1
        if len(ids) != len(mask) or not ids:
            raise DataConfigError(
                f"examples[{n}]: ids and loss_mask must be non-empty and of equal length, got "
                f"{len(ids)} ids and {len(mask)} mask entries"
            )
        if len(ids) > seq_length:
            if overflow == "drop":
                stats.num_dropped += 1
                continue
            stats.num_truncated += 1
            stats.truncated_tokens += len(ids) - seq_length
            ids, mask = ids[:seq_length], mask[:seq_length]
        kept.append((n, list(ids), list(mask)))
    return kept


def _bins(lengths: list[int], seq_length: int, strategy: str) -> list[list[int]]:
    """Example indices per row; first-fit tries every open row, in_order only the last one."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        candidates = range(len(bins)) if strategy == "first_fit" else range(len(bins))[-1:]
        for b in candidates:
            if free[b] >= n:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(seq_length - n)
    return bins


def _row(
    docs: list[tuple[int, list[int], list[int]]], seq_length: int, pad_id: int
) -> PackedSequence:
    tokens, labels, loss_mask, positions, seqlens = [], [], [], [], []
    for _, ids, mask in docs:
        tokens += ids
        labels += ids[1:] + [IGNORE_LABEL]
        loss_mask += mask[1:] + [0]
        positions += range(len(ids))
        seqlens.append(len(ids))
    pad = seq_length - len(tokens)
    assert pad >= 0
    if pad:
        tokens += [pad_id] * pad
        labels += [IGNORE_LABEL] * pad
        loss_mask += [0] * pad
        positions += range(pad)
        seqlens.append(pad)
    cu = [0]
    for n in seqlens:
        cu.append(cu[-1] + n)
    return PackedSequence(
        tokens=torch.tensor(tokens, dtype=torch.int64),
        labels=torch.tensor(labels, dtype=torch.int64),
        loss_mask=torch.tensor(loss_mask, dtype=torch.float32),
        position_ids=torch.tensor(positions, dtype=torch.int64),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=max(seqlens),
        example_indices=tuple(n for n, _, _ in docs),
    )


def pack_examples(
    examples: Iterable[tuple[Sequence[int], Sequence[int]]],
    seq_length: int,
    pad_id: int,
    overflow: str = "truncate",
    strategy: str = "first_fit",
) -> tuple[list[PackedSequence], PackingStats]:
    """Pack ``(ids, loss_mask)`` examples (e.g. from :func:`chat_format.format_chat`) into rows.

    ``overflow`` says what happens to an example longer than ``seq_length``: "truncate" keeps its
    first ``seq_length`` tokens (it may lose its end of turn), "drop" skips it; both are counted.
    """
    if not isinstance(seq_length, int) or seq_length < 2:
        raise DataConfigError(f"seq_length: must be an integer >= 2, got {seq_length!r}")
    if overflow not in OVERFLOW_POLICIES:
        raise DataConfigError(f"overflow: must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    if strategy not in STRATEGIES:
        raise DataConfigError(f"strategy: must be one of {STRATEGIES}, got {strategy!r}")
    stats = PackingStats()
    kept = _checked_examples(examples, seq_length, overflow, stats)
    bins = _bins([len(ids) for _, ids, _ in kept], seq_length, strategy)
    rows = [_row([kept[i] for i in b], seq_length, pad_id) for b in bins]
    stats.num_packed = len(kept)
    stats.num_sequences = len(rows)
    stats.num_padding_tokens = sum(seq_length - sum(len(kept[i][1]) for i in b) for b in bins)
    return rows, stats


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int) -> PackedSeqParams:
    """megatron-core's ``thd`` parameters for one packed row (self-attention: q and kv alike)."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int32)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=int(max_seqlen),
        max_seqlen_kv=int(max_seqlen),
    )


def attention_mask(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Block-diagonal causal mask ``[1, s, s]`` for backends without THD support.

    Megatron's convention: True = masked (``attention_mask_func`` fills True with -10000); invert
    it for ``torch.nn.functional.scaled_dot_product_attention``, where True = attend.
    """
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64)
    assert cu[0] == 0 and cu[-1] == seq_length, (cu, seq_length)
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
    pos = torch.arange(seq_length)
    allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    return ~allowed.unsqueeze(0)
