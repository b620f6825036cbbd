"""Run by test_gpt_datasets under torchrun: build the datasets inside a gloo process group.

argv: a JSON file with the build arguments, and a directory for one result file per rank.
"""

import json
import os
import sys

import torch.distributed as dist

from data_pipelines.gpt_datasets import build_gpt_datasets
from data_pipelines.prepare import PreparedData


def main(args_file: str, result_dir: str) -> None:
    dist.init_process_group("gloo")
    with open(args_file) as f:
        args = json.load(f)
    prepared = PreparedData(**args.pop("prepared"))
    num_checked = args.pop("num_checked")
    train_ds, valid_ds = build_gpt_datasets(prepared, **args)
    result = {
        "dataset_index": train_ds.dataset_index.tolist(),
        "train_tokens": [train_ds[i]["tokens"].tolist() for i in range(num_checked)],
        "valid_tokens": [valid_ds[i]["tokens"].tolist() for i in range(num_checked)],
    }
    with open(os.path.join(result_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
