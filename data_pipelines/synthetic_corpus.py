"""Deterministic synthetic text corpora for tiny end-to-end runs (no downloads, no network).

Each generator writes documents with a small, regular structure that a tiny model can learn
quickly, so a loss curve over a few hundred steps says whether the pipeline works:
- `prose`: short stories from a small grammar; the protagonist's name and species recur.
- `arithmetic`: worked facts, "Q: 37 + 48 = ? A: 37 + 48 = 85."; the answer is checkable.
- `code`: tiny python functions followed by asserts that the function really satisfies.
"""

import random
from typing import Callable, Iterator

from data_pipelines.errors import DataConfigError

MIN_DOC_CHARS = 200
MAX_DOC_CHARS = 600

_NAMES = ["Ada", "Bo", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivo", "June", "Kai", "Lena"]
_ANIMALS = ["cat", "dog", "fox", "owl", "rabbit", "horse", "duck", "bear", "mouse", "goat"]
_ADJECTIVES = ["small", "brave", "quiet", "happy", "old", "clever", "tired", "curious", "kind"]
_PLACES = ["near the river", "in the forest", "on the hill", "by the old mill", "in the garden",
           "under the bridge", "at the farm", "by the lake"]
_TIMES = ["morning", "evening", "day", "night", "spring", "winter"]
_FOODS = ["apples", "carrots", "bread", "berries", "seeds", "fish", "honey", "nuts"]
_VERBS = [("walks", "walked"), ("runs", "ran"), ("sings", "sang"), ("reads", "read"),
          ("plays", "played"), ("sleeps", "slept"), ("swims", "swam")]
_ADVERBS = ["slowly", "quickly", "happily", "quietly", "carefully"]


def _prose_sentences(rng: random.Random) -> Callable[[], str]:
    """Sentence source for one story: who it is about is fixed for the whole document."""
    name, animal, adj = rng.choice(_NAMES), rng.choice(_ANIMALS), rng.choice(_ADJECTIVES)
    place = rng.choice(_PLACES)
    intro = [f"{name} is a {adj} {animal} who lives {place}."]

    def sentence() -> str:
        if intro:
            return intro.pop()
        verb, past = rng.choice(_VERBS)
        kind = rng.randrange(5)
        if kind == 0:
            return f"Every {rng.choice(_TIMES)}, {name} {verb} {rng.choice(_PLACES)}."
        if kind == 1:
            return f"The {animal} likes {rng.choice(_FOODS)} more than {rng.choice(_FOODS)}."
        if kind == 2:
            other = rng.choice([n for n in _NAMES if n != name])
            return (f"One {rng.choice(_TIMES)}, {name} met a {rng.choice(_ADJECTIVES)} "
                    f"{rng.choice(_ANIMALS)} named {other}.")
        if kind == 3:
            return f"{name} {past} {rng.choice(_ADVERBS)} and felt {rng.choice(_ADJECTIVES)}."
        return f"When it rains, the {adj} {animal} {verb} {rng.choice(_PLACES)}."

    return sentence


def _arithmetic_lines(rng: random.Random) -> Callable[[], str]:
    """Worked facts; subtraction keeps a >= b so every answer is a small natural number."""

    def line() -> str:
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            c = a * b
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            if op == "-":
                a, b = max(a, b), min(a, b)
            c = a + b if op == "+" else a - b
        return f"Q: {a} {op} {b} = ? A: {a} {op} {b} = {c}.\n"

    return line


_CODE_OPS = [("add", "+", lambda x, k: x + k), ("sub", "-", lambda x, k: x - k),
             ("times", "*", lambda x, k: x * k)]


def _code_snippets(rng: random.Random) -> Callable[[], str]:
    """A function whose name says what it does, then an assert it passes."""

    def snippet() -> str:
        name, sym, fn = rng.choice(_CODE_OPS)
        k, x = rng.randint(1, 9), rng.randint(0, 20)
        kind = rng.randrange(3)
        if kind == 0:
            return (f"def {name}_{k}(x):\n    return x {sym} {k}\n\n"
                    f"assert {name}_{k}({x}) == {fn(x, k)}\n\n")
        if kind == 1:
            name2, sym2, fn2 = rng.choice(_CODE_OPS)
            k2 = rng.randint(1, 9)
            return (f"def f(x):\n    y = x {sym} {k}\n    return y {sym2} {k2}\n\n"
                    f"assert f({x}) == {fn2(fn(x, k), k2)}\n\n")
        n = rng.randint(2, 9)
        return (f"total = 0\nfor i in range({n}):\n    total += i\n"
                f"assert total == {n * (n - 1) // 2}\n\n")

    return snippet


def _document(piece: Callable[[], str], rng: random.Random, sep: str) -> str:
    """Join pieces until a random target length in [MIN_DOC_CHARS, MAX_DOC_CHARS] is reached."""
    target = rng.randint(MIN_DOC_CHARS, MAX_DOC_CHARS - 50)
    doc = ""
    while len(doc) < target:
        part = piece()
        candidate = doc + sep + part if doc else part
        if len(candidate) > MAX_DOC_CHARS and len(doc) >= MIN_DOC_CHARS:
            break
        doc = candidate
    return doc.strip()


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "prose": lambda rng: _document(_prose_sentences(rng), rng, " "),
    "arithmetic": lambda rng: _document(_arithmetic_lines(rng), rng, ""),
    "code": lambda rng: _document(_code_snippets(rng), rng, ""),
}


def generate_documents(generator: str, num_docs: int, seed: int) -> Iterator[str]:
    """Yield `num_docs` documents; the same (generator, seed) always gives the same documents,
    and the first k documents do not depend on num_docs."""
    if generator not in GENERATORS:
        raise DataConfigError(
            f"sources.*.generator: unknown generator {generator!r}; "
            f"choose one of {sorted(GENERATORS)}"
        )
    if not isinstance(num_docs, int) or num_docs < 0:
        raise DataConfigError(f"sources.*.num_docs: must be an integer >= 0, got {num_docs!r}")
    # A str seed goes through sha512 in `random`, so it is stable across processes and
    # PYTHONHASHSEED, and different generators do not share a random stream.
    rng = random.Random(f"{generator}:{seed}")
    make = GENERATORS[generator]
    for _ in range(num_docs):
        yield make(rng)
