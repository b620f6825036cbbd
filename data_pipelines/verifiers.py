"""One reward entry point for RL: a prompt item and a sampled response in, a `Verdict` out.

GRPO stage I (reasoning: code, math, logic) and stage II (instruction following) draw prompts from
several sets; the trainer should not care which. `verify_response` dispatches on the item's type:

- `verifiable_tasks.Task` -> `verifiable_tasks.verify` (exact answer in the last ``\\boxed{}``);
- `code_tasks.CodeTask` -> `code_tasks.verify_code` (the code block passes the hidden tests in the
  sandbox);
- `instruction_prompts.InstructionPrompt` -> `check_constraints`, scored all-or-nothing: 1.0 only
  when every constraint holds. GRPO and LaSeR's verifier reward r_v are defined for rewards in
  {0, 1} (LaSeR's class-balanced MSE splits the batch into correct / incorrect), and a fractional
  score would pay a response for the easy constraints it met while ignoring the hard one;
- `eval_sets.EvalItem` (math) -> the last ``\\boxed{}`` (`verifiable_tasks.extract_answer`)
  compared with `eval_sets.answers_equivalent`.

A verifier never raises: any exception becomes ``Verdict(0.0, "verifier error: ...")``, so one odd
response cannot crash a rollout.
"""

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from data_pipelines import eval_sets, instruction_prompts, verifiable_tasks
from data_pipelines.code_sandbox import SandboxLimits
from data_pipelines.code_tasks import CodeTask, verify_code
from data_pipelines.errors import DataConfigError


@dataclass(frozen=True)
class Verdict:
    """The reward (0.0 or 1.0 for every item type here) and a short reason, for logs."""

    reward: float
    reason: str


def _instruction(item: instruction_prompts.InstructionPrompt, response: str) -> Verdict:
    _, details = instruction_prompts.check_constraints(item, response)
    if not details:
        return Verdict(0.0, "prompt has no constraints")
    failed = [name for name, ok in details.items() if not ok]
    if failed:
        return Verdict(0.0, f"{len(failed)}/{len(details)} constraints failed: {', '.join(failed)}")
    return Verdict(1.0, f"all {len(details)} constraints met")


def _math(item: eval_sets.EvalItem, response: str) -> Verdict:
    if not isinstance(response, str):
        return Verdict(0.0, f"response is a {type(response).__name__}, not a string")
    answer, how = verifiable_tasks.extract_answer(response)
    if answer is None:
        return Verdict(0.0, how)
    if len(answer) > verifiable_tasks.MAX_ANSWER_CHARS:
        return Verdict(0.0, f"answer is {len(answer)} characters long "
                            f"(> {verifiable_tasks.MAX_ANSWER_CHARS})")
    if eval_sets.answers_equivalent(item.answer, answer):
        return Verdict(1.0, "correct")
    return Verdict(0.0, f"wrong answer ({how}): got {answer[:60]!r}, expected {item.answer!r}")


def verify_response(item: Any, response: str, code_limits: SandboxLimits | None = None) -> Verdict:
    """The reward for `response` to `item`; never raises (an unknown item type scores 0)."""
    try:
        if isinstance(item, verifiable_tasks.Task):
            return Verdict(*verifiable_tasks.verify(item, response))
        if isinstance(item, CodeTask):
            return Verdict(*verify_code(item, response, code_limits))
        if isinstance(item, instruction_prompts.InstructionPrompt):
            return _instruction(item, response)
        if isinstance(item, eval_sets.EvalItem):
            return _math(item, response)
        return Verdict(0.0, f"verifier error: no verifier for a {type(item).__name__}")
    except Exception as exc:  # noqa: BLE001 (a reward function must not crash a rollout)
        return Verdict(0.0, f"verifier error: {type(exc).__name__}: {str(exc)[:100]}")


def verify_batch(items: Sequence[Any], responses: Sequence[str], max_workers: int = 4,
                 code_limits: SandboxLimits | None = None) -> list[Verdict]:
    """Verdicts in input order. Code items (a subprocess each, mostly waiting) run on up to
    `max_workers` threads; the rest run here, in the calling thread, which keeps math_verify's
    SIGALRM timeout working when that is the main thread."""
    if len(items) != len(responses):
        raise DataConfigError(f"verify_batch: {len(items)} items but {len(responses)} responses; "
                              f"pass one response per item")
    if not isinstance(max_workers, int) or max_workers < 1:
        raise DataConfigError(f"verify_batch.max_workers: must be an integer >= 1, got "
                              f"{max_workers!r}")
    verdicts: list[Verdict | None] = [None] * len(items)
    code = [i for i, item in enumerate(items) if isinstance(item, CodeTask)]
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        futures = {i: pool.submit(verify_response, items[i], responses[i], code_limits)
                   for i in code}
        for i, item in enumerate(items):
            if i not in futures:
                verdicts[i] = verify_response(item, responses[i], code_limits)
        for i, future in futures.items():
            verdicts[i] = future.result()  # verify_response never raises
    assert all(v is not None for v in verdicts)
    return verdicts
