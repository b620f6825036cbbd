"""Manifests store paths inside the run folder relative to it, so a moved run is the same run."""

import json

from megatron_ext import manifest

CONFIG = {"model": {"family": "hunyuan_moe"}, "data": {"name": "tiny_synthetic"}, "seed": 1234,
          "stages": {"anneal": {"kind": "pretrain", "init_from": None}}}


def test_paths_inside_the_folder_become_relative_and_resolve_back(tmp_path):
    run = tmp_path / "run"
    assert manifest.relative_in(run / "01_pretrain" / "checkpoints" / "iter_0000008", run) == \
        "01_pretrain/checkpoints/iter_0000008"
    assert manifest.relative_in(str(run), run) == "."
    assert manifest.relative_in(tmp_path / "run2" / "x", run) == str(tmp_path / "run2" / "x")  # not inside
    assert manifest.relative_in("01_pretrain/x", run) == "01_pretrain/x"  # already relative
    assert manifest.relative_in(None, run) is None
    moved = tmp_path / "elsewhere"
    assert manifest.resolve_in("01_pretrain/x", moved) == str(moved / "01_pretrain" / "x")
    assert manifest.resolve_in("/corpus/web.jsonl", moved) == "/corpus/web.jsonl"  # absolute: as it is
    assert manifest.resolve_in(".", moved) == str(moved)
    assert manifest.resolve_in(None, moved) is None


def test_write_stores_paths_inside_the_run_folder_relative_to_it(tmp_path):
    run = tmp_path / "run"
    stage = run / "02_anneal"
    parent = run / "01_pretrain" / "checkpoints" / "iter_0000008"
    config = {**CONFIG, "run_dir": str(run), "data": {"sources": {"web": {"path": "/corpus/web.jsonl"}}}}
    manifest.begin_attempt(stage, "anneal", "pretrain", config, str(parent), None)
    manifest.complete(stage, "checkpoints/iter_0000004", 4, 100, {}, None, 1.0,
                      extra={"references": {"pretrain": parent}})
    stored = json.loads((stage / "manifest.json").read_text())
    assert stored["parent_checkpoint"] == "01_pretrain/checkpoints/iter_0000008"
    assert stored["config"]["run_dir"] == "."
    assert stored["config"]["data"]["sources"]["web"]["path"] == "/corpus/web.jsonl"   # outside: absolute
    assert stored["references"] == {"pretrain": "01_pretrain/checkpoints/iter_0000008"}
    assert str(tmp_path) not in (stage / "manifest.json").read_text()


def test_identity_does_not_change_when_the_run_folder_moves(tmp_path):
    old, new = tmp_path / "scratch" / "run", tmp_path / "project" / "run"
    recorded = manifest.stage_identity(CONFIG, "anneal", str(old / "01_pretrain" / "ckpt"), old)
    assert recorded == manifest.stage_identity(CONFIG, "anneal", str(new / "01_pretrain" / "ckpt"), new)
    assert recorded != manifest.stage_identity(CONFIG, "anneal", str(new / "01_pretrain" / "other"), new)
    assert recorded != manifest.stage_identity({**CONFIG, "seed": 1}, "anneal", str(new / "01_pretrain" / "ckpt"), new)
    outside = manifest.stage_identity(CONFIG, "anneal", "/models/base", new)
    assert outside["parent_checkpoint"] == "/models/base"


def test_manifests_with_absolute_paths_are_still_recognised(tmp_path):
    """Manifests written before paths were stored relative: absolute paths into the run folder, whose
    config names it when run_dir was absolute."""
    old, new = tmp_path / "scratch" / "run", tmp_path / "project" / "run"
    in_place = {"config": {**CONFIG, "run_dir": "runs/demo"}, "parent_checkpoint": str(new / "01_pretrain" / "ckpt")}
    wanted = manifest.stage_identity(CONFIG, "anneal", str(new / "01_pretrain" / "ckpt"), new)
    assert manifest.recorded_identity(in_place, "anneal", new) == wanted
    moved = {"config": {**CONFIG, "run_dir": str(old)}, "parent_checkpoint": str(old / "01_pretrain" / "ckpt")}
    assert manifest.recorded_identity(moved, "anneal", new) == wanted
    other = {"config": {**CONFIG, "run_dir": str(old)}, "parent_checkpoint": str(old / "01_pretrain" / "other")}
    assert manifest.recorded_identity(other, "anneal", new) != wanted
