"""The ``trust_remote_code`` package for the turbos_hybrid family (megatron_ext/hf/remote/turbolaser_hybrid).

One torchrun worker (``hunyuan_worker.py``, generic over model presets) builds the shipped ``tiny_turbos``
hybrid (Mamba2 + attention with QK-norm and RoPE + top-2 MoE with a shared expert; dropless routing) with
randomised norm weights and records its state dict, logits and greedy generations. The test writes a HF
folder (config.json, the state dict as it is, the two remote-code files), loads it with
``AutoModelForCausalLM.from_pretrained(trust_remote_code=True)`` offline and compares.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megatron_ext.models.turbos_layout import layer_pattern

WORKER = Path(__file__).with_name("hunyuan_worker.py")
REMOTE = Path(__file__).resolve().parents[3] / "megatron_ext" / "hf" / "remote" / "turbolaser_hybrid"
OVERRIDES = ["model=tiny_turbos", "model.moe_routing_mode=dropless", "model.moe_expert_capacity_factor=null"]
CASES = {
    "tiny_turbos": (OVERRIDES, "*EMEME*EMEME"),
    # top-1 routing: model_builder forces pre-softmax (not in the model config the exporter writes)
    "top1": ([*OVERRIDES, "model.moe_router_topk=1"], "*EMEME*EMEME"),
    # dense SwiGLU FFNs ('-'), RoPE skipped in the second attention layer (layer index 6), no QK-norm
    "dense_norope": ([*OVERRIDES, "model.num_moe_experts=null", "model.moe_ffn_hidden_size=null",
                      "model.moe_shared_expert_intermediate_size=null", "model.qk_layernorm=false",
                      "+model.no_rope_freq=[0,0,0,0,0,0,1,0,0,0,0,0]"], "*-M-M-*-M-M-"),
}
SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def hf_config(model_cfg: dict, padded_vocab: int) -> dict:
    """What the exporter writes into config.json."""
    return {
        "model_type": "turbolaser_hybrid",
        "architectures": ["TurbolaserHybridForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_turbolaser_hybrid.TurbolaserHybridConfig",
            "AutoModelForCausalLM": "modeling_turbolaser_hybrid.TurbolaserHybridForCausalLM",
        },
        "vocab_size": padded_vocab,
        "turbolaser_model": model_cfg,
        "layer_pattern": layer_pattern(model_cfg),
        **SPECIAL,
        "dtype": "float32",
    }


def write_folder(folder: Path, state: dict, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("configuration_turbolaser_hybrid.py", "modeling_turbolaser_hybrid.py"):
        shutil.copy(REMOTE / name, folder / name)


@pytest.fixture(scope="module", params=list(CASES))
def ours(request, tmp_path_factory, torchrun_module):
    out = tmp_path_factory.mktemp("remote_hybrid") / "ours.pt"
    torchrun_module(WORKER, out, *CASES[request.param][0], nproc=1)
    return {**torch.load(out), "case": request.param}


@pytest.fixture(scope="module")
def loaded(ours, tmp_path_factory, monkeypatch_module):
    from transformers import AutoModelForCausalLM

    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("TRANSFORMERS_OFFLINE", "1")
    folder = tmp_path_factory.mktemp("remote_hybrid_hf") / "hf"
    write_folder(folder, ours["state_dict"], hf_config(ours["model_cfg"], ours["padded_vocab"]))
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                       output_loading_info=True)
    return model.eval(), info


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_layer_pattern_and_names(ours, loaded):
    model, info = loaded
    assert model.config.layer_pattern == CASES[ours["case"]][1]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert set(dict(model.named_parameters())) == set(ours["state_dict"])
    for name, param in model.state_dict().items():
        assert torch.equal(param, ours["state_dict"][name]), name


def test_logits_match(ours, loaded):
    model, _ = loaded
    with torch.no_grad():
        logits = model(ours["tokens"]).logits
    diff = (logits - ours["logits"]).abs().max().item()
    print(f"{ours['case']}: max |logits diff| = {diff:.3e}")
    assert diff < 1e-4


def test_greedy_generation_matches(ours, loaded):
    model, _ = loaded
    suppress = list(range(ours["vocab"], ours["padded_vocab"]))
    for prompt, expected in zip(ours["prompts"], ours["generated"]):
        ids = torch.tensor([prompt])
        for use_cache in (False, True):  # no cache either way: each step recomputes the sequence
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(expected),
                                 min_new_tokens=len(expected), do_sample=False, suppress_tokens=suppress,
                                 eos_token_id=None, pad_token_id=0, use_cache=use_cache)
            assert out[0, len(prompt):].tolist() == expected


def test_has_teeth(ours, loaded):
    """Swapping B and C in the scan, or dropping QK-norm / RoPE, moves the logits far beyond tolerance."""
    model, _ = loaded
    mixer_cls = type(model.decoder.layers[2].mixer)
    attn = model.decoder.layers[0].self_attention

    def logits_diff():
        with torch.no_grad():
            return (model(ours["tokens"]).logits - ours["logits"]).abs().max().item()

    original_scan = mixer_cls.scan
    try:
        mixer_cls.scan = lambda self, x, dt, A, B, C: original_scan(self, x, dt, A, C, B)
        assert logits_diff() > 1e-3
    finally:
        mixer_cls.scan = original_scan
    if attn.rope:
        attn.rope = False
        try:
            assert logits_diff() > 1e-3
        finally:
            attn.rope = True
    assert logits_diff() < 1e-4
