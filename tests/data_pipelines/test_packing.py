import random

import pytest
import torch
import torch.nn.functional as F

from data_pipelines.chat_format import format_chat
from data_pipelines.errors import DataConfigError
from data_pipelines.packing import (
    IGNORE_LABEL,
    attention_mask,
    pack_examples,
    packed_seq_params,
)
from data_pipelines.synthetic_corpus import GENERATORS, generate_documents
from data_pipelines.tokenizer import train_bpe

PAD = 1


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    docs = [d for g in sorted(GENERATORS) for d in generate_documents(g, 300, seed=0)]
    return train_bpe(iter(docs), vocab_size=400, out_dir=tmp_path_factory.mktemp("tok"))


def _random_examples(n, max_len, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(1, max_len)
        out.append(([rng.randrange(10, 400) for _ in range(length)],
                    [rng.randint(0, 1) for _ in range(length)]))
    return out


def _segments(row):
    cu = row.cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))


def _check_row(row, examples, seq_length, pad_id=PAD):
    """Every invariant of one packed row, against the examples it says it holds."""
    docs = [examples[n] for n in row.example_indices]
    segs = _segments(row)
    assert row.cu_seqlens.dtype == torch.int32 and row.cu_seqlens[0] == 0
    assert row.cu_seqlens[-1] == seq_length
    assert row.max_seqlen == max(e - s for s, e in segs)
    assert len(segs) in (len(docs), len(docs) + 1)
    for (s, e), (ids, mask) in zip(segs, docs):
        assert e - s == len(ids)
        assert row.tokens[s:e].tolist() == ids
        assert row.position_ids[s:e].tolist() == list(range(len(ids)))
        assert row.labels[s:e].tolist() == ids[1:] + [IGNORE_LABEL]  # never across a boundary
        assert row.loss_mask[s:e].tolist() == mask[1:] + [0]  # the example mask, shifted
    if len(segs) > len(docs):  # the padding segment
        s, e = segs[-1]
        assert row.tokens[s:e].eq(pad_id).all() and row.labels[s:e].eq(IGNORE_LABEL).all()
        assert row.loss_mask[s:e].eq(0).all()
        assert row.position_ids[s:e].tolist() == list(range(e - s))
    # dense mask: query q may see exactly keys k <= q of its own segment
    masked = attention_mask(row.cu_seqlens, seq_length)
    assert masked.shape == (1, seq_length, seq_length) and masked.dtype == torch.bool
    seg_of = {p: j for j, (s, e) in enumerate(segs) for p in range(s, e)}
    for q in range(seq_length):
        allowed = {k for k in range(seq_length) if not masked[0, q, k]}
        assert allowed == {k for k in range(q + 1) if seg_of[k] == seg_of[q]}


@pytest.mark.parametrize("strategy", ["first_fit", "in_order"])
def test_rows_keep_documents_apart(strategy):
    examples = _random_examples(40, max_len=20)
    rows, stats = pack_examples(examples, seq_length=32, pad_id=PAD, strategy=strategy)
    assert stats.num_examples == stats.num_packed == 40 and stats.num_sequences == len(rows)
    for row in rows:
        _check_row(row, examples, 32)
    assert sorted(n for r in rows for n in r.example_indices) == list(range(40))  # each once
    assert stats.num_padding_tokens == 32 * len(rows) - sum(len(ids) for ids, _ in examples)
    again, _ = pack_examples(examples, seq_length=32, pad_id=PAD, strategy=strategy)
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(rows, again))  # deterministic


def test_first_fit_fills_earlier_rows_and_in_order_does_not():
    examples = [([5] * 6, [1] * 6), ([6] * 6, [1] * 6), ([7] * 3, [1] * 3)]
    first_fit, _ = pack_examples(examples, seq_length=10, pad_id=PAD)
    in_order, _ = pack_examples(examples, seq_length=10, pad_id=PAD, strategy="in_order")
    assert [r.example_indices for r in first_fit] == [(0, 2), (1,)]
    assert [r.example_indices for r in in_order] == [(0,), (1, 2)]


def test_chat_examples_pack_with_their_masks(tok):
    convs = [
        [{"role": "user", "content": f"Q: {a} + {a} = ?"},
         {"role": "assistant", "content": f"A: {2 * a}."}]
        for a in range(6)
    ]
    examples = [format_chat(c, tok, thinking="short") for c in convs]
    rows, stats = pack_examples(examples, seq_length=64, pad_id=tok.pad)
    assert stats.num_truncated == stats.num_dropped == 0
    for row in rows:
        _check_row(row, examples, 64, pad_id=tok.pad)
    assert sorted(n for r in rows for n in r.example_indices) == list(range(len(examples)))


@pytest.mark.parametrize("overflow", ["truncate", "drop"])
def test_overlong_examples_are_truncated_or_dropped_and_counted(overflow):
    examples = [([3] * 4, [1] * 4), ([4] * 12, [1] * 12), ([5] * 2, [0, 1])]
    rows, stats = pack_examples(examples, seq_length=8, pad_id=PAD, overflow=overflow)
    if overflow == "truncate":
        assert (stats.num_truncated, stats.num_dropped, stats.truncated_tokens) == (1, 0, 4)
        assert sorted(r.tokens.tolist() for r in rows) == [[3] * 4 + [5] * 2 + [PAD] * 2, [4] * 8]
    else:
        assert (stats.num_truncated, stats.num_dropped, stats.num_packed) == (0, 1, 2)
        assert [r.tokens.tolist() for r in rows] == [[3] * 4 + [5] * 2 + [PAD] * 2]
        assert rows[0].example_indices == (0, 2)  # input positions survive the drop


def test_bad_arguments_raise_data_config_error():
    with pytest.raises(DataConfigError, match="overflow"):
        pack_examples([([1], [1])], seq_length=8, pad_id=PAD, overflow="wrap")
    with pytest.raises(DataConfigError, match="strategy"):
        pack_examples([([1], [1])], seq_length=8, pad_id=PAD, strategy="best_fit")
    with pytest.raises(DataConfigError, match="seq_length"):
        pack_examples([([1], [1])], seq_length=1, pad_id=PAD)
    with pytest.raises(DataConfigError, match=r"examples\[1\]"):
        pack_examples([([1], [1]), ([1, 2], [1])], seq_length=8, pad_id=PAD)


def test_packed_seq_params_are_megatron_thd():
    rows, _ = pack_examples(_random_examples(5, 10, seed=3), seq_length=24, pad_id=PAD)
    p = packed_seq_params(rows[0].cu_seqlens, rows[0].max_seqlen)
    assert p.qkv_format == "thd"
    assert torch.equal(p.cu_seqlens_q, rows[0].cu_seqlens) and p.cu_seqlens_q.dtype == torch.int32
    assert torch.equal(p.cu_seqlens_kv, rows[0].cu_seqlens)
    assert p.max_seqlen_q == p.max_seqlen_kv == rows[0].max_seqlen


def test_packed_attention_equals_documents_run_alone():
    """The dense mask really isolates documents: SDPA on the row == SDPA per document."""
    seq_length, heads, dim = 40, 2, 8
    rows, _ = pack_examples(_random_examples(12, 15, seed=1), seq_length, pad_id=PAD)
    gen = torch.Generator().manual_seed(0)
    for row in rows:
        q, k, v = (torch.randn(1, heads, seq_length, dim, generator=gen) for _ in range(3))
        mask = attention_mask(row.cu_seqlens, seq_length)  # True = masked (megatron)
        packed = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask.unsqueeze(1))
        for s, e in _segments(row):
            alone = F.scaled_dot_product_attention(
                q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True
            )
            torch.testing.assert_close(packed[:, :, s:e], alone)
