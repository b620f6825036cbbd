"""Export of the turbos_hybrid model to transformers' ``nemotron_h`` (megatron_ext.hf.nemotron_h).

One torchrun worker (``nemotron_h_worker.py``) builds a tiny hybrid that maps exactly (Mamba2 +
attention, no FFN layers, no RoPE, no QK-norm: see :data:`EXPORTABLE`) and records its weights, logits
and greedy generations; the test converts the weights, writes a HF folder, loads it with
``AutoModelForCausalLM`` (offline, CPU, fp32) and compares. The import direction runs a
transformers-initialised model through our builder.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_ext.errors import ExportRefused
from megatron_ext.hf import nemotron_h as nh

WORKER = __file__.replace("test_nemotron_h.py", "nemotron_h_worker.py")

# tiny_turbos without what nemotron_h cannot compute: its FFN (MoE) layers are SwiGLU (AMF -> AM,
# MF -> M: 6 layers "*MM*MM"), its attention has QK-norm and RoPE (no_rope_freq=1 skips RoPE everywhere).
EXPORTABLE = [
    "model=tiny_turbos", "model.moe_routing_mode=dropless", "model.moe_expert_capacity_factor=null",
    "model.hybrid_block_types={AMF:AM,MF:M}", "model.num_layers=6", "model.num_moe_experts=null",
    "model.moe_ffn_hidden_size=null", "model.moe_shared_expert_intermediate_size=null",
    "model.qk_layernorm=false", "+model.no_rope_freq=1",
]
VOCAB, PADDED = 100, 128
SPECIAL = {"bos": 1, "eos": 2}


def fixed_tokens() -> torch.Tensor:  # as nemotron_h_worker.fixed_tokens
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))


def to_hf(state: dict, cfg: dict) -> dict:
    out = {}
    for i in range(cfg["num_layers"]):
        prefix = f"decoder.layers.{i}."
        out.update(nh.layer_to_hf(i, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, cfg))
    out.update(nh.outer_to_hf({k: v for k, v in state.items() if not k.startswith("decoder.layers.")}, cfg))
    return out


def from_hf(tensors: dict, cfg: dict) -> dict:
    out = {}
    for i in range(cfg["num_layers"]):
        layer = nh.layer_from_hf(i, {k: tensors[k] for k in nh.hf_layer_keys(i, cfg)}, cfg)
        out.update({f"decoder.layers.{i}.{k}": v for k, v in layer.items()})
    out.update(nh.outer_from_hf({k: tensors[k] for k in nh.hf_outer_keys(cfg)}, cfg))
    return out


def write_folder(folder, tensors: dict, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, torchrun_module):
    root = tmp_path_factory.mktemp("nemotron_h")
    torchrun_module(WORKER, root / "ours", "reference", *EXPORTABLE, nproc=1)
    result = json.loads((root / "ours" / "result.json").read_text())
    assert (result["vocab_size"], result["padded_vocab_size"]) == (VOCAB, PADDED)
    return root, result, torch.load(root / "ours" / "state_dict.pt"), torch.load(root / "ours" / "logits.pt")


@pytest.fixture(scope="module")
def exported(reference):
    from transformers import AutoModelForCausalLM

    root, result, state, _ = reference
    cfg = result["model_cfg"]
    nh.check_exportable(cfg)
    folder = root / "hf"
    write_folder(folder, to_hf(state, cfg), nh.hf_config(cfg, PADDED, SPECIAL))
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def test_checkpoint_keys_are_what_transformers_loads(reference, exported):
    _, result, state, _ = reference
    cfg = result["model_cfg"]
    model, info = exported
    assert type(model).__name__ == "NemotronHForCausalLM"
    assert all(not v for v in info.values()), info  # no missing / unexpected / mismatched keys
    keys = [k for i in range(cfg["num_layers"]) for k in nh.hf_layer_keys(i, cfg)] + nh.hf_outer_keys(cfg)
    assert sorted(keys) == sorted(to_hf(state, cfg))
    assert model.config.vocab_size == PADDED and model.config.layers_block_type[:3] == [
        "full_attention", "linear_attention", "linear_attention"]
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, None)


def test_logits_match(reference, exported):
    _, _, _, logits = reference
    model, _ = exported
    with torch.no_grad():
        hf_logits = model(fixed_tokens()).logits
    diff = (hf_logits - logits).abs().max().item()
    print(f"max |logits diff| = {diff:.3g}")
    assert hf_logits.shape == logits.shape == (2, 16, PADDED)
    assert diff < 2e-6  # measured 2.6e-7; keeping nemotron_h's dt clamp (time_step_min=0.001) gives 8.6e-6


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_matches(reference, exported, use_cache):
    _, result, _, _ = reference
    model, _ = exported
    assert result["greedy_cached"] == result["greedy_uncached"]
    for prompt, ours in zip(result["prompts"], result["greedy_cached"]):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=len(ours), do_sample=False,
                             use_cache=use_cache, suppress_tokens=list(range(VOCAB, PADDED)))
        assert out[0, len(prompt):].tolist() == ours


def test_transformers_checkpoint_round_trips_bit_exactly(reference, tmp_path):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    _, result, state, _ = reference
    cfg = result["model_cfg"]
    hf_cfg = nh.hf_config(cfg, PADDED, SPECIAL)
    torch.manual_seed(0)
    # transformers' own init draws dt_bias from [time_step_min, time_step_max]: needs time_step_min > 0.
    NemotronHForCausalLM(NemotronHConfig(**{**hf_cfg, "time_step_min": 0.001})).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    ours = from_hf(tensors, cfg)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in state.items()}
    back = to_hf(ours, cfg)
    assert sorted(back) == sorted(tensors)
    for key, tensor in tensors.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def test_imported_transformers_model_computes_the_same_in_our_builder(reference, torchrun, tmp_path):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    _, result, _, _ = reference
    hf_cfg = nh.hf_config(result["model_cfg"], PADDED, SPECIAL)
    torch.manual_seed(1)
    model = NemotronHForCausalLM(NemotronHConfig(**{**hf_cfg, "time_step_min": 0.001})).eval()
    model.config.time_step_min = 0.0  # the exported value: no dt clamp (init above needed a positive one)
    for layer in model.model.layers:
        if layer.block_type == "linear_attention":
            layer.mixer.time_step_limit = (0.0, math.inf)
    with torch.no_grad():
        hf_logits = model(fixed_tokens()).logits
    model.save_pretrained(tmp_path / "hf")
    hf_saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    ours_cfg = nh.model_config(hf_saved)
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    torch.save(from_hf(tensors, ours_cfg), tmp_path / "state.pt")
    (tmp_path / "model_cfg.json").write_text(json.dumps(ours_cfg))
    torchrun(WORKER, tmp_path, "import", tmp_path / "model_cfg.json", tmp_path / "state.pt", nproc=1)
    diff = (torch.load(tmp_path / "logits.pt") - hf_logits).abs().max().item()
    print(f"import: max |logits diff| = {diff:.3g}")
    assert diff < 2e-6


def test_model_config_inverts_hf_config(reference):
    _, result, _, _ = reference
    cfg = result["model_cfg"]
    hf_cfg = nh.hf_config(cfg, PADDED, SPECIAL)
    ours = nh.model_config(hf_cfg)
    assert ours["hybrid_blocks"] == "A M*2 A M*2"
    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "qk_layernorm",
                "normalization", "mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim",
                "mamba_chunk_size", "init_method_std", "seq_length"):
        assert ours[key] == cfg[key], key
    assert ours["vocab_size"] == PADDED and ours["no_rope_freq"] == 1
    assert nh.hf_config(ours, PADDED, SPECIAL) == hf_cfg  # a fixed point: nothing lost either way


def _preset(name: str) -> dict:
    from launch.config import load_config
    from omegaconf import OmegaConf

    return OmegaConf.to_container(load_config([f"model={name}"]).model, resolve=True)


@pytest.mark.parametrize("preset", ["tiny_turbos", "hunyuan_turbos"])
def test_shipped_presets_are_refused_for_their_swiglu_ffns(preset):
    with pytest.raises(ExportRefused, match="FFN layers"):
        nh.check_exportable(_preset(preset))


@pytest.mark.parametrize("change,feature", [
    ({"qk_layernorm": True}, "qk_layernorm"),
    ({"no_rope_freq": None}, "RoPE"),
    ({"no_rope_freq": [0, 1, 1, 1, 1, 1]}, "RoPE in attention layers \\[0\\]"),
    ({"layernorm_epsilon": 1e-6}, "layernorm_epsilon"),
    ({"normalization": "LayerNorm"}, "normalization"),
    ({"add_qkv_bias": True}, "add_qkv_bias"),
    ({"softmax_scale": 0.5}, "softmax_scale"),
    ({"hybrid_block_types": {"AMF": "AMF", "MF": "MF"}, "num_layers": 10}, "FFN layers"),
    ({"family": "hunyuan_moe"}, "family"),
])
def test_refusals_name_the_feature(reference, change, feature):
    cfg = {**reference[1]["model_cfg"], **change}
    with pytest.raises(ExportRefused, match=feature):
        nh.check_exportable(cfg)


@pytest.mark.parametrize("change,feature", [
    ({"layers_block_type": ["full_attention", "moe"]}, "FFN layers"),
    ({"time_step_min": 0.001}, "time_step_min"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"vocab_size": 100}, "vocab_size"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
])
def test_import_refusals_name_the_feature(reference, change, feature):
    hf_cfg = {**nh.hf_config(reference[1]["model_cfg"], PADDED, SPECIAL), **change}
    with pytest.raises(ExportRefused, match=feature):
        nh.model_config(hf_cfg)
