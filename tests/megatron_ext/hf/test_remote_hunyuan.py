"""Our Hunyuan MoE model -> the ``trust_remote_code`` ``turbolaser_hunyuan`` transformers model: parity of
logits and greedy generation through a real ``from_pretrained`` folder, for what the standard
``hunyuan_v1_moe`` format cannot represent (CLA, top-1 pre-softmax routing) and for top-2 routing."""

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

WORKER = Path(__file__).with_name("hunyuan_worker.py")
REMOTE = Path(__file__).resolve().parents[3] / "megatron_ext" / "hf" / "remote" / "turbolaser_hunyuan"
DROPLESS = ["model=tiny_large", "model.moe_routing_mode=dropless", "model.moe_expert_capacity_factor=null"]
CASES = {
    "cla2_top1": DROPLESS,                                                  # the shipped preset
    "cla1_top2": [*DROPLESS, "model.moe_router_topk=2", "model.cla_share_factor=1"],
}
SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def write_folder(folder: Path, ours: dict) -> None:
    """What an exporter writes: config.json, the state dict as is, and the two model code files."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "turbolaser_hunyuan",
        "architectures": ["TurbolaserHunyuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_turbolaser_hunyuan.TurbolaserHunyuanConfig",
                     "AutoModelForCausalLM": "modeling_turbolaser_hunyuan.TurbolaserHunyuanForCausalLM"},
        "vocab_size": int(ours["padded_vocab"]),
        "turbolaser_model": ours["model_cfg"],
        **SPECIAL,
        "dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in ours["state_dict"].items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    for name in ("configuration_turbolaser_hunyuan.py", "modeling_turbolaser_hunyuan.py"):
        shutil.copy(REMOTE / name, folder / name)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, torchrun_module):
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp(f"remote_{request.param}")
    torchrun_module(WORKER, tmp / "ours.pt", *CASES[request.param], nproc=1)
    ours = torch.load(tmp / "ours.pt")
    write_folder(tmp / "export", ours)
    model, info = AutoModelForCausalLM.from_pretrained(tmp / "export", trust_remote_code=True,
                                                       dtype=torch.float32, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(model).__name__ == "TurbolaserHunyuanForCausalLM" and model.dtype == torch.float32
    return request.param, ours, model.eval()


def test_config_reads_our_model(case):
    name, ours, model = case
    cfg = model.config
    assert cfg.cla_share_factor == (2 if name == "cla2_top1" else 1)
    assert cfg.moe_topk == (1 if name == "cla2_top1" else 2)
    # model_builder forces softmax-before-top-k for top-1 only
    assert cfg.moe_router_pre_softmax is (name == "cla2_top1")
    assert cfg.vocab_size == ours["padded_vocab"]
    params = dict(model.named_parameters())
    assert params.keys() == ours["state_dict"].keys()
    for k, v in ours["state_dict"].items():
        assert torch.equal(params[k], v), k


def test_logits_match(case):
    name, ours, model = case
    with torch.no_grad():
        logits = model(ours["tokens"]).logits
    assert logits.shape == ours["logits"].shape
    diff = (logits - ours["logits"]).abs().max().item()
    print(f"{name}: max |logits diff| = {diff:.3e}")
    assert diff < 1e-4


def test_greedy_generation_matches(case):
    _, ours, model = case
    model.generation_config.eos_token_id = None  # ours ran to max_new_tokens, no stop token
    pad_ids = list(range(ours["vocab"], ours["padded_vocab"]))  # our Generator never picks them
    for use_cache in (None, False):
        kwargs = {} if use_cache is None else {"use_cache": use_cache}
        for prompt, want in zip(ours["prompts"], ours["generated"]):
            out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=len(want),
                                 suppress_tokens=pad_ids, pad_token_id=0, **kwargs)
            assert out[0, len(prompt):].tolist() == want


def test_left_padded_batch_generation(case):
    """A batch with left padding gives each prompt's own continuation (masking and positions)."""
    _, ours, model = case
    model.generation_config.eos_token_id = None
    prompts, want = ours["prompts"], ours["generated"]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=len(want[0]),
                         suppress_tokens=list(range(ours["vocab"], ours["padded_vocab"])), pad_token_id=0)
    assert out[:, width:].tolist() == want


def test_mistakes_are_caught(case):
    """The parity test has teeth: plausible wrong semantics move the logits far beyond its tolerance."""
    _, ours, model = case
    mod = sys.modules[type(model).__module__]  # the dynamic module transformers loaded from the folder
    routers = [m for m in model.modules() if isinstance(m, mod.TurbolaserRouter)]
    wrong = copy.deepcopy(model)

    def max_diff(m):
        with torch.no_grad():
            return (m(ours["tokens"]).logits - ours["logits"]).abs().max().item()

    # the other softmax placement (top-1: weight 1 instead of the probability over all experts)
    for r in [m for m in wrong.modules() if isinstance(m, mod.TurbolaserRouter)]:
        r.pre_softmax = not r.pre_softmax
    assert routers and max_diff(wrong) > 1e-3
    # QK-norm on the other side of RoPE
    wrong = copy.deepcopy(model)
    for a in [m for m in wrong.modules() if isinstance(m, mod.TurbolaserAttention)]:
        a.qk_norm_after_rope = not a.qk_norm_after_rope
    assert max_diff(wrong) > 1e-3
