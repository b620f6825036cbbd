"""The RL stages' prompt mixture: shares by weight, no evaluation task, local files read as given."""

import json

from omegaconf import OmegaConf

from data_pipelines.code_tasks import CodeTask
from data_pipelines.eval_sets import EvalItem
from data_pipelines.instruction_prompts import InstructionPrompt
from data_pipelines.verifiable_tasks import Task
from launch.config import load_config
from posttrain.chat_sampling import eval_tasks
from posttrain.rl_stage import prompt_items


def test_mixture_shares_and_local_files(tmp_path):
    math = tmp_path / "my_math.jsonl"
    math.write_text("".join(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(10)))
    code = tmp_path / "my_code.jsonl"
    code.write_text(json.dumps({"prompt": "Write f(x) returning x + 1.", "tests": "assert f(1) == 2",
                                "entry_point": "f"}) + "\n")
    cfg = load_config([])
    prompts = OmegaConf.create({"num_prompts": 40, "sources": {
        "synthetic": {"weight": 0.5, "kinds": ["arithmetic", "sorting"], "difficulties": [1, 2], "seed_offset": 20},
        "instruction": {"weight": 0.25, "max_constraints": 2, "seed_offset": 22},
        "math_file": {"weight": 0.2, "path": str(math)},
        "code_file": {"weight": 0.05, "path": str(code)},
    }})
    items = prompt_items(prompts, cfg.stages.rl_stem.eval, int(cfg.seed))
    by_type = {t: [i for i in items if isinstance(i, t)] for t in (Task, InstructionPrompt, EvalItem, CodeTask)}
    assert [len(by_type[t]) for t in (Task, InstructionPrompt, EvalItem, CodeTask)] == [20, 10, 8, 1]
    assert sorted(i.problem for i in by_type[EvalItem]) == sorted(f"What is {i} + {i}?" for i in range(8))
    held_out = {t.id for t in eval_tasks(cfg.stages.rl_stem.eval, int(cfg.seed))}
    assert not held_out & {t.id for t in by_type[Task]}
    assert items == prompt_items(prompts, cfg.stages.rl_stem.eval, int(cfg.seed))  # deterministic
