"""A Hugging Face `tokenizers` tokenizer shaped the way megatron-core's datasets expect.

megatron-core's GPTDataset never tokenizes; it only reads `eod` (loss/position masks), `pad`
(padding the last sample), `vocab_size` (token dtype) and `unique_identifiers`, which it
json-dumps into the hash that names its cached index files. So this class is duck-typed rather
than a subclass of `MegatronTokenizerBase` (whose abstract chat-template API we do not need), and
its `unique_identifiers` hold a hash of tokenizer.json: the same tokenizer anywhere on disk hits
the same cache, a retrained one never does.
"""

import hashlib
import os
from collections import OrderedDict
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from data_pipelines import special_tokens
from data_pipelines.errors import DataConfigError

EOD_TOKEN = special_tokens.EOD
PAD_TOKEN = special_tokens.PAD
TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"  # a SentencePiece model, the other format we load


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` that defines the pipeline's special tokens.

    EOD and PAD must exist; the chat, thinking-mode and self-reward tokens of
    :mod:`data_pipelines.special_tokens` are added to a loaded tokenizer that lacks them (the
    vocabulary grows by that many ids). Text is encoded with special-token strings treated as plain
    text, so no document can produce a special id (LaSeR relies on that for its self-reward token).
    """

    def __init__(self, hf_tokenizer: HFTokenizer) -> None:
        self._tok = hf_tokenizer
        ids = {t: hf_tokenizer.token_to_id(t) for t in (EOD_TOKEN, PAD_TOKEN)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise DataConfigError(
                f"tokenizer.path: the tokenizer lacks the special tokens {missing}; add "
                f"{EOD_TOKEN!r} and {PAD_TOKEN!r} to it, or set tokenizer.path: null to train one"
            )
        absent = [t for t in special_tokens.ALL if hf_tokenizer.token_to_id(t) is None]
        if absent:
            hf_tokenizer.add_special_tokens(absent)
        hf_tokenizer.encode_special_tokens = True  # raw text never yields a special id
        self._eod, self._pad = ids[EOD_TOKEN], ids[PAD_TOKEN]
        sha = hashlib.sha256(hf_tokenizer.to_str().encode("utf-8")).hexdigest()
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_json_sha256", sha)]
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    def special_id(self, token: str) -> int:
        """The id of one of :data:`data_pipelines.special_tokens.ALL`."""
        if token not in special_tokens.ALL:
            raise KeyError(f"{token!r} is not a pipeline special token: {special_tokens.ALL}")
        return self._tok.token_to_id(token)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """Same as `tokenize` per text, but encoded in parallel by the Rust library."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> str:
        """Write tokenizer.json into `directory`; returns the file's path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, TOKENIZER_FILE)
        self._tok.save(path)
        return path


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style: any string round-trips exactly) and save it.

    The 256 byte symbols and the special tokens are part of `vocab_size`.
    """
    floor = 256 + len(special_tokens.ALL) + 1
    if not isinstance(vocab_size, int) or vocab_size < floor:
        raise DataConfigError(
            f"tokenizer.vocab_size: must be an integer >= {floor} (256 bytes + "
            f"{len(special_tokens.ALL)} special tokens + at least one merge), got {vocab_size!r}"
        )
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens.ALL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    tokenizer = Tokenizer(hf)
    tokenizer.save(out_dir)
    return tokenizer


def tokenizer_file(path: str | os.PathLike) -> str:
    """The tokenizer file in a tokenizer directory: tokenizer.json, else a SentencePiece model."""
    for name in (TOKENIZER_FILE, SENTENCEPIECE_FILE):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            return file
    models_here = sorted(f for f in os.listdir(path) if f.endswith(".model")) if os.path.isdir(path) else []
    if len(models_here) == 1:
        return os.path.join(path, models_here[0])
    raise DataConfigError(
        f"tokenizer.path: expected a directory containing {TOKENIZER_FILE} (a Hugging Face "
        f"`tokenizers` file) or one SentencePiece .model file, but {path} has neither"
    )


def load_tokenizer(path: str | os.PathLike):
    """Load a local tokenizer directory (never downloads): Hugging Face or SentencePiece."""
    file = tokenizer_file(path)
    if file.endswith(".json"):
        return Tokenizer(HFTokenizer.from_file(file))
    return SentencePieceTokenizer(file)


class SentencePieceTokenizer:
    """A SentencePiece model with the interface of :class:`Tokenizer`.

    Pipeline special tokens the model does not define as pieces get ids after its vocabulary (in the
    order of :data:`data_pipelines.special_tokens.ALL`); SentencePiece never emits them for text, so
    raw text cannot produce a special id here either.
    """

    def __init__(self, model_file: str) -> None:
        import sentencepiece as spm

        self._file = model_file
        self._sp = spm.SentencePieceProcessor(model_file=model_file)
        base = self._sp.get_piece_size()
        self._special: dict[str, int] = {}
        for token in special_tokens.ALL:
            piece = self._sp.piece_to_id(token)
            defined = piece != self._sp.unk_id() and self._sp.id_to_piece(piece) == token
            self._special[token] = piece if defined else base + len(
                [t for t in self._special.values() if t >= base])
        self._by_id = {i: t for t, i in self._special.items()}
        with open(model_file, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        self.unique_identifiers = OrderedDict([("class", type(self).__name__), ("model_sha256", sha)])

    @property
    def vocab_size(self) -> int:
        return max(self._sp.get_piece_size(), max(self._special.values()) + 1)

    @property
    def eod(self) -> int:
        return self._special[EOD_TOKEN]

    @property
    def pad(self) -> int:
        return self._special[PAD_TOKEN]

    def special_id(self, token: str) -> int:
        if token not in self._special:
            raise KeyError(f"{token!r} is not a pipeline special token: {special_tokens.ALL}")
        return self._special[token]

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def detokenize(self, ids: Iterable[int]) -> str:
        out, run = [], []
        for i in (int(i) for i in ids):
            if i in self._by_id:
                out.append(self._sp.decode(run))
                out.append(self._by_id[i])
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def save(self, directory: str | os.PathLike) -> str:
        """Copy the model into `directory` as tokenizer.model; returns its path."""
        import shutil

        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, SENTENCEPIECE_FILE)
        shutil.copyfile(self._file, path)
        return path
