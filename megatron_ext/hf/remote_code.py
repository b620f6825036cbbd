"""Export to our own ``transformers`` model classes, shipped with the checkpoint (``trust_remote_code``).

For models the public formats compute differently (the adapters ``hunyuan_v1_moe`` / ``nemotron_h``
refuse them: CLA, top-1 probability-weighted routing, TurboS's RoPE + QK-norm attention and SwiGLU
MoE layers), the export writes our parameters under their own names and copies a self-contained
model class (``remote/<model_type>/``, torch + transformers only) into the folder; ``config.json``'s
``auto_map`` points ``AutoModelForCausalLM`` at it and carries our model config. Nothing is converted,
so nothing can be lost: the classes are tested against our model's logits and greedy tokens.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from torch import Tensor

from megatron_ext.errors import ConfigError

REMOTE_DIR = Path(__file__).resolve().parent / "remote"


@dataclass(frozen=True)
class RemoteFormat:
    """One of our model families as a remote-code model type (the adapter interface of convert.py)."""

    family: str
    MODEL_TYPE: str
    class_prefix: str

    def check_exportable(self, model_cfg: Mapping) -> None:
        if model_cfg.get("family") != self.family:
            raise ConfigError(f"model.family={model_cfg.get('family')!r}: {self.MODEL_TYPE} holds {self.family}")

    def hf_config(self, model_cfg: Mapping, vocab_size: int, special_tokens: Mapping[str, int]) -> dict:
        module = self.MODEL_TYPE
        cfg = {
            "model_type": module,
            "architectures": [f"{self.class_prefix}ForCausalLM"],
            "auto_map": {"AutoConfig": f"configuration_{module}.{self.class_prefix}Config",
                         "AutoModelForCausalLM": f"modeling_{module}.{self.class_prefix}ForCausalLM"},
            "vocab_size": int(vocab_size),
            "turbolaser_model": dict(model_cfg),
            "tie_word_embeddings": False,
            **{k if k.endswith("_token_id") else f"{k}_token_id": v for k, v in special_tokens.items()},
        }
        if self.family == "turbos_hybrid":
            from megatron_ext.models.turbos_layout import layer_pattern

            cfg["layer_pattern"] = layer_pattern(model_cfg)
        return cfg

    def model_config(self, hf_cfg: Mapping) -> dict:
        if not isinstance(hf_cfg.get("turbolaser_model"), dict):
            raise ConfigError(f"config.json of model_type {self.MODEL_TYPE} lacks its turbolaser_model section")
        return dict(hf_cfg["turbolaser_model"])

    def write_code(self, out: Path) -> None:
        for file in sorted((REMOTE_DIR / self.MODEL_TYPE).glob("*.py")):
            shutil.copy(file, out / file.name)

    # parameters keep their names: the layer prefix is all there is to add or strip
    def layer_to_hf(self, layer: int, params: Mapping[str, Tensor], model_cfg: Mapping) -> dict[str, Tensor]:
        return {f"decoder.layers.{layer}.{k}": v for k, v in params.items()}

    def layer_from_hf(self, layer: int, tensors: Mapping[str, Tensor], model_cfg: Mapping) -> dict[str, Tensor]:
        prefix = f"decoder.layers.{layer}."
        return {k[len(prefix):]: v for k, v in tensors.items()}

    def outer_to_hf(self, params: Mapping[str, Tensor], model_cfg: Mapping) -> dict[str, Tensor]:
        return dict(params)

    def outer_from_hf(self, tensors: Mapping[str, Tensor], model_cfg: Mapping) -> dict[str, Tensor]:
        return dict(tensors)

    def hf_layer_keys(self, layer: int, model_cfg: Mapping) -> list[str]:
        prefix = f"decoder.layers.{layer}."
        return [k for k in _parameter_names(_frozen(model_cfg)) if k.startswith(prefix)]

    def hf_outer_keys(self, model_cfg: Mapping) -> list[str]:
        return [k for k in _parameter_names(_frozen(model_cfg)) if not k.startswith("decoder.layers.")]


def _frozen(model_cfg: Mapping) -> str:
    import json

    return json.dumps(dict(model_cfg), sort_keys=True)


@functools.lru_cache(maxsize=4)
def _parameter_names(model_json: str) -> tuple[str, ...]:
    """Our single-process model's parameter names, spelt as checkpoints spell them (built on the meta
    device; needs the process group of ``checkpoint_layers.single_process``)."""
    import json

    from megatron_ext.hf.checkpoint_layers import build_single
    from megatron_ext.mcore_compat import canonical_name

    model = build_single(json.loads(model_json), 128)
    return tuple(canonical_name(k) for k in model.state_dict() if not k.endswith("_extra_state"))


FORMATS = {f.family: f for f in (RemoteFormat("hunyuan_moe", "turbolaser_hunyuan", "TurbolaserHunyuan"),
                                 RemoteFormat("turbos_hybrid", "turbolaser_hybrid", "TurbolaserHybrid"))}
