"""Turn a data config into a tokenizer plus one indexed dataset per source, once.

Layout of `out_dir`:
    tokenizer/tokenizer.json
    <source>.bin, <source>.idx     one per source, megatron-core's indexed format
    data_manifest.json             the config used, per-source sha256 fingerprints, stats

Only `tokenizer` and `sources` (and the seed) decide these bytes; `mixes` and `split` are read
later by `build_gpt_datasets`, so changing them does not redo the preparation. The manifest is
written last, inside a temporary sibling directory that is then renamed into place: an `out_dir`
with a manifest is always complete. Call it from one process (e.g. rank 0, then a barrier).
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from data_pipelines.errors import DataConfigError
from data_pipelines.preprocess import preprocess
from data_pipelines.synthetic_corpus import GENERATORS, generate_documents
from data_pipelines.tokenizer import load_tokenizer, tokenizer_file, train_bpe

MANIFEST = "data_manifest.json"
TOKENIZER_DIR = "tokenizer"
RAW_DIR = "raw"  # generated sources as JSON lines, the input preprocessing reads
# Bump when generators or the on-disk format change, so old manifests stop matching.
FORMAT_VERSION = 3  # 2: chat / thinking-mode / self-reward tokens; 3: via preprocess (dedup, rejects)
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class PreparedData:
    tokenizer_dir: str
    prefixes: dict[str, str]  # source -> absolute .bin/.idx prefix
    fingerprints: dict[str, str]  # source -> sha256 of its .bin then .idx bytes
    stats: dict


def prepare_data(data_cfg: Mapping, out_dir: str | os.PathLike, seed: int) -> PreparedData:
    """Prepare (or reuse) the tokenizer and indexed datasets that `data_cfg` describes."""
    out_dir = os.path.abspath(out_dir)
    config = _data_defining_config(data_cfg)
    key = {"format_version": FORMAT_VERSION, "seed": seed, "config": config}
    manifest = _read_manifest(out_dir)
    if manifest is not None and {k: manifest.get(k) for k in key} == key:
        prepared = _prepared_from_manifest(out_dir, manifest)
        if _files_present(prepared):  # cheap check; the fingerprints are not recomputed
            return prepared

    _check_replaceable(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = _sibling(out_dir, "partial")
    os.makedirs(tmp)
    try:
        manifest = {**key, **_build(config, seed, tmp)}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _prepared_from_manifest(out_dir, manifest)


def prepared_tokenizer(data_cfg: Mapping, out_dir: str | os.PathLike, seed: int):
    """The tokenizer of a run's prepared data (what a stage needs that reads no corpus itself)."""
    return load_tokenizer(prepare_data(data_cfg, out_dir, seed).tokenizer_dir)


def resolve_mix(prepared: PreparedData, mix: Mapping[str, float]) -> dict[str, float]:
    """Validated mix: sources sorted by name, zero weights dropped, weights summing to 1.

    Sorting makes the same weights give the same blend (and fingerprint) in any key order.
    """
    weights = {}
    for source, weight in dict(mix).items():
        if source not in prepared.prefixes:
            raise DataConfigError(
                f"mixes: unknown source {source!r}; the prepared sources are "
                f"{sorted(prepared.prefixes)}"
            )
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise DataConfigError(f"mixes.{source}: weight must be a number >= 0, got {weight!r}")
        if weight > 0:
            weights[source] = float(weight)
    total = sum(weights.values())
    if total <= 0:
        raise DataConfigError(f"mixes: at least one source needs a weight > 0, got {dict(mix)}")
    return {s: weights[s] / total for s in sorted(weights)}


def data_fingerprint(prepared: PreparedData, mix: Mapping[str, float]) -> str:
    """sha256 naming exactly the tokens a mix draws from: its sources' fingerprints and its
    normalised weights (a checkpoint manifest can record it, a cache can be keyed by it)."""
    weights = resolve_mix(prepared, mix)
    payload = [[s, prepared.fingerprints[s], round(w, 12)] for s, w in weights.items()]
    return hashlib.sha256(json.dumps(payload).encode("utf-8")).hexdigest()


def items_fingerprint(sets: Mapping[str, Sequence[Any]]) -> str:
    """sha256 naming exactly the prompts a stage samples from or is judged on (RL prompt pools,
    evaluation sets): every item of each named set, in order, as its type and fields (tasks, code
    tasks, instruction prompts, evaluation items are frozen dataclasses)."""
    h = hashlib.sha256()
    for name in sorted(sets):
        for item in sets[name]:
            fields = dataclasses.asdict(item) if dataclasses.is_dataclass(item) else item
            h.update(json.dumps([name, type(item).__name__, fields], sort_keys=True, default=str).encode())
            h.update(b"\n")
    return h.hexdigest()


def _to_plain(value: Any) -> Any:
    """DictConfig/ListConfig (or any Mapping/sequence) -> plain JSON-able Python values."""
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_to_plain(v) for v in value]
    return value


def _data_defining_config(data_cfg: Mapping) -> dict:
    """Validate the config; return `tokenizer` and `sources` in a canonical form that changes
    whenever the output bytes would (absolute paths, file size and mtime)."""
    cfg = _to_plain(data_cfg)
    if not isinstance(cfg, dict):
        raise DataConfigError(f"data: expected a mapping, got {type(data_cfg).__name__}")
    tok = cfg.get("tokenizer") or {}
    if not isinstance(tok, dict):
        raise DataConfigError(f"tokenizer: expected a mapping with path or vocab_size, got {tok!r}")
    if tok.get("path") is not None:
        tok_dir = os.path.abspath(os.path.expanduser(str(tok["path"])))
        tok_file = tokenizer_file(tok_dir)
        tokenizer = {"path": tok_dir, "sha256": _sha256_files([tok_file])}
    else:
        tokenizer = {"path": None, "vocab_size": tok.get("vocab_size", 512)}

    sources = cfg.get("sources")
    if not isinstance(sources, dict) or not sources:
        raise DataConfigError("sources: expected a non-empty mapping of source name -> source")
    canonical = {}
    for name, src in sources.items():
        if not _SOURCE_NAME.match(name) or name == TOKENIZER_DIR:
            raise DataConfigError(
                f"sources.{name}: a source name becomes a file name; use letters, digits, "
                f"'_', '-', '.' (and not {TOKENIZER_DIR!r})"
            )
        src = src if isinstance(src, dict) else {}
        if ("generator" in src) == ("path" in src):
            raise DataConfigError(
                f"sources.{name}: set either generator + num_docs (synthetic) or "
                f"path + text_key (a local JSON lines file), not {sorted(src) or 'nothing'}"
            )
        if "generator" in src:
            if src["generator"] not in GENERATORS:
                raise DataConfigError(
                    f"sources.{name}.generator: unknown generator {src['generator']!r}; "
                    f"choose one of {sorted(GENERATORS)}"
                )
            num_docs = src.get("num_docs")
            if isinstance(num_docs, bool) or not isinstance(num_docs, int) or num_docs < 1:
                raise DataConfigError(
                    f"sources.{name}.num_docs: must be an integer >= 1, got {num_docs!r}"
                )
            canonical[name] = {"generator": src["generator"], "num_docs": num_docs}
            continue
        path = os.path.abspath(os.path.expanduser(str(src["path"])))
        if not os.path.exists(path):
            raise DataConfigError(
                f"sources.{name}.path: {path} does not exist; expected a local JSON lines, Parquet "
                f"or Arrow file, or a `datasets` folder saved with save_to_disk"
            )
        st = os.stat(path)
        canonical[name] = {"path": path, "text_key": src.get("text_key", "text"),
                           "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    # Not used here, but a typo in a mix should fail before the slow part, not after it.
    for mix_name, mix in (cfg.get("mixes") or {}).items():
        unknown = sorted(set(mix) - set(canonical)) if isinstance(mix, dict) else None
        if unknown or not isinstance(mix, dict):
            raise DataConfigError(
                f"mixes.{mix_name}: expected source -> weight over the sources "
                f"{sorted(canonical)}; unknown: {unknown if unknown else mix!r}"
            )
    return {"tokenizer": tokenizer, "sources": canonical}


def _source_texts(name: str, src: dict, seed: int) -> Iterator[str]:
    if "generator" in src:
        # Derive the stream from the source name too: two sources with one generator differ.
        source_seed = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "big")
        yield from generate_documents(src["generator"], src["num_docs"], source_seed)
        return
    key = src["text_key"]
    with open(src["path"], encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataConfigError(
                    f"sources.{name}.path: {src['path']}:{lineno} is not a JSON object: {err}"
                ) from None
            text = record.get(key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataConfigError(
                    f"sources.{name}.text_key: {src['path']}:{lineno} has no string field "
                    f"{key!r}; set text_key to the field that holds the text"
                )
            yield text


def _build(config: dict, seed: int, work_dir: str) -> dict:
    """Write tokenizer and datasets into work_dir; return the manifest's remaining fields."""
    sources, tok_cfg = config["sources"], config["tokenizer"]
    tok_dir = os.path.join(work_dir, TOKENIZER_DIR)
    if tok_cfg["path"] is None:
        corpus = (t for name, src in sources.items() for t in _source_texts(name, src, seed))
        tokenizer = train_bpe(corpus, tok_cfg["vocab_size"], tok_dir)
    else:
        tokenizer = load_tokenizer(tok_cfg["path"])
        tokenizer.save(tok_dir)

    fingerprints, source_stats = {}, {}
    for name, src in sources.items():
        prefix = os.path.join(work_dir, name)
        if "generator" in src:  # generated text goes through the same preprocessing as real data
            raw = os.path.join(work_dir, RAW_DIR, f"{name}.jsonl")
            os.makedirs(os.path.dirname(raw), exist_ok=True)
            with open(raw, "w", encoding="utf-8") as f:
                for text in _source_texts(name, src, seed):
                    f.write(json.dumps({"text": text}) + "\n")
            inputs, text_key = [raw], "text"
        else:
            inputs, text_key = [src["path"]], src["text_key"]
        report = preprocess(inputs, prefix, tok_dir, text_key=text_key, progress=False)
        source_stats[name] = {k: report[k] for k in ("documents", "tokens", "duplicates_dropped",
                                                     "rejected_total")}
        fingerprints[name] = _sha256_files([prefix + ".bin", prefix + ".idx"])
    return {
        "tokenizer_dir": TOKENIZER_DIR,
        "prefixes": {name: name for name in sources},  # relative: out_dir may move
        "fingerprints": fingerprints,
        "stats": {"vocab_size": tokenizer.vocab_size, "sources": source_stats},
    }


def _sha256_files(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _read_manifest(out_dir: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, MANIFEST)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _prepared_from_manifest(out_dir: str, manifest: dict) -> PreparedData:
    return PreparedData(
        tokenizer_dir=os.path.join(out_dir, manifest["tokenizer_dir"]),
        prefixes={s: os.path.join(out_dir, p) for s, p in manifest["prefixes"].items()},
        fingerprints=dict(manifest["fingerprints"]),
        stats=manifest["stats"],
    )


def _files_present(prepared: PreparedData) -> bool:
    if not os.path.isdir(prepared.tokenizer_dir):
        return False
    try:
        paths = [tokenizer_file(prepared.tokenizer_dir)]
    except DataConfigError:
        return False
    paths += [p + ext for p in prepared.prefixes.values() for ext in (".bin", ".idx")]
    return all(map(os.path.isfile, paths))


def _check_replaceable(out_dir: str) -> None:
    """Refuse to delete a directory that prepare_data did not (partly) write."""
    if not os.path.isdir(out_dir):
        if os.path.exists(out_dir):
            raise DataConfigError(f"out_dir: {out_dir} exists and is not a directory")
        return
    entries = os.listdir(out_dir)

    def ours(entry: str) -> bool:
        return entry in (MANIFEST, TOKENIZER_DIR, RAW_DIR) or entry.endswith(
            (".bin", ".idx", ".done.json", ".report.json", ".rejects.jsonl"))

    if MANIFEST not in entries and not all(map(ours, entries)):
        raise DataConfigError(
            f"out_dir: {out_dir} holds files prepare_data did not write "
            f"({sorted(e for e in entries if not ours(e))[:3]}); point it at an empty directory "
            f"or one prepared before"
        )


def _sibling(out_dir: str, tag: str) -> str:
    """A hidden, unique path next to out_dir (same file system, so rename is atomic).
    Not tempfile.mkdtemp: its 0700 mode would make the prepared data private to one user."""
    parent, base = os.path.split(out_dir)
    return os.path.join(parent, f".{base}.{tag}-{uuid.uuid4().hex[:12]}")


def _move_into_place(tmp: str, out_dir: str) -> None:
    if os.path.exists(out_dir):
        old = _sibling(out_dir, "old")
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)

