"""The CPU backend's patches: what megatron-core modules see, and the CPU RNG tracker."""

import importlib

import pytest
import torch

from megatron_ext import cpu_backend

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU backend is off when CUDA exists")


@pytest.fixture(scope="module", autouse=True)
def enabled():
    assert cpu_backend.enable_if_needed() is True
    assert cpu_backend.enable_if_needed() is True  # idempotent


def test_hardcoded_cuda_tensors_land_on_cpu():
    schedules = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    t = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    assert t.device.type == "cpu"
    assert schedules.torch.cuda.current_device() == "cpu"
    schedules.torch.cuda.synchronize()  # a no-op, not an error
    assert schedules.torch.Tensor is torch.Tensor  # everything else is real torch


def test_every_listed_module_sees_the_proxy():
    for name in cpu_backend._CUDA_HARDCODED_MODULES:
        assert isinstance(importlib.import_module(name).torch, cpu_backend._CpuTorchProxy), name


def test_float_tensors_pass_megatron_type_checks():
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    assert torch.ones(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(2).type(torch.float64).dtype == torch.float64  # the converting form still works
    assert torch.ones(2, dtype=torch.int64).type() == "torch.LongTensor"


def test_rng_tracker_streams_are_independent_and_restore_the_default():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_backend.CpuRNGStatesTracker)
    tracker.reset()
    tracker.add("model-parallel-rng", 1234)
    torch.manual_seed(1)
    with tracker.fork("model-parallel-rng"):
        a = torch.rand(3)
    after_fork = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(after_fork, torch.rand(3))  # the default stream did not move
    with tracker.fork("model-parallel-rng"):
        b = torch.rand(3)  # the named stream continues where it stopped
    torch.manual_seed(1234)
    expected = torch.rand(6)
    assert torch.equal(torch.cat([a, b]), expected)
    with pytest.raises(Exception, match="already exists"):
        tracker.add("another", 1234)
