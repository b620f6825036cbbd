"""Export reads any layout's checkpoint: the same weights saved by TP1, TP2, EP2 and PP2 export to
identical Hugging Face tensors, and the export CLI refuses what the format cannot represent."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.hf.safetensors_shards import SafetensorsFolder

WORKER = Path(__file__).with_name("resave_worker.py")
DROPLESS = ["model.moe_routing_mode=dropless", "model.moe_expert_capacity_factor=null"]
HUNYUAN = ["model=tiny_large", "model.cla_share_factor=1", "model.moe_router_topk=2", *DROPLESS]
LAYOUTS = {"tp2": ["parallel=tp2"], "ep2": ["parallel=ep2"], "pp2": ["parallel=pp2"]}


def export(checkpoint: Path, model_yaml: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_ext.hf.convert", "export", str(checkpoint), str(out),
           "--model-config", str(model_yaml), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    f = SafetensorsFolder(folder)
    return f.get(f.weight_map)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, torchrun_module):
    """The same random weights saved by one process and by each two-process layout."""
    root = tmp_path_factory.mktemp("layouts")
    torchrun_module(WORKER, "init", root / "tp1", *HUNYUAN, nproc=1)
    src = root / "tp1" / "iter_0000000"
    for name, layout in LAYOUTS.items():
        torchrun_module(WORKER, src, root / name, *HUNYUAN, *layout, nproc=2)
    return root


@pytest.fixture(scope="module")
def exported(saved):
    out = {}
    for name in ["tp1", *LAYOUTS]:
        proc = export(saved / name / "iter_0000000", saved / name / "model.yaml", saved / f"hf_{name}",
                      "--max-shard-size", "200KB")
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = saved / f"hf_{name}"
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_export_identical_tensors(exported, layout):
    ref, got = tensors(exported["tp1"]), tensors(exported[layout])
    assert sorted(ref) == sorted(got)
    for name, t in ref.items():
        assert torch.equal(t, got[name]), name


def test_export_is_sharded_with_an_index(exported):
    files = sorted(p.name for p in exported["tp1"].glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert (exported["tp1"] / "model.safetensors.index.json").exists()
    assert (exported["tp1"] / "config.json").exists()


def test_cla_model_is_refused_and_nothing_is_written(saved, tmp_path):
    yaml = tmp_path / "cla.yaml"
    yaml.write_text((saved / "tp1" / "model.yaml").read_text().replace("cla_share_factor: 1", "cla_share_factor: 2"))
    proc = export(saved / "tp1" / "iter_0000000", yaml, tmp_path / "out")
    assert proc.returncode == 2 and ("CLA" in proc.stderr or "cla_share_factor" in proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
