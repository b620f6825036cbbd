"""The converter end to end (``python -m megatron_ext.hf.convert``), for both families.

- export of a checkpoint loads in ``transformers`` and computes our logits;
- a ``transformers``-initialised model, imported then exported again, gives back its tensors byte for
  byte, and the imported checkpoint loads under another layout (TP2) unchanged.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.hf import hunyuan_v1_moe, nemotron_h
from megatron_ext.hf.safetensors_shards import SafetensorsFolder
from tests.megatron_ext.hf.test_export_layouts import HUNYUAN
from tests.megatron_ext.hf.test_nemotron_h import EXPORTABLE as HYBRID

WORKER = Path(__file__).with_name("resave_worker.py")
FAMILIES = {"hunyuan_v1_moe": (HUNYUAN, hunyuan_v1_moe), "nemotron_h": (HYBRID, nemotron_h)}


def convert(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.hf.convert", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    f = SafetensorsFolder(folder)
    return f.get(f.weight_map)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_in_transformers_with_our_logits(family, tmp_path, torchrun):
    from transformers import AutoModelForCausalLM

    overrides, _ = FAMILIES[family]
    torchrun(WORKER, "init", tmp_path / "ours", *overrides, nproc=1)
    convert("export", tmp_path / "ours" / "iter_0000000", tmp_path / "hf", "--model-config",
            tmp_path / "ours" / "model.yaml")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = torch.load(tmp_path / "ours" / "logits.pt")
    with torch.no_grad():
        theirs = model(ours["tokens"]).logits
    assert (theirs - ours["logits"]).abs().max() < 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_then_export_is_byte_identical_and_loads_under_tp2(family, tmp_path, torchrun):
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides, adapter = FAMILIES[family]
    # a transformers-initialised model of the shape our test model has
    torchrun(WORKER, "init", tmp_path / "shape", *overrides, nproc=1)
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.to_container(OmegaConf.load(tmp_path / "shape" / "model.yaml"), resolve=True)
    hf_cfg = {**adapter.hf_config(model_cfg, 512, {}), "dtype": "float32"}
    if family == "nemotron_h":
        hf_cfg["time_step_min"] = 1e-3   # nemotron_h's dt init needs it > 0 (see test_nemotron_h)
    config = AutoConfig.for_model(**hf_cfg)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "hf")
    if family == "nemotron_h":   # as our export writes it: megatron never clamps dt
        cfg_json = json.loads((tmp_path / "hf" / "config.json").read_text())
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg_json, "time_step_min": 0.0}))
    original = tensors(tmp_path / "hf")

    convert("import", tmp_path / "hf", tmp_path / "imported")
    ckpt = tmp_path / "imported" / "checkpoint"
    convert("export", ckpt, tmp_path / "again")
    again = tensors(tmp_path / "again")
    assert sorted(again) == sorted(original)
    for name, t in original.items():
        assert again[name].dtype == t.dtype and torch.equal(again[name], t), name

    # the imported checkpoint under tensor parallelism: loaded by 2 ranks, saved, exported: unchanged
    torchrun(WORKER, ckpt, tmp_path / "tp2", f"model_yaml={tmp_path / 'imported' / 'model' / 'imported.yaml'}",
             "parallel=tp2", nproc=2)
    convert("export", tmp_path / "tp2" / "iter_0000000", tmp_path / "from_tp2", "--model-config",
            tmp_path / "tp2" / "model.yaml")
    from_tp2 = tensors(tmp_path / "from_tp2")
    for name, t in original.items():
        assert torch.equal(from_tp2[name], t), name


SHIPPED = {"turbolaser_hunyuan": ["model=tiny_large", "model.moe_routing_mode=dropless",
                                  "model.moe_expert_capacity_factor=null"],
           "turbolaser_hybrid": ["model=tiny_turbos", "model.moe_routing_mode=dropless",
                                 "model.moe_expert_capacity_factor=null"]}


@pytest.mark.parametrize("model_type", list(SHIPPED))
def test_shipped_presets_export_as_remote_code_and_round_trip(model_type, tmp_path, torchrun):
    """The shipped tiny presets (CLA + top-1; TurboS attention + SwiGLU MoE) are refused by the public
    formats; --format remote ships our own model class, which computes our logits, and an import of
    that folder exports the same tensors again."""
    from transformers import AutoModelForCausalLM

    torchrun(WORKER, "init", tmp_path / "ours", *SHIPPED[model_type], nproc=1)
    ckpt, yaml = tmp_path / "ours" / "iter_0000000", tmp_path / "ours" / "model.yaml"
    refused = subprocess.run([sys.executable, "-m", "megatron_ext.hf.convert", "export", str(ckpt),
                              str(tmp_path / "std"), "--model-config", str(yaml)], capture_output=True, text=True)
    assert refused.returncode == 2 and "--format remote" in refused.stderr
    convert("export", ckpt, tmp_path / "hf", "--model-config", yaml, "--format", "remote")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == model_type and (tmp_path / "hf" / f"modeling_{model_type}.py").exists()
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = torch.load(tmp_path / "ours" / "logits.pt")
    with torch.no_grad():
        theirs = model.eval()(ours["tokens"]).logits
    assert (theirs - ours["logits"]).abs().max() < 1e-4

    convert("import", tmp_path / "hf", tmp_path / "imported")
    convert("export", tmp_path / "imported" / "checkpoint", tmp_path / "again", "--format", "remote")
    original, again = tensors(tmp_path / "hf"), tensors(tmp_path / "again")
    assert sorted(original) == sorted(again)
    assert all(torch.equal(original[k], again[k]) for k in original)
