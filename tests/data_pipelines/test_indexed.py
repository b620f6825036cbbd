import numpy
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_pipelines.indexed import write_indexed_dataset
from data_pipelines.synthetic_corpus import generate_documents
from data_pipelines.tokenizer import train_bpe


def test_round_trip_through_megatron_reader(tmp_path):
    docs = list(generate_documents("prose", 200, seed=0)) + list(generate_documents("code", 100, 0))
    tokenizer = train_bpe(iter(docs), vocab_size=300, out_dir=tmp_path / "tok")
    stats = write_indexed_dataset(iter(docs), tokenizer, tmp_path / "docs")

    dataset = IndexedDataset(str(tmp_path / "docs"))
    assert dataset.index.dtype == numpy.uint16  # Megatron's choice for a small vocabulary
    assert len(dataset) == len(docs) == stats["documents"]
    assert len(dataset.document_indices) == len(docs) + 1  # one sequence per document
    expected = [tokenizer.tokenize(d) + [tokenizer.eod] for d in docs]
    for i, ids in enumerate(expected):
        assert dataset[i].tolist() == ids
    assert stats["tokens"] == sum(map(len, expected)) == int(dataset.sequence_lengths.sum())
    assert tokenizer.detokenize(dataset[3][:-1]) == docs[3]
