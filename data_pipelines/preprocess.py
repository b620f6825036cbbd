"""Raw text files -> sharded megatron-core indexed datasets, in parallel, resumable, deduplicated.

    python -m data_pipelines.preprocess --input a.jsonl --input b.parquet \
        --output-prefix out/web --tokenizer out/tokenizer --workers 8 --shard-docs 100000

Outputs next to `OUT` (the output prefix):
    OUT_00000.bin/.idx ...   one indexed dataset per shard of `shard_docs` kept documents
    OUT_00000.done.json ...  the shard's done marker: what it holds, so a rerun can skip it
    OUT.bin/.idx             all shards merged in order (as IndexedDatasetBuilder.add_index), unless
                             merge=False; a blend can use either the shards or the merged file
    OUT.rejects.jsonl        one line per rejected input line/row: input, line or row, reason, raw
    OUT.report.json          input fingerprints, counts, tokens, shards, elapsed time, tokens/s
Paths in these two files that lie inside OUT's folder are relative to it, so the folder can move (a
run folder's data/ is built in a temporary folder, then renamed into place).

Why it is shaped this way:
- One reader (the main process) walks the inputs in the given order, rejects malformed records
  and drops exact duplicates (first occurrence wins); only then are the kept documents cut into
  shards of `shard_docs`. Shard boundaries therefore depend only on the inputs, never on the
  number of workers or on timing, so any worker count gives the same bytes.
- Workers only tokenize and write (the expensive part); each writes its shard under a temporary
  name, renames it into place and writes the done marker last. A crash leaves at worst a temp file
  or a shard without marker, both redone on the next run. A marker records the sha1 of its
  documents and the tokenizer hash, so a shard is skipped only if it holds exactly what this run
  would write; the rerun's outputs are then byte-identical to an uninterrupted run.
- Rejects never stop the job: a corpus of billions of lines always has some bad ones, and losing
  the good lines around them (or the whole job) costs more than a counted, inspectable reject.
"""

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Iterable, Iterator, Sequence

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
from tqdm import tqdm

from data_pipelines.errors import DataConfigError
from data_pipelines.indexed import write_indexed_dataset
from data_pipelines.tokenizer import TOKENIZER_FILE, load_tokenizer
from megatron_ext.manifest import relative_in

DEFAULT_SHARD_DOCS = 100_000
RAW_LIMIT = 4096  # bytes of a rejected line kept in the rejects file
_ROW_BATCH = 4096  # rows per Arrow record batch when reading columnar inputs
# Bump when the shard bytes this module writes change, so old done markers stop matching.
FORMAT_VERSION = 1

JSONL_SUFFIXES = (".jsonl", ".json")


# ---------------------------------------------------------------- reading the inputs


def _input_format(path: str) -> str:
    if os.path.isdir(path):
        return "datasets"
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".arrow"):
        return "arrow"
    raise DataConfigError(
        f"--input: cannot tell the format of {path}; use a .jsonl/.json (JSON lines), .parquet, "
        f".arrow (Arrow IPC) file or a folder written by datasets.Dataset.save_to_disk"
    )


def _reject(reason: str, raw) -> tuple:
    if isinstance(raw, bytes):
        raw = raw[:RAW_LIMIT].decode("utf-8", errors="replace").rstrip("\r\n")
    else:
        raw = repr(raw)[:RAW_LIMIT]
    return ("reject", reason, raw)


def _check_text(text) -> str | None:
    """The reject reason for a text field's value, or None if it is a usable document."""
    if text is None:
        return "missing_text"
    if not isinstance(text, str):
        return "non_string_text"
    if not text.strip():
        return "empty_text"
    return None


def _read_jsonl(path: str, text_key: str) -> Iterator[tuple]:
    """Parsed line by line (not with `datasets`), because one bad line must cost one line,
    not the file. Blank lines are skipped silently (a trailing newline is not a record)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except UnicodeDecodeError:
                yield lineno, _reject("bad_utf8", raw)
                continue
            except json.JSONDecodeError:
                yield lineno, _reject("bad_json", raw)
                continue
            if not isinstance(record, dict):
                yield lineno, _reject("not_an_object", raw)
                continue
            reason = _check_text(record.get(text_key))
            yield lineno, _reject(reason, raw) if reason else ("text", record[text_key])


def _text_column(batches: Iterable, schema, path: str, text_key: str) -> Iterator[tuple]:
    import pyarrow

    if text_key not in schema.names:
        raise DataConfigError(
            f"--text-key: {path} has no column {text_key!r} (columns: {schema.names}); "
            f"pass --text-key with the column that holds the text"
        )
    field = schema.field(text_key)
    is_string = pyarrow.types.is_string(field.type) or pyarrow.types.is_large_string(field.type)
    row = 0
    for batch in batches:
        for value in batch.column(batch.schema.get_field_index(text_key)).to_pylist():
            if is_string:
                reason = _check_text(value)
            else:  # a non-string column: every non-null row is a non-string text
                reason = "missing_text" if value is None else "non_string_text"
            yield row, _reject(reason, value) if reason else ("text", value)
            row += 1


def _read_parquet(path: str, text_key: str) -> Iterator[tuple]:
    import pyarrow.parquet

    pf = pyarrow.parquet.ParquetFile(path)
    schema = pf.schema_arrow
    columns = [text_key] if text_key in schema.names else None
    yield from _text_column(pf.iter_batches(batch_size=_ROW_BATCH, columns=columns), schema,
                            path, text_key)


def _read_arrow(path: str, text_key: str) -> Iterator[tuple]:
    """Arrow IPC file format, or the stream format that `datasets` writes in its .arrow files."""
    import pyarrow

    with pyarrow.memory_map(path) as source:
        try:
            reader = pyarrow.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pyarrow.ArrowInvalid:
            source.seek(0)
            reader = pyarrow.ipc.open_stream(source)
            batches = iter(reader)
        yield from _text_column(batches, reader.schema, path, text_key)


def _read_saved_dataset(path: str, text_key: str) -> Iterator[tuple]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as err:
        raise DataConfigError(
            f"--input: {path} is a folder but not one written by Dataset.save_to_disk ({err})"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataConfigError(
            f"--input: {path} is a DatasetDict with splits {sorted(ds)}; pass the split's "
            f"folder, e.g. {os.path.join(path, sorted(ds)[0])}"
        )
    if text_key not in ds.column_names:
        raise DataConfigError(
            f"--text-key: {path} has no column {text_key!r} (columns: {ds.column_names}); "
            f"pass --text-key with the column that holds the text"
        )
    # .iter honours an indices mapping (a saved shuffle/select), unlike the raw Arrow table.
    batches = ds.select_columns([text_key]).with_format("arrow").iter(batch_size=_ROW_BATCH)
    import pyarrow

    schema = pyarrow.schema([ds.features.arrow_schema.field(text_key)])
    yield from _text_column(batches, schema, path, text_key)


_READERS = {"jsonl": _read_jsonl, "parquet": _read_parquet, "arrow": _read_arrow,
            "datasets": _read_saved_dataset}


def _fingerprint(path: str, fmt: str) -> dict:
    """size + mtime + sha256, so a report names exactly the bytes it was made from. A folder
    hashes its files' relative names and contents in sorted order."""
    files = [path]
    if fmt == "datasets":
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    digest, size, mtime = hashlib.sha256(), 0, 0
    for file in files:
        if fmt == "datasets":
            digest.update(os.path.relpath(file, path).encode() + b"\0")
        st = os.stat(file)
        size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return {"path": path, "format": fmt, "size": size, "mtime_ns": mtime,
            "sha256": digest.hexdigest()}


# ---------------------------------------------------------------- shards


def shard_prefix(output_prefix: str, index: int) -> str:
    return f"{output_prefix}_{index:05d}"


def _done_path(prefix: str) -> str:
    return prefix + ".done.json"


def _shard_is_done(prefix: str, key: dict) -> dict | None:
    """The done marker if the shard is complete and holds what `key` describes, else None."""
    try:
        with open(_done_path(prefix)) as f:
            marker = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if {k: marker.get(k) for k in key} != key:
        return None
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext) or os.path.getsize(prefix + ext) != marker[ext]:
            return None
    return marker


def _replace_json(path: str, payload) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _remove(paths: Iterable[str]) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


_WORKER_TOKENIZER = None


def _init_worker(tokenizer_dir: str, rayon_threads: int | None) -> None:
    """Load the tokenizer once per process. With several workers each gets a share of the cores
    for the Rust tokenizer's thread pool, instead of every worker spawning one thread per core."""
    global _WORKER_TOKENIZER
    if rayon_threads is not None:
        os.environ.setdefault("RAYON_NUM_THREADS", str(rayon_threads))
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_dir)


def _write_shard(prefix: str, texts: list[str], key: dict) -> dict:
    """Tokenize `texts` into `prefix`.bin/.idx via a temp name, then write the done marker."""
    tmp = f"{prefix}.partial-{os.getpid()}"
    _remove([_done_path(prefix)])  # a stale marker must never vouch for new bytes
    try:
        stats = write_indexed_dataset(texts, _WORKER_TOKENIZER, tmp)
        for ext in (".bin", ".idx"):
            os.replace(tmp + ext, prefix + ext)
    except BaseException:
        _remove([tmp + ".bin", tmp + ".idx"])
        raise
    marker = {**key, **stats, ".bin": os.path.getsize(prefix + ".bin"),
              ".idx": os.path.getsize(prefix + ".idx")}
    _replace_json(_done_path(prefix), marker)
    return marker


def _merge(output_prefix: str, n_shards: int, dtype) -> None:
    """Concatenate the shards, in order, into `output_prefix`.bin/.idx (temp name, then rename).

    Does what `IndexedDatasetBuilder.add_index` does (same builder, same bytes) minus its full
    `gc.collect()` per shard, which costs ~0.4 s each once torch is imported: hours for a
    corpus of thousands of shards.
    """
    tmp = f"{output_prefix}.partial-{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    try:
        for index in range(n_shards):
            prefix = shard_prefix(output_prefix, index)
            shard = IndexedDataset(prefix)
            assert shard.index.dtype == dtype
            offset = len(builder.sequence_lengths)
            builder.sequence_lengths.extend(shard.sequence_lengths.tolist())
            builder.document_indices.extend((offset + shard.document_indices[1:]).tolist())
            del shard
            with open(prefix + ".bin", "rb") as f:
                shutil.copyfileobj(f, builder.data_file, 1 << 24)
        builder.finalize(tmp + ".idx")
        for ext in (".bin", ".idx"):
            os.replace(tmp + ext, output_prefix + ext)
    except BaseException:
        _remove([tmp + ".bin", tmp + ".idx"])
        raise


def _remove_stale_partials(output_prefix: str) -> None:
    """Temp files left by a killed run (`OUT*.partial-PID.*`, `*.tmp-PID`)."""
    directory, base = os.path.split(os.path.abspath(output_prefix))
    for name in os.listdir(directory):
        ours = name.startswith((base + "_", base + "."))
        if ours and (".partial-" in name or ".tmp-" in name):
            _remove([os.path.join(directory, name)])


def _remove_shards_beyond(output_prefix: str, n_shards: int) -> None:
    """Shards numbered past this run's last one were left by an earlier run over more data; a
    blend that globs `OUT_*` must not pick them up."""
    directory, base = os.path.split(output_prefix)
    pattern = re.compile(re.escape(base) + r"_(\d{5,})(\.bin|\.idx|\.done\.json)$")
    for name in os.listdir(directory):
        match = pattern.match(name)
        if match and int(match.group(1)) >= n_shards:
            _remove([os.path.join(directory, name)])


# ---------------------------------------------------------------- the job


def preprocess(
    inputs: Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    text_key: str = "text",
    workers: int = 1,
    shard_docs: int = DEFAULT_SHARD_DOCS,
    merge: bool = True,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` into sharded (and merged) indexed datasets; returns the report.

    Reruns resume: complete shards whose content matches are kept, the rest are rewritten.
    """
    start = time.perf_counter()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = [os.path.abspath(os.fspath(p)) for p in inputs]
    if not paths:
        raise DataConfigError("--input: give at least one input file or folder")
    for path in paths:
        if not os.path.exists(path):
            raise DataConfigError(f"--input: {path} does not exist")
    formats = [_input_format(p) for p in paths]
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise DataConfigError(f"--workers: must be an integer >= 1, got {workers!r}")
    if isinstance(shard_docs, bool) or not isinstance(shard_docs, int) or shard_docs < 1:
        raise DataConfigError(f"--shard-docs: must be an integer >= 1, got {shard_docs!r}")
    tokenizer_dir = os.path.abspath(os.fspath(tokenizer_dir))
    tokenizer = load_tokenizer(tokenizer_dir)  # fails early on a bad path; never tokenizes here
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    output_prefix = os.path.abspath(os.fspath(output_prefix))
    os.makedirs(os.path.dirname(output_prefix), exist_ok=True)
    _remove_stale_partials(output_prefix)

    out_dir = os.path.dirname(output_prefix)
    shown = {p: relative_in(p, out_dir) for p in paths + [tokenizer_dir]}  # how the files name them
    fingerprints = [{**_fingerprint(p, f), "path": shown[p]} for p, f in zip(paths, formats)]
    key_base = {"format_version": FORMAT_VERSION,
                "tokenizer": dict(tokenizer.unique_identifiers)}
    rejected, counts = Counter(), Counter()
    rejects_tmp = f"{output_prefix}.rejects.jsonl.tmp-{os.getpid()}"

    def shards() -> Iterator[tuple[int, list[str], str]]:
        """(index, texts, sha1 of the texts' hashes) per shard, in input order."""
        seen: set[bytes] = set()
        texts, shard_digest, index = [], hashlib.sha1(), 0
        with open(rejects_tmp, "w", encoding="utf-8") as rejects:
            for path, fmt in zip(paths, formats):
                where = "line" if fmt == "jsonl" else "row"
                for position, (kind, *rest) in _READERS[fmt](path, text_key):
                    counts["records"] += 1
                    if kind == "reject":
                        reason, raw = rest
                        rejected[reason] += 1
                        rejects.write(json.dumps({"input": shown[path], where: position,
                                                  "reason": reason, "raw": raw}) + "\n")
                        continue
                    text = rest[0]
                    # Exact text, no normalisation: the kept copy is stored verbatim, so only
                    # exact equality can never merge two different documents.
                    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()
                    if digest in seen:
                        counts["duplicates"] += 1
                        continue
                    seen.add(digest)
                    texts.append(text)
                    shard_digest.update(digest)
                    if len(texts) == shard_docs:
                        yield index, texts, shard_digest.hexdigest()
                        texts, shard_digest, index = [], hashlib.sha1(), index + 1
            if texts:
                yield index, texts, shard_digest.hexdigest()

    markers: dict[int, dict] = {}
    resumed = 0
    bar = tqdm(desc="preprocess", unit="doc", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)

    def finished(index: int, marker: dict) -> None:
        markers[index] = marker
        bar.update(marker["documents"])
        bar.set_postfix(shards=len(markers), tokens=sum(m["tokens"] for m in markers.values()))

    try:
        if workers == 1:
            _init_worker(tokenizer_dir, None)
            for index, texts, digest in shards():
                prefix = shard_prefix(output_prefix, index)
                key = {**key_base, "documents_sha1": digest, "documents": len(texts)}
                marker = _shard_is_done(prefix, key)
                resumed += marker is not None
                finished(index, marker or _write_shard(prefix, texts, key))
        else:
            ctx = multiprocessing.get_context("fork")  # no re-import of torch/megatron per worker
            rayon = max(1, (os.cpu_count() or 1) // workers)
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(tokenizer_dir, rayon)) as pool:
                pending = {}
                for index, texts, digest in shards():
                    prefix = shard_prefix(output_prefix, index)
                    key = {**key_base, "documents_sha1": digest, "documents": len(texts)}
                    marker = _shard_is_done(prefix, key)
                    if marker is not None:
                        resumed += 1
                        finished(index, marker)
                        continue
                    # Bounded in flight: the reader must not run ahead of the tokenizers with
                    # the whole corpus in memory.
                    while len(pending) >= 2 * workers:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            finished(pending.pop(future), future.result())
                    pending[pool.submit(_write_shard, prefix, texts, key)] = index
                for future in wait(pending).done:
                    finished(pending[future], future.result())
        os.replace(rejects_tmp, output_prefix + ".rejects.jsonl")
    finally:
        bar.close()
        _remove([rejects_tmp])

    n_shards = len(markers)
    assert sorted(markers) == list(range(n_shards))
    _remove_shards_beyond(output_prefix, n_shards)
    if merge:
        _merge(output_prefix, n_shards, dtype)
    documents = sum(m["documents"] for m in markers.values())
    tokens = sum(m["tokens"] for m in markers.values())
    elapsed = time.perf_counter() - start
    report = {
        "inputs": fingerprints,
        "text_key": text_key,
        "tokenizer": {"path": shown[tokenizer_dir], **tokenizer.unique_identifiers,
                      "vocab_size": tokenizer.vocab_size, "dtype": numpy.dtype(dtype).name},
        "records_read": counts["records"],
        "documents": documents,
        "duplicates_dropped": counts["duplicates"],
        "rejected": dict(sorted(rejected.items())),
        "rejected_total": sum(rejected.values()),
        "tokens": tokens,  # including one eod per document
        "shard_docs": shard_docs,
        "shards": [os.path.basename(shard_prefix(output_prefix, i)) for i in range(n_shards)],
        "shards_resumed": resumed,
        "merged": os.path.basename(output_prefix) if merge else None,
        "workers": workers,
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
    }
    _replace_json(output_prefix + ".report.json", report)
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.preprocess",
        description="Tokenize raw text (jsonl, parquet, arrow, datasets folder) into sharded "
                    "megatron-core indexed datasets; rerun the same command to resume.",
    )
    parser.add_argument("--input", action="append", required=True,
                        help="input file or saved datasets folder; repeat for several, in order")
    parser.add_argument("--output-prefix", required=True, help="OUT of OUT_00000.bin/.idx, ...")
    parser.add_argument("--tokenizer", required=True,
                        help=f"directory holding {TOKENIZER_FILE} or a SentencePiece .model")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--shard-docs", type=int, default=DEFAULT_SHARD_DOCS,
                        help="kept documents per output shard")
    parser.add_argument("--no-merge", action="store_true",
                        help="keep only the shards; skip writing the merged OUT.bin/.idx")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    report = preprocess(args.input, args.output_prefix, args.tokenizer, text_key=args.text_key,
                        workers=args.workers, shard_docs=args.shard_docs,
                        merge=not args.no_merge, progress=not args.no_progress)
    summary = {k: report[k] for k in ("documents", "duplicates_dropped", "rejected", "tokens",
                                      "elapsed_s", "tokens_per_s")}
    print(json.dumps({**summary, "shards": len(report["shards"])}))
    return report


if __name__ == "__main__":
    try:
        main()
    except DataConfigError as err:
        sys.exit(f"error: {err}")
