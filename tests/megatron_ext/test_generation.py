"""Generation with a KV cache (megatron_ext.generation): sampling maths, cache vs recompute for both
model families, and the same tokens under every parallel layout as in one process."""

import json
import math

import pytest
import torch

from megatron_ext.errors import ConfigError
from megatron_ext.generation import SamplingParams, sample_tokens, truncate_logits

WORKER = __file__.replace("test_generation.py", "generation_worker.py")
STOP = 56
MAX_NEW = 10


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept = torch.isfinite(truncate_logits(logits, top_k=2, top_p=1.0))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]])
    logits = probs.log()
    # 0.5 + 0.3 = 0.8 reaches 0.75; 0.5 alone does not.
    assert torch.isfinite(truncate_logits(logits, 0, 0.75)).tolist() == [[False, True, False, True, False]]
    # 0.5 reaches 0.5 exactly: one token.
    assert torch.isfinite(truncate_logits(logits, 0, 0.5)).tolist() == [[False, True, False, False, False]]
    # Tiny top_p still keeps the most probable token.
    assert torch.isfinite(truncate_logits(logits, 0, 1e-6)).sum() == 1


def test_sampling_follows_the_tempered_distribution():
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5]).repeat(20000, 1)
    params = SamplingParams(temperature=2.0)
    tokens, logp = sample_tokens(logits, params, torch.Generator().manual_seed(0))
    expected = torch.softmax(logits[0] / 2.0, dim=-1)
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)
    assert torch.allclose(logp, expected.log()[tokens])


def test_greedy_is_argmax_with_its_log_prob():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(1))
    tokens, logp = sample_tokens(logits, SamplingParams(temperature=0.0), None)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    assert torch.allclose(logp, torch.log_softmax(logits, -1).max(-1).values)


def test_banned_tokens_are_never_generated():
    # token 0 is the argmax and the likeliest sample; banned, it never comes out, greedy or sampled,
    # and the log-probs are those of the distribution without it
    logits = torch.tensor([3.0, 1.0, 0.0, 0.5]).repeat(5000, 1)
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, banned_token_ids=(0,))
        tokens, logp = sample_tokens(logits, params, torch.Generator().manual_seed(0))
        assert (tokens != 0).all()
        rest = torch.log_softmax(logits[0, 1:] / (temperature or 1.0), dim=-1)
        assert torch.allclose(logp, rest[tokens - 1])
    assert (sample_tokens(logits, SamplingParams(temperature=0.0), None)[0] == 0).all()   # not banned: chosen


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5),
                                         ("top_k", -2), ("max_new_tokens", 0)])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SamplingParams(**{field: value})


# ----------------------------------------------------------------------------------------------
# Models: one reference process per family, then each layout loads the same weights
# ----------------------------------------------------------------------------------------------

LAYOUTS = {"tiny_large": ["tp2", "pp2", "ep2"], "tiny_turbos": ["tp2", "pp2"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, torchrun_module):
    root = tmp_path_factory.mktemp("generation")
    out = {}
    for model, layouts in LAYOUTS.items():
        ckpt = root / f"ckpt_{model}"
        torchrun_module(WORKER, root / f"{model}.json", ckpt, "reference", f"model={model}", nproc=1)
        out[model, "single"] = json.loads((root / f"{model}.json").read_text())
        for layout in layouts:
            path = root / f"{model}_{layout}.json"
            torchrun_module(WORKER, path, ckpt, "layout", f"model={model}", f"parallel={layout}")
            out[model, layout] = json.loads(path.read_text())
    return out


@pytest.mark.parametrize("model", list(LAYOUTS))
def test_kv_cache_equals_full_recompute(runs, model):
    ref = runs[model, "single"]
    assert ref["greedy_cached"]["tokens"] == ref["greedy_uncached"]["tokens"]
    for a, b in zip(ref["greedy_cached"]["logprobs"], ref["greedy_uncached"]["logprobs"]):
        assert a == pytest.approx(b, abs=1e-5)
    # Batch composition does not matter: 3 prompts a batch or all 5 in one.
    assert ref["greedy_cached"]["tokens"] == ref["greedy_cached_one_batch"]["tokens"]


@pytest.mark.parametrize("model", list(LAYOUTS))
def test_static_decode_step_generates_what_the_cache_does(runs, model):
    """Decode on fixed buffers (device-side position, masked whole-cache attention, Mamba's in-place
    step: what a CUDA graph captures) against the regular cached steps."""
    ref = runs[model, "single"]
    assert "static_refused" not in ref, ref.get("static_refused")
    assert ref["static_by_default"] is False          # CPU: no graph to capture, the regular steps
    assert ref["static_decode_kinds"] == ["static"]   # every batch ran the fixed-buffer step (eagerly)
    for key in ("greedy", "sampled"):
        static, cached = ref[f"{key}_static"], ref[f"{key}_cached" if key == "greedy" else key]
        assert static["tokens"] == cached["tokens"], key
        assert static["finished"] == cached["finished"], key
        for a, b in zip(static["logprobs"], cached["logprobs"]):
            assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("model", list(LAYOUTS))
def test_stop_tokens_and_length_limit(runs, model):
    for key in ("greedy_cached", "sampled"):
        run = runs[model, "single"][key]
        for tokens, finished, logprobs in zip(run["tokens"], run["finished"], run["logprobs"]):
            assert len(tokens) == len(logprobs) and 1 <= len(tokens) <= MAX_NEW
            assert STOP not in tokens[:-1]
            assert finished == (tokens[-1] == STOP)
            if not finished:
                assert len(tokens) == MAX_NEW
            assert all(lp <= 0 and math.isfinite(lp) for lp in logprobs)
    assert any(runs[m, "single"]["greedy_cached"]["finished"][i] for m in LAYOUTS for i in range(5)), \
        "no run exercised the stop token; pick another STOP in the worker"


@pytest.mark.parametrize("model", list(LAYOUTS))
def test_sampling_is_reproducible_per_seed(runs, model):
    ref = runs[model, "single"]
    assert ref["sampled"] == ref["sampled_again"]
    assert ref["sampled"]["tokens"] != ref["sampled_other_seed"]["tokens"]
    assert ref["stats"]["generated_tokens"] == sum(len(t) for k in ("sampled_again", "sampled_other_seed")
                                                   for t in ref[k]["tokens"])
    assert ref["stats"]["tokens_per_s"] > 0


@pytest.mark.parametrize("model,layout", [(m, lay) for m, lays in LAYOUTS.items() for lay in lays])
def test_every_layout_generates_what_one_process_does(runs, model, layout):
    ref, got = runs[model, "single"], runs[model, layout]
    # greedy_sharded: the prompts split over data-parallel ranks; the same greedy tokens as one batch.
    pairs = [("greedy_cached",) * 2, ("greedy_cached_one_batch",) * 2, ("sampled",) * 2,
             ("greedy_sharded", "greedy_cached")]
    for key, ref_key in pairs:
        assert got[key]["tokens"] == ref[ref_key]["tokens"], key
        assert got[key]["finished"] == ref[ref_key]["finished"], key
        for a, b in zip(got[key]["logprobs"], ref[ref_key]["logprobs"]):
            assert a == pytest.approx(b, abs=1e-5)


def test_generation_refuses_context_parallel_models():
    from types import SimpleNamespace

    from megatron_ext.generation import Generator

    chunk = SimpleNamespace(config=SimpleNamespace(context_parallel_size=2))
    with pytest.raises(ConfigError, match="context_parallel_size=2.*context_parallel_size=1"):
        Generator([chunk], vocab_size=16)
