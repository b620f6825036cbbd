"""Hunyuan MoE <-> transformers ``hunyuan_v1_moe``: parity of logits and greedy generation through a
real ``from_pretrained`` folder, exact round trips both ways, and the refusals."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from megatron_ext.errors import ExportRefused
from megatron_ext.hf import hunyuan_v1_moe as adapter

WORKER = Path(__file__).with_name("hunyuan_worker.py")
PRESETS = Path(__file__).resolve().parents[3] / "launch" / "conf" / "model"
# tiny_large made exportable: no CLA, top-2 routing (top-1 weights are not representable), dropless
EXPORTABLE = {"cla_share_factor": 1, "moe_router_topk": 2, "moe_routing_mode": "dropless",
              "moe_expert_capacity_factor": None}
OVERRIDES = ["model=tiny_large", "model.moe_routing_mode=dropless", "model.moe_expert_capacity_factor=null",
             "model.cla_share_factor=1", "model.moe_router_topk=2"]
SPECIAL = {"bos": 1, "eos": 2, "pad": 0}


def preset(name: str, **changes) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(PRESETS / f"{name}.yaml"))
    cfg.update(changes)
    return cfg


def layer_params(state: dict, layer: int) -> dict:
    prefix = f"decoder.layers.{layer}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def to_hf(state: dict, cfg: dict) -> dict:
    out = adapter.outer_to_hf({k: v for k, v in state.items() if not k.startswith("decoder.layers.")}, cfg)
    for layer in range(cfg["num_layers"]):
        out.update(adapter.layer_to_hf(layer, layer_params(state, layer), cfg))
    return out


def from_hf(tensors: dict, cfg: dict) -> dict:
    out = adapter.outer_from_hf({k: tensors[k] for k in adapter.hf_outer_keys(cfg)}, cfg)
    for layer in range(cfg["num_layers"]):
        part = adapter.layer_from_hf(layer, {k: tensors[k] for k in adapter.hf_layer_keys(layer, cfg)}, cfg)
        out.update({f"decoder.layers.{layer}.{k}": v for k, v in part.items()})
    return out


def write_folder(folder: Path, state: dict, cfg: dict, vocab: int) -> None:
    """What an exporter writes: config.json and one safetensors shard per layer plus one outer shard."""
    adapter.check_exportable(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**adapter.hf_config(cfg, vocab, SPECIAL), "dtype": "float32"}))
    shards = {"model-outer.safetensors": adapter.outer_to_hf(
        {k: v for k, v in state.items() if not k.startswith("decoder.layers.")}, cfg)}
    for layer in range(cfg["num_layers"]):
        shards[f"model-layer{layer}.safetensors"] = adapter.layer_to_hf(layer, layer_params(state, layer), cfg)
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def ours(tmp_path_factory, torchrun_module):
    out = tmp_path_factory.mktemp("hunyuan_hf") / "ours.pt"
    torchrun_module(WORKER, out, *OVERRIDES, nproc=1)
    return torch.load(out)


@pytest.fixture(scope="module")
def exported(ours, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("hunyuan_hf") / "export"
    write_folder(folder, ours["state_dict"], ours["model_cfg"], ours["padded_vocab"])
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.dtype == torch.float32
    return model.eval()


def test_logits_match(ours, exported):
    with torch.no_grad():
        logits = exported(ours["tokens"]).logits
    assert logits.shape == ours["logits"].shape
    diff = (logits - ours["logits"]).abs().max().item()
    print(f"max |logits diff| = {diff:.3e}")
    assert diff < 1e-4


def test_greedy_generation_matches(ours, exported):
    exported.generation_config.eos_token_id = None  # ours ran to max_new_tokens, no stop token
    # Our Generator never picks padded vocab ids; HF sees the padded vocab, so suppress them.
    pad_ids = list(range(ours["vocab"], ours["padded_vocab"]))
    for prompt, want in zip(ours["prompts"], ours["generated"]):
        out = exported.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=len(want),
                                suppress_tokens=pad_ids, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == want


def test_our_weights_round_trip(ours):
    cfg, state = ours["model_cfg"], ours["state_dict"]
    back = from_hf(to_hf(state, cfg), cfg)
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_transformers_weights_round_trip(ours, tmp_path):
    """A transformers-initialised model's checkpoint -> ours -> checkpoint, byte for byte."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = ours["model_cfg"]
    hf_cfg = {**adapter.hf_config(cfg, ours["padded_vocab"], SPECIAL), "dtype": "float32"}
    config = AutoConfig.for_model(**hf_cfg)
    model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path)
    files = sorted(tmp_path.glob("*.safetensors"))
    tensors = {k: v for f in files for k, v in load_file(f).items()}
    # the checkpoint keys: per-expert gate/up/down (transformers fuses them only in memory)
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in tensors
    ours_state = from_hf(tensors, cfg)
    assert ours_state.keys() == ours["state_dict"].keys()
    for k, v in ours_state.items():
        assert v.shape == ours["state_dict"][k].shape, k
    back = to_hf(ours_state, cfg)
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # the fused in-memory experts are [gate; up] of the checkpoint's per-expert tensors
    fused = model.model.layers[1].mlp.experts.gate_up_proj[2]
    assert torch.equal(fused, ours_state["decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight"])


REFUSALS = {
    "cla": ({}, "cross-layer attention"),
    "shared_width": ({**EXPORTABLE, "moe_shared_expert_intermediate_size": 256}, "shared-expert width"),
    "no_shared_expert": ({**EXPORTABLE, "moe_shared_expert_intermediate_size": None}, "no shared expert"),
    "qk_norm_before_rope": ({**EXPORTABLE, "qk_norm_after_rope": False}, "QK-norm before RoPE"),
    "no_qk_norm": ({**EXPORTABLE, "qk_layernorm": False}, "QK-norm off"),
    "top1": ({**EXPORTABLE, "moe_router_topk": 1}, "softmax-before-top-k"),
    "pre_softmax": ({**EXPORTABLE, "moe_router_pre_softmax": True}, "softmax-before-top-k"),
    "sigmoid": ({**EXPORTABLE, "moe_router_score_function": "sigmoid"}, "score function"),
    "expert_bias": ({**EXPORTABLE, "moe_router_enable_expert_bias": True}, "expert bias"),
    "group_limited": ({**EXPORTABLE, "moe_router_num_groups": 2, "moe_router_group_topk": 1}, "group-limited"),
    "topk_scaling": ({**EXPORTABLE, "moe_router_topk_scaling_factor": 2.5}, "routing weight scale"),
    "shared_gate": ({**EXPORTABLE, "moe_shared_expert_gate": True}, "gated shared expert"),
    "dense_mixed": ({**EXPORTABLE, "moe_layer_freq": [0, 1, 1, 1]}, "dense layers mixed"),
    "dense": ({**EXPORTABLE, "num_moe_experts": None}, "dense model"),
    "qkv_bias": ({**EXPORTABLE, "add_qkv_bias": True}, "QKV biases"),
    "layernorm": ({**EXPORTABLE, "normalization": "LayerNorm"}, "normalization"),
    "partial_rope": ({**EXPORTABLE, "rotary_percent": 0.5}, "partial RoPE"),
    "unknown_setting": ({**EXPORTABLE, "apply_residual_connection_post_layernorm": True},
                        "apply_residual_connection_post_layernorm"),
    "family": ({**EXPORTABLE, "family": "turbos_hybrid"}, "family"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals(case):
    changes, feature = REFUSALS[case]
    with pytest.raises(ExportRefused, match=feature.replace("(", r"\(")):
        adapter.check_exportable(preset("tiny_large", **changes))
    with pytest.raises(ExportRefused):  # hf_config refuses the same
        adapter.hf_config(preset("tiny_large", **changes), 512, SPECIAL)


def test_presets_and_routing_modes():
    with pytest.raises(ExportRefused, match="cross-layer attention"):
        adapter.check_exportable(preset("hunyuan_large"))
    with pytest.raises(ExportRefused, match="softmax-before-top-k"):  # hunyuan_large routes top-1
        adapter.check_exportable(preset("hunyuan_large", cla_share_factor=1))
    # capacity routing is allowed: the export computes our dropless routing (generation's)
    adapter.check_exportable(preset("tiny_large", cla_share_factor=1, moe_router_topk=2))


def test_model_config_inverts_hf_config():
    from megatron_ext import model_builder

    cfg = preset("tiny_large", **EXPORTABLE, layernorm_epsilon=1e-6, rotary_base=50000, kv_channels=32)
    hf_cfg = adapter.hf_config(cfg, 512, SPECIAL)
    back = adapter.model_config(hf_cfg)
    for key in ("family", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
                "moe_shared_expert_intermediate_size", "qk_layernorm", "qk_norm_after_rope",
                "cla_share_factor", "normalization", "layernorm_epsilon", "rotary_base", "seq_length",
                "moe_routing_mode", "moe_expert_capacity_factor"):
        assert back[key] == cfg[key], key
    adapter.check_exportable(back)
    assert adapter.hf_config(back, 512, SPECIAL) == hf_cfg
    single = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "expert_model_parallel_size": 1}
    model_builder.transformer_config(back, single)  # our builder takes it


@pytest.mark.parametrize("change, what", [
    ({"moe_topk": 1}, "moe_topk=1"),
    ({"moe_topk": [2, 2, 4, 2]}, "per-layer"),
    ({"rope_parameters": {"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 1e4}}, "rope"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "qwen2_moe"}, "model_type"),
])
def test_model_config_refusals(change, what):
    hf_cfg = {**adapter.hf_config(preset("tiny_large", **EXPORTABLE), 512, SPECIAL), **change}
    with pytest.raises(ExportRefused, match=what):
        adapter.model_config(hf_cfg)
