"""Context-parallel attention (ring of K/V, load-balanced chunks) equals causal SDPA on the whole
sequence, forward and backward, in float64: CP2 (each rank sees one earlier and one later K/V block)
and CP4 (gradients of K/V accumulated over several hops)."""

import json
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ring_attention_worker.py")


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_equals_whole_sequence_sdpa(tmp_path, torchrun, cp):
    out = tmp_path / "diffs.json"
    torchrun(WORKER, out, nproc=cp)
    ranks = json.loads(out.read_text())
    assert len(ranks) == cp
    for rank, kernels in enumerate(ranks):
        for kernel, diffs in kernels.items():
            assert max(diffs.values()) < 1e-12, (rank, kernel, diffs)

