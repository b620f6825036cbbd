"""Tokenize texts into megatron-core's indexed dataset format (.bin tokens + .idx offsets)."""

import itertools
import os
from typing import Iterable

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

_BATCH = 1024  # texts per tokenizer call: batching lets the Rust tokenizer use every core


def write_indexed_dataset(
    texts: Iterable[str], tokenizer, output_prefix: str | os.PathLike
) -> dict:
    """Write `output_prefix`.bin/.idx: one document (a single sequence) per text, each ending in
    `tokenizer.eod`, so GPTDataset's packed samples keep document boundaries visible.

    The token dtype follows Megatron's tools/preprocess_data.py (`DType.optimal_dtype`): uint16
    below 65500 ids, else int32. Returns {"documents": n, "tokens": n_tokens_including_eod}.
    """
    prefix = str(output_prefix)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    encode = getattr(tokenizer, "tokenize_batch", None)
    if encode is None:  # any tokenizer with tokenize() will do, just slower
        encode = lambda batch: [tokenizer.tokenize(t) for t in batch]  # noqa: E731
    documents = tokens = 0
    iterator = iter(texts)
    while batch := list(itertools.islice(iterator, _BATCH)):
        for ids in encode(batch):
            doc = numpy.asarray([*ids, tokenizer.eod], dtype=dtype)
            builder.add_document(doc, [doc.size])
            documents += 1
            tokens += doc.size
    builder.finalize(prefix + ".idx")
    return {"documents": documents, "tokens": tokens}
