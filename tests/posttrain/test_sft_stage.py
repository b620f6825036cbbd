"""The SFT stage's data and forward step: assistant-only loss, packed documents that never see each other."""

import json
from pathlib import Path

import pytest
import torch

from data_pipelines.chat_format import format_chat
from data_pipelines.packing import IGNORE_LABEL, pack_examples
from data_pipelines.tokenizer import load_tokenizer
from data_pipelines.verifiable_tasks import generate_tasks
from posttrain.sft_data import PackedSFTDataset, sft_inputs
from posttrain.sft_stage import sft_examples, task_conversation

WORKER = Path(__file__).with_name("sft_forward_worker.py")

def test_fed_loss_mask_is_format_chats_assistant_mask_shifted(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    tasks = generate_tasks(["algebra", "counting"], 6, seed=0, difficulties=[1, 2])
    examples = sft_examples(tasks, tokenizer, thinking=None)
    assert examples[0] == format_chat(task_conversation(tasks[0]), tokenizer)
    rows, _ = pack_examples(examples, 256, tokenizer.pad)
    assert any(len(r.example_indices) > 1 for r in rows)
    dataset = PackedSFTDataset(rows, 256, max(len(r.cu_seqlens) - 1 for r in rows))
    batch = {k: torch.stack([dataset[i][k] for i in range(len(dataset))]) for k in dataset[0]}
    inputs = sft_inputs(batch)
    assert inputs["labels"].min() >= 0  # megatron's cross entropy needs valid ids
    assert inputs["attention_mask"].shape == (len(rows), 1, 256, 256)
    assert inputs["attention_mask"].dtype == torch.bool
    for b, row in enumerate(rows):
        cu = row.cu_seqlens.tolist()
        assert batch["cu_seqlens"][b, : len(cu)].tolist() == cu
        assert (batch["cu_seqlens"][b, len(cu):] == 256).all()  # padding: empty trailing segments
        expected_mask = torch.zeros(256)
        for d, n in enumerate(row.example_indices):
            ids, mask = examples[n]
            start = cu[d]
            # position start + j predicts ids[j + 1]: it counts iff that token is the assistant's
            expected_mask[start: start + len(ids) - 1] = torch.tensor(mask[1:], dtype=torch.float32)
            assert inputs["labels"][b, start: start + len(ids) - 1].tolist() == ids[1:]
            # a document attends to itself (causally) and to nothing before it
            block = inputs["attention_mask"][b, 0, start: start + len(ids)]
            assert not block[:, start: start + len(ids)].tril().any()
            assert block[:, :start].all()
        assert torch.equal(inputs["loss_mask"][b], expected_mask)
        assert (inputs["loss_mask"][b][row.labels == IGNORE_LABEL] == 0).all()
    # only assistant tokens: the user's prompt never counts
    user_ids = tokenizer.tokenize(tasks[0].prompt)
    assert sum(examples[0][1]) < len(examples[0][0]) - len(user_ids)


def test_forward_step_loss_equals_cross_entropy_over_assistant_tokens(tmp_path, tokenizer_dir, torchrun):
    out = tmp_path / "result.json"
    torchrun(WORKER, out, tokenizer_dir, nproc=1)
    r = json.loads(out.read_text())
    assert r["labels_min"] >= 0
    assert r["count"] == r["expected_count"] == r["format_count"]
    assert r["loss"] == pytest.approx(r["by_hand"], rel=1e-5)
    # a packed document's logits are those of the document alone; plain causal attention leaks
    assert r["isolation_diff"] < 1e-4
    assert r["leaky_diff"] > 1e-3
