"""Export our checkpoints to Hugging Face folders and import them back.

    python -m megatron_ext.hf.convert export <checkpoint> <out_dir> [--max-shard-size 2GB] [--dtype bfloat16]
                                             [--format standard|remote]
    python -m megatron_ext.hf.convert import <hf_dir> <out_dir>

Export reads any layout's checkpoint a layer at a time (:mod:`checkpoint_layers`) and writes
safetensors shards as it goes, so peak memory is about one shard plus one layer. The target format
follows the model family (``hunyuan_moe`` -> ``hunyuan_v1_moe``, ``turbos_hybrid`` -> ``nemotron_h``);
the family's adapter refuses, before anything is written, a model the format cannot represent; such
a model exports with ``--format remote`` (:mod:`remote_code`: our own model class in the folder).

Import converts the HF tensors a layer at a time and writes each layer as it goes
(:class:`checkpoint_layers.LayerWriter`), so its peak memory is also about one layer: an ordinary
checkpoint, which loads under any layout (``stages.<name>.init_from=...``), plus ``model/<name>.yaml``
(use with ``--config-dir <out_dir> model=<name>``) and the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

import torch
from omegaconf import OmegaConf

from megatron_ext.errors import ConfigError, ExportRefused
from megatron_ext.hf.checkpoint_layers import LayerReader, LayerWriter, single_process
from megatron_ext.hf.remote_code import FORMATS as REMOTE
from megatron_ext.hf.remote_code import RemoteFormat
from megatron_ext.hf.safetensors_shards import SafetensorsFolder, ShardWriter, parse_size

MODEL_CONFIG_FILE = "turbolaser_model.yaml"   # written into imported checkpoints
TOKENIZER_FILES = ("tokenizer.json",)


FORMATS = ("standard", "remote")


def adapter_for_family(family: str, fmt: str = "standard") -> ModuleType | RemoteFormat:
    """``standard``: the public ``transformers`` architecture; ``remote``: our own model class."""
    from megatron_ext.hf import hunyuan_v1_moe, nemotron_h

    adapters = {"hunyuan_moe": hunyuan_v1_moe, "turbos_hybrid": nemotron_h} if fmt == "standard" else REMOTE
    if family not in adapters:
        raise ConfigError(f"model.family={family!r} has no Hugging Face format; exportable: {sorted(adapters)}")
    return adapters[family]


def adapter_for_model_type(model_type: str) -> ModuleType | RemoteFormat:
    from megatron_ext.hf import hunyuan_v1_moe, nemotron_h

    adapters = {a.MODEL_TYPE: a for a in (hunyuan_v1_moe, nemotron_h, *REMOTE.values())}
    if model_type not in adapters:
        raise ConfigError(f"config.json model_type={model_type!r} cannot be imported; supported: {sorted(adapters)}")
    return adapters[model_type]


# ---- where a checkpoint's model config and tokenizer live -------------------------------------------

def checkpoint_model_config(checkpoint: Path) -> dict:
    """The model config a checkpoint was trained with: its stage's (``<stage>/config.yaml``, with the
    stage's model overrides) or, for an imported one, the ``turbolaser_model.yaml`` inside it."""
    from megatron_ext.stage import stage_model_config

    if (checkpoint / MODEL_CONFIG_FILE).exists():
        return OmegaConf.to_container(OmegaConf.load(checkpoint / MODEL_CONFIG_FILE), resolve=True)
    stage_cfg = checkpoint.parent.parent / "config.yaml"
    if stage_cfg.exists():
        run = OmegaConf.load(stage_cfg)
        return OmegaConf.to_container(stage_model_config(run.config, run.stage_name), resolve=True)
    raise ConfigError(f"cannot tell which model {checkpoint} holds: expected a stage checkpoint "
                      f"(<stage>/checkpoints/iter_N next to <stage>/config.yaml) or an imported one "
                      f"({MODEL_CONFIG_FILE} inside); pass --model-config <model yaml>")


def checkpoint_tokenizer_dir(checkpoint: Path) -> Path | None:
    for candidate in (checkpoint / "tokenizer", checkpoint.parent.parent.parent / "data" / "tokenizer"):
        if (candidate / "tokenizer.json").exists():
            return candidate
    return None


def special_token_ids(tokenizer_dir: Path | None) -> dict[str, int | None]:
    """bos / eos / pad ids for config.json (our tokenizers have no BOS: documents end with EOD)."""
    if tokenizer_dir is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    from data_pipelines import special_tokens
    from data_pipelines.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    return {"bos_token_id": None, "eos_token_id": tok.special_id(special_tokens.EOD),
            "pad_token_id": tok.special_id(special_tokens.PAD),
            "end_of_turn_id": tok.special_id(special_tokens.END_OF_TURN)}


def _write_tokenizer(tokenizer_dir: Path | None, out: Path, max_length: int) -> None:
    if tokenizer_dir is None:
        return
    from data_pipelines import special_tokens

    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": special_tokens.EOD,
        "pad_token": special_tokens.PAD, "model_max_length": max_length,
        "clean_up_tokenization_spaces": False}, indent=2) + "\n")


# ---- export ------------------------------------------------------------------------------------------

def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, max_shard_size: str | int = "2GB",
                      dtype: torch.dtype | None = None, model_cfg: Mapping[str, Any] | None = None,
                      fmt: str = "standard") -> Path:
    """Write ``out_dir`` as a Hugging Face folder of ``checkpoint`` (any layout); returns ``out_dir``.
    ``fmt="remote"`` writes our own model class beside the weights (``trust_remote_code=True``)."""
    checkpoint, out = Path(checkpoint), Path(out_dir)
    if not (checkpoint / "metadata.json").exists():
        raise ConfigError(f"{checkpoint} is not a dist_checkpointing checkpoint (no metadata.json): pass an "
                          f"iter_* folder, e.g. runs/demo/04_sft/checkpoints/iter_0000240")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty: choose a new output folder (nothing is overwritten)")
    model_cfg = dict(model_cfg or checkpoint_model_config(checkpoint))
    adapter = adapter_for_family(model_cfg["family"], fmt)
    try:
        adapter.check_exportable(model_cfg)
    except ExportRefused as err:
        raise ExportRefused(f"{err} Or export with --format remote: our own model class, shipped with the "
                            f"weights and loaded with trust_remote_code=True, computes exactly our model") from None
    tokenizer_dir = checkpoint_tokenizer_dir(checkpoint)
    specials = special_token_ids(tokenizer_dir)
    out.mkdir(parents=True, exist_ok=True)
    with single_process():
        reader = LayerReader(checkpoint, model_cfg)
        outer = reader.read_outer()
        dtype = dtype or next(iter(outer.values())).dtype   # as stored, unless asked to cast
        writer = ShardWriter(out, parse_size(max_shard_size))
        writer.add({k: v.to(dtype) for k, v in adapter.outer_to_hf(outer, model_cfg).items()})
        del outer
        for layer in range(reader.num_layers):
            hf = adapter.layer_to_hf(layer, reader.read_layer(layer), model_cfg)
            writer.add({k: v.to(dtype) for k, v in hf.items()})
        writer.close()
        vocab = reader.vocab_size
    hf_cfg = adapter.hf_config(model_cfg, vocab, {k: v for k, v in specials.items()
                                                  if k != "end_of_turn_id" and v is not None})
    hf_cfg["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    stops = [i for i in (specials["eos_token_id"], specials.get("end_of_turn_id")) if i is not None]
    (out / "generation_config.json").write_text(json.dumps({
        "eos_token_id": stops or None, "pad_token_id": specials["pad_token_id"],
        "bos_token_id": specials["bos_token_id"]}, indent=2) + "\n")
    _write_tokenizer(tokenizer_dir, out, int(model_cfg.get("seq_length", 2048)))
    if isinstance(adapter, RemoteFormat):
        adapter.write_code(out)
    return out


# ---- import ------------------------------------------------------------------------------------------

def import_checkpoint(hf_dir: str | Path, out_dir: str | Path, name: str = "imported") -> Path:
    """Write ``out_dir/checkpoint`` (an ordinary checkpoint), ``out_dir/model/<name>.yaml`` and the
    tokenizer from the Hugging Face folder ``hf_dir``; returns the checkpoint folder."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if not (hf_dir / "config.json").exists():
        raise ConfigError(f"{hf_dir} has no config.json: pass a Hugging Face model folder")
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    adapter = adapter_for_model_type(hf_cfg.get("model_type"))
    model_cfg = adapter.model_config(hf_cfg)
    tensors = SafetensorsFolder(hf_dir)
    ckpt = out / "checkpoint"
    with single_process():
        writer = LayerWriter(ckpt, model_cfg, int(hf_cfg["vocab_size"]))
        for layer in range(int(model_cfg["num_layers"])):
            got = tensors.get(adapter.hf_layer_keys(layer, model_cfg))
            writer.write_layer(layer, adapter.layer_from_hf(layer, got, model_cfg))
        outer = tensors.get(adapter.hf_outer_keys(model_cfg))
        writer.write_outer(adapter.outer_from_hf(outer, model_cfg), progress={"imported_from": str(hf_dir)})
        writer.finish()
    OmegaConf.save(OmegaConf.create(model_cfg), ckpt / MODEL_CONFIG_FILE)
    (out / "model").mkdir(exist_ok=True)
    OmegaConf.save(OmegaConf.create(model_cfg), out / "model" / f"{name}.yaml")
    if (hf_dir / "tokenizer.json").exists():
        (ckpt / "tokenizer").mkdir(exist_ok=True)
        shutil.copy(hf_dir / "tokenizer.json", ckpt / "tokenizer" / "tokenizer.json")
    return ckpt


def main(argv: list[str]) -> int:
    from megatron_ext.quiet import quiet_known_warnings

    quiet_known_warnings()
    parser = argparse.ArgumentParser(prog="python -m megatron_ext.hf.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="our checkpoint (any layout) -> Hugging Face folder")
    exp.add_argument("checkpoint", type=Path)
    exp.add_argument("out_dir", type=Path)
    exp.add_argument("--max-shard-size", default="2GB")
    exp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="cast on the way out (default: as stored)")
    exp.add_argument("--model-config", type=Path, default=None, help="model yaml, when the checkpoint has none")
    exp.add_argument("--format", choices=FORMATS, default="standard",
                     help="standard: transformers' own architecture (refuses what it computes differently); "
                          "remote: our model class shipped in the folder (trust_remote_code=True)")
    imp = sub.add_parser("import", help="Hugging Face folder -> our checkpoint (loads under any layout)")
    imp.add_argument("hf_dir", type=Path)
    imp.add_argument("out_dir", type=Path)
    imp.add_argument("--name", default="imported", help="name of the model preset written to out_dir/model/")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            cfg = OmegaConf.to_container(OmegaConf.load(args.model_config), resolve=True) if args.model_config else None
            out = export_checkpoint(args.checkpoint, args.out_dir, args.max_shard_size,
                                    getattr(torch, args.dtype) if args.dtype else None, cfg, args.format)
            print(f"exported {args.checkpoint} to {out}")
        else:
            ckpt = import_checkpoint(args.hf_dir, args.out_dir, args.name)
            print(f"imported {args.hf_dir} to {ckpt}; start a stage from it with stages.<name>.init_from={ckpt} "
                  f"--config-dir {args.out_dir} model={args.name}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
