"""Grouped-GEMM experts (TorchGroupedMLP on torch._grouped_mm) compute SequentialMLP's numbers and
read its checkpoints. The bf16 GPU comparison and timing: benchmarks/grouped_experts.py."""

import json
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("grouped_experts_worker.py")


def test_cpu_keeps_sequential_experts_and_names_unsupported_configs():
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    from megatron_ext.models.grouped_experts import unsupported_reason, use_grouped_gemm

    def config(**kw):
        return TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_moe_experts=4,
                                 **{"bf16": True, "add_bias_linear": False, **kw})

    assert unsupported_reason(config()) is None
    assert use_grouped_gemm(config()) is False                    # no GPU here: SequentialMLP
    assert "bf16" in unsupported_reason(config(bf16=False))
    assert "bias" in unsupported_reason(config(add_bias_linear=True))
    assert "gated" in unsupported_reason(config(gated_linear_unit=True, activation_func=F.relu))
    assert "multiples of 8" in unsupported_reason(config(moe_ffn_hidden_size=36))


@pytest.mark.parametrize("nproc", [1, 2])
def test_grouped_mlp_matches_sequential_mlp_from_its_checkpoint(tmp_path, torchrun, nproc):
    out = tmp_path / "diffs.json"
    torchrun(WORKER, tmp_path, out, nproc=nproc)
    got = json.loads(out.read_text())
    assert got["world"] == nproc                                  # nproc 2: two experts per rank (EP2)
    assert got["modules"] == ["SequentialMLP", "TorchGroupedMLP"]
    assert got["round_trip"] == 0.0          # the grouped checkpoint loads back into SequentialMLP
    # one rank holds every expert: the grouped layer permutes without host syncs; EP2 keeps megatron's
    fast = ["MoEAllGatherTokenDispatcher", "DroplessAllGatherDispatcher"]
    assert got["dispatchers"] == (fast if nproc == 1 else ["MoEAllGatherTokenDispatcher"] * 2)
    assert got["rows_known"] is (True if nproc == 1 else None)
    assert got["padded"]["rows_known"] is (False if nproc == 1 else None)   # a padding mask: megatron's path
    assert got["padded"]["out"] < 1e-5 * got["float32"]["out_scale"], got["padded"]
    cap = got["capacity"]
    assert cap["dispatcher"] == fast[1 if nproc == 1 else 0]
    assert cap["rows_known"] is (False if nproc == 1 else None)          # dropping: megatron's path
    assert cap["dropless_rows_known"] is (True if nproc == 1 else None)  # generation: sync-free
    assert cap["dropless_changed"] > 1e-3                                # capacity 0.5 did drop tokens
    assert max(cap["out"], cap["dropless_out"]) < 1e-5 * got["float32"]["out_scale"], cap
    fp32, bf16 = got["float32"], got["bfloat16"]
    assert fp32["out_scale"] > 0.1, fp32                          # the layer computes something
    assert max(fp32["out"], fp32["grad"], fp32["weight_grad"]) < 1e-5 * fp32["out_scale"], fp32
    # bf16: both within bf16 rounding of the fp32 layer, grouped no worse than sequential
    assert bf16["grouped_vs_fp32"] <= 2 * bf16["sequential_vs_fp32"] + 1e-2 * fp32["out_scale"], bf16
    assert max(bf16["out"], bf16["grad"]) < 3e-2 * fp32["out_scale"], bf16


def test_expert_tensor_parallel_checkpoints_hold_sequential_mlps_tensors(tmp_path, torchrun):
    out = tmp_path / "tp.json"
    torchrun(WORKER, tmp_path, out, "tp", nproc=2)
    got = json.loads(out.read_text())
    assert got["module"] == "TorchGroupedMLP"
    assert got["weight1_shape"] == [4, 48, 32]          # 4 experts x (2 SwiGLU halves x 48 / TP2) x hidden
    assert got["into_grouped"] == 0.0 and got["round_trip"] == 0.0, got


def test_resume_with_the_other_expert_module_is_refused_clearly(tmp_path):
    from megatron_ext.checkpointing import check_same_expert_module
    from megatron_ext.errors import ConfigError

    for same in (("TorchGroupedMLP", "TorchGroupedMLP"), (None, "SequentialMLP"), ("SequentialMLP", None)):
        check_same_expert_module(tmp_path, *same)        # same kind, old checkpoint, or no MoE here
    with pytest.raises(ConfigError, match="saved with TorchGroupedMLP experts; this run builds SequentialMLP") as err:
        check_same_expert_module(tmp_path, "TorchGroupedMLP", "SequentialMLP")
    assert f"init_from={tmp_path}" in str(err.value)
