"""Test worker (torchrun, one process): the SFT forward step on the tiny model against a hand computation.

    sft_forward_worker.py <out.json> <tokenizer_dir>

Packs a few task conversations, runs ``sft_forward_step`` and records its loss next to a plain torch
cross entropy over the model's logits at the positions whose *next* token ``format_chat`` marks as
assistant (the only ones that may count), and the logits of a packed document next to the logits of
the same document alone in its row (attention must not cross documents). Routing is dropless, so a
token's output depends on no other token's routing.
"""

import json
import sys

import torch
import torch.nn.functional as F

from data_pipelines.packing import pack_examples
from data_pipelines.tokenizer import load_tokenizer
from data_pipelines.verifiable_tasks import generate_tasks
from launch.config import load_config
from megatron_ext import distributed, model_builder
from megatron_ext.quiet import quiet_known_warnings
from megatron_ext.trainer import StepBatches
from posttrain.sft_data import PackedSFTDataset, sft_forward_step, sft_inputs
from posttrain.sft_stage import sft_examples

SEQ = 128


def main(out: str, tokenizer_dir: str) -> None:
    quiet_known_warnings()
    cfg = load_config([f"model.seq_length={SEQ}", "model.moe_routing_mode=dropless",
                       "model.moe_expert_capacity_factor=null"])
    distributed.initialize(cfg.parallel, int(cfg.seed))
    tokenizer = load_tokenizer(tokenizer_dir)
    tasks = generate_tasks(["arithmetic", "comparison", "sorting"], 8, seed=0, difficulties=[1])
    examples = sft_examples(tasks, tokenizer, thinking="short")
    rows, _ = pack_examples(examples, SEQ, tokenizer.pad)
    rows = sorted(rows, key=lambda r: -len(r.example_indices))[:2]
    assert len(rows[0].example_indices) >= 2, "need a row with two documents"
    dataset = PackedSFTDataset(rows, SEQ, max(len(r.cu_seqlens) - 1 for r in rows))
    batch = StepBatches(dataset, 2, 2, 0, 1).microbatches(0)[0]

    config = model_builder.transformer_config(cfg.model, cfg.parallel)
    vocab = model_builder.padded_vocab_size(model_builder.model_vocab_size(cfg.model, tokenizer), 1)
    model = model_builder.build_model(cfg.model, config, vocab)[0]
    model.eval()
    with torch.no_grad():
        output, loss_fn = sft_forward_step(iter([batch]), model)
        loss, report = loss_fn(output)
        inputs = sft_inputs(batch)
        logits = model(inputs["tokens"], inputs["position_ids"], inputs["attention_mask"])  # [b, s, V]

        # by hand: position start + j predicts ids[j + 1]; it counts iff format_chat marks ids[j + 1]
        losses = []
        for b, row in enumerate(rows):
            for d, n in enumerate(row.example_indices):
                ids, mask = examples[n]
                start = int(row.cu_seqlens[d])
                for j in range(len(ids) - 1):
                    if mask[j + 1]:
                        losses.append(F.cross_entropy(logits[b, start + j].float(), torch.tensor(ids[j + 1])))
        by_hand = torch.stack(losses).mean()

        # the second document of row 0, alone in its own row, must give the same logits
        n = rows[0].example_indices[1]
        start, end = int(rows[0].cu_seqlens[1]), int(rows[0].cu_seqlens[2])
        alone_rows, _ = pack_examples([examples[n]], SEQ, tokenizer.pad)
        alone_sample = PackedSFTDataset(alone_rows, SEQ, dataset.max_segments)[0]
        alone = sft_inputs({k: v.unsqueeze(0) for k, v in alone_sample.items()})
        alone_logits = model(alone["tokens"], alone["position_ids"], alone["attention_mask"])
        packed_doc, alone_doc = logits[0, start:end], alone_logits[0, : end - start]
        # and without the per-document mask (plain causal attention) they would differ
        causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1).expand(2, 1, SEQ, SEQ)
        leaky = model(inputs["tokens"], inputs["position_ids"], causal)[0, start:end]

    result = {
        "loss": float(loss),
        "by_hand": float(by_hand),
        "count": float(report["lm_loss"][1]),
        "expected_count": len(losses),
        "format_count": sum(sum(examples[n][1][1:]) for row in rows for n in row.example_indices),
        "labels_min": int(inputs["labels"].min()),
        "isolation_diff": float((packed_doc - alone_doc).abs().max()),
        "leaky_diff": float((leaky - alone_doc).abs().max()),
    }
    with open(out, "w") as f:
        json.dump(result, f)
    distributed.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
