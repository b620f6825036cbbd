import json
import os

import pytest

from data_pipelines.errors import DataConfigError
from data_pipelines.prepare import MANIFEST, data_fingerprint, items_fingerprint, prepare_data
from data_pipelines.verifiable_tasks import generate_tasks
from data_pipelines.tokenizer import load_tokenizer

SMALL = {
    "tokenizer": {"path": None, "vocab_size": 300},
    "sources": {"prose": {"generator": "prose", "num_docs": 100},
                "code": {"generator": "code", "num_docs": 50}},
}


def _mtimes(directory):
    return {os.path.join(root, f): os.stat(os.path.join(root, f)).st_mtime_ns
            for root, _, files in os.walk(directory) for f in files}


def test_layout_and_manifest(tiny_prepared_dir, tiny_prepared, tiny_config):
    for source in tiny_config["sources"]:
        assert os.path.isfile(tiny_prepared.prefixes[source] + ".bin")
        assert os.path.isfile(tiny_prepared.prefixes[source] + ".idx")
        assert tiny_prepared.stats["sources"][source]["documents"] == \
            tiny_config["sources"][source]["num_docs"]
    assert load_tokenizer(tiny_prepared.tokenizer_dir).vocab_size == 512
    manifest = json.loads((tiny_prepared_dir / MANIFEST).read_text())
    assert manifest["seed"] == 0
    assert manifest["fingerprints"] == tiny_prepared.fingerprints
    assert manifest["config"]["sources"]["code"] == {"generator": "code", "num_docs": 2000}
    assert not [p for p in os.listdir(tiny_prepared_dir.parent) if ".partial-" in p]


def test_idempotent(tmp_path):
    first = prepare_data(SMALL, tmp_path / "out", seed=0)
    before = _mtimes(tmp_path / "out")
    second = prepare_data(SMALL, tmp_path / "out", seed=0)
    assert second == first
    assert _mtimes(tmp_path / "out") == before  # nothing was rewritten


def test_deterministic_and_seed_sensitive(tmp_path):
    a = prepare_data(SMALL, tmp_path / "a", seed=0)
    b = prepare_data(SMALL, tmp_path / "b", seed=0)
    c = prepare_data(SMALL, tmp_path / "c", seed=1)
    assert a.fingerprints == b.fingerprints
    assert all(a.fingerprints[s] != c.fingerprints[s] for s in SMALL["sources"])
    mix = {"prose": 0.5, "code": 0.5}
    assert data_fingerprint(a, mix) == data_fingerprint(b, mix) != data_fingerprint(c, mix)


def test_changed_config_redoes_the_work(tmp_path):
    first = prepare_data(SMALL, tmp_path / "out", seed=0)
    sources = {**SMALL["sources"], "code": {"generator": "code", "num_docs": 60}}
    bigger = {**SMALL, "sources": sources}
    second = prepare_data(bigger, tmp_path / "out", seed=0)
    assert second.stats["sources"]["code"]["documents"] == 60
    assert second.fingerprints["code"] != first.fingerprints["code"]
    # mixes and split are not read by prepare_data, so changing them reuses the data
    before = _mtimes(tmp_path / "out")
    prepare_data({**bigger, "split": "90,10,0", "mixes": {"m": {"code": 1}}}, tmp_path / "out", 0)
    assert _mtimes(tmp_path / "out") == before


def test_partial_out_dir_is_redone(tmp_path):
    reference = prepare_data(SMALL, tmp_path / "ref", seed=0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "prose.bin").write_bytes(b"half written")  # a crash of some earlier writer
    prepared = prepare_data(SMALL, out, seed=0)
    assert prepared.fingerprints == reference.fingerprints
    assert (out / MANIFEST).is_file()


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataConfigError, match="out_dir"):
        prepare_data(SMALL, tmp_path, seed=0)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_jsonl_source_and_given_tokenizer(tmp_path, tiny_prepared):
    lines = [json.dumps({"body": f"document number {i} says hello"}) for i in range(20)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    cfg = {"tokenizer": {"path": tiny_prepared.tokenizer_dir},
           "sources": {"mine": {"path": str(tmp_path / "docs.jsonl"), "text_key": "body"}}}
    prepared = prepare_data(cfg, tmp_path / "out", seed=0)
    assert prepared.stats["sources"]["mine"]["documents"] == 20
    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    given = load_tokenizer(tiny_prepared.tokenizer_dir)
    assert tokenizer.unique_identifiers == given.unique_identifiers


def test_error_unknown_generator(tmp_path):
    cfg = {**SMALL, "sources": {"poems": {"generator": "poetry", "num_docs": 3}}}
    with pytest.raises(DataConfigError, match=r"sources\.poems\.generator.*'poetry'.*arithmetic"):
        prepare_data(cfg, tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()


def test_error_missing_source_path(tmp_path):
    cfg = {**SMALL, "sources": {"mine": {"path": str(tmp_path / "nope.jsonl"), "text_key": "text"}}}
    with pytest.raises(DataConfigError, match=r"sources\.mine\.path.*nope\.jsonl"):
        prepare_data(cfg, tmp_path / "out", seed=0)


def test_error_missing_text_key(tmp_path):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    cfg = {**SMALL, "sources": {"mine": {"path": str(tmp_path / "docs.jsonl"), "text_key": "text"}}}
    with pytest.raises(DataConfigError, match=r"sources\.mine\.text_key.*docs\.jsonl:1"):
        prepare_data(cfg, tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == ["docs.jsonl"]


def test_error_missing_tokenizer_path(tmp_path):
    cfg = {**SMALL, "tokenizer": {"path": str(tmp_path)}}
    with pytest.raises(DataConfigError, match=r"tokenizer\.path.*tokenizer\.json"):
        prepare_data(cfg, tmp_path / "out", seed=0)


def test_mix_fingerprint(tiny_prepared):
    fp = data_fingerprint(tiny_prepared, {"prose": 0.6, "arithmetic": 0.2, "code": 0.2})
    assert fp == data_fingerprint(tiny_prepared, {"code": 1, "arithmetic": 1, "prose": 3})
    assert fp != data_fingerprint(tiny_prepared, {"prose": 0.2, "arithmetic": 0.6, "code": 0.2})
    assert data_fingerprint(tiny_prepared, {"prose": 1, "code": 0}) == \
        data_fingerprint(tiny_prepared, {"prose": 1})
    with pytest.raises(DataConfigError, match=r"mixes: unknown source 'poems'.*prose"):
        data_fingerprint(tiny_prepared, {"poems": 1})


def test_accepts_omegaconf(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create(SMALL)
    assert prepare_data(cfg, tmp_path / "a", 0) == prepare_data(SMALL, tmp_path / "a", 0)


def test_error_unknown_mix_source_before_any_work(tmp_path):
    cfg = {**SMALL, "mixes": {"main": {"prose": 0.5, "poems": 0.5}}}
    with pytest.raises(DataConfigError, match=r"mixes\.main.*'code', 'prose'.*poems"):
        prepare_data(cfg, tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()


def test_file_sources_go_through_preprocessing(tmp_path, tiny_prepared):
    """Bad lines are set aside and duplicates dropped, never stopping the preparation."""
    lines = [json.dumps({"body": f"document number {i} says hello"}) for i in range(10)]
    lines += ["{not json", json.dumps({"body": 7}), lines[0]]  # 2 rejects, 1 duplicate
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    cfg = {"tokenizer": {"path": tiny_prepared.tokenizer_dir},
           "sources": {"mine": {"path": str(tmp_path / "docs.jsonl"), "text_key": "body"}}}
    prepared = prepare_data(cfg, tmp_path / "out", seed=0)
    stats = prepared.stats["sources"]["mine"]
    assert (stats["documents"], stats["rejected_total"], stats["duplicates_dropped"]) == (10, 2, 1)
    rejects = (tmp_path / "out" / "mine.rejects.jsonl").read_text().splitlines()
    assert sorted(json.loads(r)["reason"] for r in rejects) == ["bad_json", "non_string_text"]


def test_items_fingerprint_names_exactly_the_items():
    tasks = generate_tasks(["comparison", "arithmetic"], 6, seed=1, difficulties=[1])
    again = generate_tasks(["comparison", "arithmetic"], 6, seed=1, difficulties=[1])
    base = items_fingerprint({"prompts": tasks, "eval": tasks[:2]})
    assert base == items_fingerprint({"eval": again[:2], "prompts": again})     # same items, any key order
    changed = [tasks[0].__class__(**{**tasks[0].__dict__, "answer": "other"})] + tasks[1:]
    for other in ({"prompts": changed, "eval": tasks[:2]}, {"prompts": tasks[::-1], "eval": tasks[:2]},
                  {"prompts": tasks, "eval": tasks[:3]}, {"pool": tasks, "eval": tasks[:2]}):
        assert items_fingerprint(other) != base
