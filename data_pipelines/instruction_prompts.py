"""Instruction-following prompts with constraints a program can check (RL stage II data).

Hunyuan-TurboS's second RL stage trains general instruction following with GRPO; without a reward
model, the IFEval-style answer is a prompt that states checkable constraints ("answer in at most
20 words", "include the word 'river'") and a reward equal to the fraction of them the response
satisfies. Requests and constraints are short so a tiny model's 128-256-token window fits both.

- `generate_instruction_prompts` is deterministic per seed (the first k prompts do not depend on n)
  and never combines constraints that contradict each other.
- `check_constraints` never raises; an empty (whitespace-only) response fails every constraint, so
  saying nothing cannot collect the "exclude"/"at most" rewards for free.
"""

import hashlib
import json
import random
import re
from dataclasses import dataclass

from data_pipelines.errors import DataConfigError

_REQUESTS = [
    "Describe a quiet morning by the sea.", "Give advice to a student before an exam.",
    "Explain why people keep pets.", "Write a short note to a neighbour.",
    "Describe your favourite season.", "Explain how to make a cup of tea.",
    "Tell a short story about a lost key.", "Describe a busy market.",
    "Explain why sleep matters.", "Write a short review of a park.",
    "Give tips for saving money.", "Describe a walk in the forest.",
]
_KEYWORDS = ["river", "light", "friend", "green", "simple", "morning", "window", "bread"]
# Words a response would naturally use, so excluding them is a real constraint.
_COMMON_WORDS = ["very", "really", "good", "nice", "the", "and"]
_ENDINGS = ["That is all.", "Thank you.", "Any questions?", "The end."]

CONSTRAINT_KINDS = ("max_words", "min_words", "include_keyword", "exclude_keyword", "end_with",
                    "all_lowercase", "num_bullets", "json_format")

# Pairs that can contradict: a length window, lowercase vs a capitalised ending, a JSON document
# vs bullets or a closing phrase.
_INCOMPATIBLE = {
    frozenset({"max_words", "min_words"}), frozenset({"end_with", "all_lowercase"}),
    frozenset({"json_format", "num_bullets"}), frozenset({"json_format", "end_with"}),
    frozenset({"max_words", "num_bullets"}),
}


@dataclass(frozen=True)
class Constraint:
    """One checkable requirement; `arg` is the word limit, keyword, phrase or bullet count."""

    kind: str
    arg: int | str | None = None

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}({self.arg!r})"

    def describe(self) -> str:
        """The sentence the prompt states; the checker enforces exactly this."""
        return {
            "max_words": f"Answer in at most {self.arg} words.",
            "min_words": f"Answer in at least {self.arg} words.",
            "include_keyword": f'Include the word "{self.arg}".',
            "exclude_keyword": f'Do not use the word "{self.arg}".',
            "end_with": f'End your answer with the exact phrase "{self.arg}".',
            "all_lowercase": "Write only in lowercase letters.",
            "num_bullets": f"Use exactly {self.arg} bullet points starting with '- '.",
            "json_format": "Format your whole answer as valid JSON.",
        }[self.kind]


@dataclass(frozen=True)
class InstructionPrompt:
    """A request plus its constraints; `prompt` is the text the model sees."""

    id: str
    prompt: str
    constraints: tuple[Constraint, ...]


def _words(text: str) -> list[str]:
    """Whitespace-separated tokens with at least one letter or digit (a bullet '-' is no word)."""
    return [w for w in text.split() if any(ch.isalnum() for ch in w)]


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", text,
                     re.IGNORECASE) is not None


_BULLET = re.compile(r"^[ \t]*[-*][ \t]+\S", re.MULTILINE)


def _is_json(text: str) -> bool:
    """A JSON object or array, optionally inside a ```json fence (models often add one)."""
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?[ \t]*\n(.*)\n```", body, re.DOTALL)
    if fence:
        body = fence.group(1)
    try:
        return isinstance(json.loads(body), (dict, list))
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser allows
        return False


def check_constraint(constraint: Constraint, response: str) -> bool:
    """Whether `response` meets one constraint; an empty response meets none."""
    if not response.strip():
        return False
    kind, arg = constraint.kind, constraint.arg
    if kind == "max_words":
        return len(_words(response)) <= arg
    if kind == "min_words":
        return len(_words(response)) >= arg
    if kind == "include_keyword":
        return _has_word(response, arg)
    if kind == "exclude_keyword":
        return not _has_word(response, arg)
    if kind == "end_with":
        return response.rstrip().endswith(arg)
    if kind == "all_lowercase":
        return response == response.lower() and any(ch.isalpha() for ch in response)
    if kind == "num_bullets":
        return len(_BULLET.findall(response)) == arg
    if kind == "json_format":
        return _is_json(response)
    raise AssertionError(f"unknown constraint kind {kind!r}")


def check_constraints(prompt: InstructionPrompt, response: str) -> tuple[float, dict[str, bool]]:
    """(fraction of constraints met, {str(constraint): met}); never raises on any response.

    A checker that fails on a hostile response (e.g. JSON nested too deep) counts as not met.
    """
    details: dict[str, bool] = {}
    for constraint in prompt.constraints:
        try:
            ok = isinstance(response, str) and check_constraint(constraint, response)
        except Exception:  # RecursionError from json, anything odd: a miss, not a crash
            ok = False
        details[str(constraint)] = bool(ok)
    if not details:
        return 0.0, details
    return sum(details.values()) / len(details), details


def _draw_constraint(kind: str, rng: random.Random) -> Constraint:
    if kind == "max_words":
        return Constraint(kind, rng.choice([10, 15, 20, 30]))
    if kind == "min_words":
        return Constraint(kind, rng.choice([10, 20, 30]))
    if kind == "include_keyword":
        return Constraint(kind, rng.choice(_KEYWORDS))
    if kind == "exclude_keyword":
        return Constraint(kind, rng.choice(_COMMON_WORDS))
    if kind == "end_with":
        return Constraint(kind, rng.choice(_ENDINGS))
    if kind == "num_bullets":
        return Constraint(kind, rng.randint(2, 4))
    return Constraint(kind)


def generate_instruction_prompts(n: int, seed: int, max_constraints: int = 3
                                 ) -> list[InstructionPrompt]:
    """`n` prompts, each a base request plus 1..max_constraints compatible constraints."""
    if not isinstance(n, int) or n < 0:
        raise DataConfigError(f"instruction_prompts.n: must be an integer >= 0, got {n!r}")
    if not isinstance(max_constraints, int) or not 1 <= max_constraints <= 3:
        raise DataConfigError(f"instruction_prompts.max_constraints: must be 1, 2 or 3, got "
                              f"{max_constraints!r}")
    rng = random.Random(f"instruction_prompts:{seed}")
    prompts = []
    for _ in range(n):
        request = rng.choice(_REQUESTS)
        target = rng.randint(1, max_constraints)
        chosen: list[Constraint] = []
        for kind in rng.sample(CONSTRAINT_KINDS, len(CONSTRAINT_KINDS)):
            if len(chosen) == target:
                break
            if any(frozenset({kind, c.kind}) in _INCOMPATIBLE for c in chosen):
                continue
            chosen.append(_draw_constraint(kind, rng))
        text = " ".join([request] + [c.describe() for c in chosen])
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        prompts.append(InstructionPrompt(f"if-{digest}", text, tuple(chosen)))
    return prompts
