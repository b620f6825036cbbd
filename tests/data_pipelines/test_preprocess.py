import json
import os

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from data_pipelines.errors import DataConfigError
from data_pipelines.preprocess import main, preprocess, shard_prefix
from data_pipelines.synthetic_corpus import generate_documents
from data_pipelines.tokenizer import train_bpe

DOCS = list(generate_documents("prose", 150, seed=0)) + list(generate_documents("code", 60, 0))
SHARD_DOCS = 64  # 210 documents -> 4 shards, the last one short


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_bpe(iter(DOCS), vocab_size=300, out_dir=out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from data_pipelines.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def _write_jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def _write_input(fmt, directory, docs):
    import pyarrow
    import pyarrow.parquet

    table = pyarrow.table({"id": list(range(len(docs))), "text": docs})
    if fmt == "jsonl":
        return _write_jsonl(directory / "docs.jsonl", docs)
    if fmt == "parquet":
        pyarrow.parquet.write_table(table, directory / "docs.parquet", row_group_size=50)
        return directory / "docs.parquet"
    if fmt == "arrow":
        with pyarrow.ipc.new_file(directory / "docs.arrow", table.schema) as writer:
            writer.write_table(table, max_chunksize=50)
        return directory / "docs.arrow"
    import datasets

    datasets.Dataset.from_dict({"id": list(range(len(docs))), "text": docs}).save_to_disk(
        directory / "saved")
    return directory / "saved"


def _tokens(prefix):
    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def _output_bytes(prefix):
    """Every output file except the report (which holds timings), by name."""
    directory, base = os.path.split(str(prefix))
    return {name: open(os.path.join(directory, name), "rb").read()
            for name in sorted(os.listdir(directory))
            if name.startswith(base) and not name.endswith(".report.json")}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "arrow", "datasets"])
def test_round_trip_every_format(tmp_path, tokenizer_dir, tokenizer, fmt):
    source = _write_input(fmt, tmp_path, DOCS)
    out = tmp_path / "out" / "docs"
    report = preprocess([source], out, tokenizer_dir, shard_docs=SHARD_DOCS, progress=False)

    expected = [tokenizer.tokenize(d) + [tokenizer.eod] for d in DOCS]
    assert _tokens(out) == expected  # the merged dataset
    shards = [_tokens(shard_prefix(str(out), i)) for i in range(4)]
    assert [len(s) for s in shards] == [64, 64, 64, 18]
    assert sum(shards, []) == expected
    assert IndexedDataset(str(out)).index.dtype == numpy.uint16
    assert report["documents"] == len(DOCS) and report["rejected_total"] == 0
    assert report["tokens"] == sum(map(len, expected))
    assert report["shards"] == [f"docs_{i:05d}" for i in range(4)]
    assert report["inputs"][0]["format"] == fmt and len(report["inputs"][0]["sha256"]) == 64
    assert json.loads((tmp_path / "out" / "docs.report.json").read_text()) == report
    assert (tmp_path / "out" / "docs.rejects.jsonl").read_text() == ""


def test_rejects_are_counted_and_listed_and_good_lines_kept(tmp_path, tokenizer_dir, tokenizer):
    good = DOCS[:20]
    bad = {  # line number -> (raw line, reason)
        3: ('{"text": "unterminated', "bad_json"),
        6: ('{"body": "no text key here"}', "missing_text"),
        9: ('{"text": 42}', "non_string_text"),
        12: ('{"text": ""}', "empty_text"),
        14: ('{"text": "  \\n "}', "empty_text"),
        17: ('["a list", "not an object"]', "not_an_object"),
        20: ('{"text": null}', "missing_text"),
    }
    lines, good_iter = [], iter(good)
    for lineno in range(1, len(good) + len(bad) + 1):
        lines.append(bad[lineno][0] if lineno in bad else json.dumps({"text": next(good_iter)}))
    lines.insert(10, "")  # a blank line is skipped, not rejected; later line numbers shift by one
    bad = {(n + 1 if n > 10 else n): v for n, v in bad.items()}
    source = tmp_path / "mixed.jsonl"
    source.write_text("\n".join(lines) + "\n")

    out = tmp_path / "mixed"
    report = preprocess([source], out, tokenizer_dir, shard_docs=8, progress=False)
    assert report["rejected"] == {"bad_json": 1, "empty_text": 2, "missing_text": 2,
                                  "non_string_text": 1, "not_an_object": 1}
    assert report["rejected_total"] == len(bad) and report["documents"] == len(good)
    rejects = [json.loads(r) for r in (tmp_path / "mixed.rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["raw"], r["reason"]) for r in rejects] == \
        [(n, raw, reason) for n, (raw, reason) in sorted(bad.items())]
    assert all(r["input"] == "mixed.jsonl" for r in rejects)   # inside the output folder: relative to it
    assert _tokens(out) == [tokenizer.tokenize(d) + [tokenizer.eod] for d in good]


def test_long_rejected_line_is_truncated(tmp_path, tokenizer_dir):
    source = tmp_path / "long.jsonl"
    source.write_text('{"text": "' + "x" * 20000 + "\n" + json.dumps({"text": DOCS[0]}) + "\n")
    report = preprocess([source], tmp_path / "long", tokenizer_dir, progress=False)
    (reject,) = [json.loads(r) for r in (tmp_path / "long.rejects.jsonl").read_text().splitlines()]
    assert reject["reason"] == "bad_json" and len(reject["raw"]) == 4096
    assert report["documents"] == 1


def test_duplicates_dropped_across_inputs_first_occurrence_wins(tmp_path, tokenizer_dir,
                                                                 tokenizer):
    first = _write_jsonl(tmp_path / "a.jsonl", [DOCS[0], DOCS[1], DOCS[0], DOCS[2]])
    second = _write_input("parquet", tmp_path, [DOCS[3], DOCS[1], DOCS[4]])
    out = tmp_path / "dedup" / "docs"
    report = preprocess([first, second], out, tokenizer_dir, shard_docs=2, progress=False)
    kept = [DOCS[0], DOCS[1], DOCS[2], DOCS[3], DOCS[4]]
    assert report["duplicates_dropped"] == 2 and report["documents"] == 5
    assert report["records_read"] == 7
    assert _tokens(out) == [tokenizer.tokenize(d) + [tokenizer.eod] for d in kept]
    assert [i["path"] for i in report["inputs"]] == [str(first), str(second)]   # outside the output's folder


def test_merged_file_equals_megatron_add_index(tmp_path, tokenizer_dir):
    source = _write_jsonl(tmp_path / "docs.jsonl", DOCS[:9])
    out = str(tmp_path / "docs")
    preprocess([source], out, tokenizer_dir, shard_docs=4, progress=False)
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=numpy.uint16)
    for i in range(3):
        builder.add_index(shard_prefix(out, i))
    builder.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ref{ext}").read_bytes() == open(out + ext, "rb").read()


def test_resume_and_worker_count_give_identical_bytes(tmp_path, tokenizer_dir):
    bad_line = "not json\n"
    source = tmp_path / "docs.jsonl"
    source.write_text(_write_jsonl(tmp_path / "tmp.jsonl", DOCS + DOCS[:5]).read_text() + bad_line)
    clean = tmp_path / "clean" / "docs"
    reference = preprocess([source], clean, tokenizer_dir, shard_docs=SHARD_DOCS, progress=False)
    expected = _output_bytes(clean)
    assert reference["shards_resumed"] == 0 and reference["duplicates_dropped"] == 5

    two = tmp_path / "two" / "docs"
    report = preprocess([source], two, tokenizer_dir, workers=2, shard_docs=SHARD_DOCS,
                        progress=False)
    assert _output_bytes(two) == expected
    assert report["tokens"] == reference["tokens"]

    # Interrupt: shard 1 lost its outputs mid-write (a partial temp file, no marker), shard 2
    # has its files but no marker, shard 3 has a marker but a truncated .bin; merged file gone.
    s1, s2, s3 = (shard_prefix(str(two), i) for i in (1, 2, 3))
    for path in (s1 + ".bin", s1 + ".idx", s1 + ".done.json", s2 + ".done.json",
                 str(two) + ".bin", str(two) + ".rejects.jsonl"):
        os.remove(path)
    with open(s1 + ".partial-99999.bin", "wb") as f:
        f.write(b"\x01\x02half a shard")
    with open(s3 + ".bin", "r+b") as f:
        f.truncate(10)
    untouched = os.stat(shard_prefix(str(two), 0) + ".bin").st_mtime_ns

    report = preprocess([source], two, tokenizer_dir, workers=2, shard_docs=SHARD_DOCS,
                        progress=False)
    assert report["shards_resumed"] == 1  # only shard 0 was complete
    assert os.stat(shard_prefix(str(two), 0) + ".bin").st_mtime_ns == untouched
    assert _output_bytes(two) == expected  # the temp file was cleaned away too


def test_changed_input_redoes_the_shards(tmp_path, tokenizer_dir, tokenizer):
    source = _write_jsonl(tmp_path / "docs.jsonl", DOCS[:10])
    out = tmp_path / "docs"
    preprocess([source], out, tokenizer_dir, shard_docs=4, progress=False)
    _write_jsonl(source, DOCS[10:16])
    report = preprocess([source], out, tokenizer_dir, shard_docs=4, progress=False)
    assert report["shards_resumed"] == 0
    assert _tokens(out) == [tokenizer.tokenize(d) + [tokenizer.eod] for d in DOCS[10:16]]
    assert not os.path.exists(shard_prefix(str(out), 2) + ".done.json")  # the earlier run's third
    assert not os.path.exists(shard_prefix(str(out), 2) + ".bin")


def test_cli(tmp_path, tokenizer_dir, capsys):
    source = _write_jsonl(tmp_path / "docs.jsonl", DOCS[:30], key="body")
    out = tmp_path / "cli" / "docs"
    main(["--input", str(source), "--output-prefix", str(out), "--tokenizer", str(tokenizer_dir),
          "--text-key", "body", "--shard-docs", "10", "--no-progress"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["documents"] == 30 and summary["shards"] == 3
    assert os.path.isfile(str(out) + ".idx") and os.path.isfile(str(out) + "_00002.done.json")


def test_errors_name_the_option(tmp_path, tokenizer_dir):
    source = _write_input("parquet", tmp_path, DOCS[:3])
    with pytest.raises(DataConfigError, match=r"--text-key.*'body'.*\['id', 'text'\]"):
        preprocess([source], tmp_path / "o", tokenizer_dir, text_key="body", progress=False)
    with pytest.raises(DataConfigError, match=r"--input.*format.*notes\.txt"):
        (tmp_path / "notes.txt").write_text("hi")
        preprocess([tmp_path / "notes.txt"], tmp_path / "o", tokenizer_dir, progress=False)
    with pytest.raises(DataConfigError, match=r"--workers"):
        preprocess([source], tmp_path / "o", tokenizer_dir, workers=0, progress=False)
