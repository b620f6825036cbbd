import itertools

import pytest

from data_pipelines.errors import DataConfigError
from data_pipelines.synthetic_corpus import GENERATORS, generate_documents
from data_pipelines.tokenizer import EOD_TOKEN, PAD_TOKEN, load_tokenizer, train_bpe


def _docs(num_per_generator, seed):
    return [d for g in sorted(GENERATORS) for d in generate_documents(g, num_per_generator, seed)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tok")
    return train_bpe(iter(_docs(300, seed=0)), vocab_size=400, out_dir=out_dir), out_dir


def test_round_trip_on_unseen_documents(trained):
    tokenizer, _ = trained
    for doc in _docs(50, seed=7):
        ids = tokenizer.tokenize(doc)
        assert tokenizer.detokenize(ids) == doc
        assert len(ids) < len(doc)  # the merges compress
    docs = _docs(5, seed=7)
    assert tokenizer.tokenize_batch(docs) == [tokenizer.tokenize(d) for d in docs]


def test_byte_level_round_trips_any_text(trained):
    tokenizer, _ = trained
    text = "  héllo\tWörld 🙂\n\n{x: [1, 2]}"
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text


def test_what_megatron_reads(trained):
    tokenizer, _ = trained
    assert tokenizer.vocab_size == 400
    assert tokenizer.eod != tokenizer.pad  # megatron ignores a pad id that collides with eod
    assert tokenizer.detokenize([tokenizer.eod, tokenizer.pad]) == EOD_TOKEN + PAD_TOKEN
    assert tokenizer.unique_identifiers["class"] == "Tokenizer"


def test_save_and_load(trained, tmp_path):
    tokenizer, out_dir = trained
    loaded = load_tokenizer(out_dir)
    assert loaded.unique_identifiers == tokenizer.unique_identifiers
    loaded.save(tmp_path)
    again = load_tokenizer(tmp_path)
    doc = _docs(1, seed=9)[0]
    assert again.tokenize(doc) == tokenizer.tokenize(doc)
    assert (again.eod, again.pad, again.vocab_size) == (tokenizer.eod, tokenizer.pad, 400)


def test_missing_tokenizer_file_says_what_is_expected(tmp_path):
    with pytest.raises(DataConfigError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_vocab_too_small(tmp_path):
    with pytest.raises(DataConfigError, match="tokenizer.vocab_size"):
        train_bpe(itertools.repeat("abc", 3), vocab_size=100, out_dir=tmp_path)


def test_special_tokens_have_ids_but_raw_text_never_produces_them(trained):
    from data_pipelines import special_tokens

    trained, _ = trained
    ids = {t: trained.special_id(t) for t in special_tokens.ALL}
    assert sorted(ids.values()) == list(range(len(special_tokens.ALL)))  # trained: ids 0..8
    text = f"a user wrote {special_tokens.SELF_REWARD} and {special_tokens.ASSISTANT} literally"
    encoded = trained.tokenize(text)
    assert not set(encoded) & set(ids.values())
    assert trained.detokenize(encoded) == text


def test_loaded_tokenizer_gains_missing_pipeline_tokens(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from data_pipelines import special_tokens
    from data_pipelines.tokenizer import load_tokenizer

    hf = HFTokenizer(models.BPE())
    hf.add_special_tokens([special_tokens.EOD, special_tokens.PAD])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.eod == 0 and tok.pad == 1
    assert tok.special_id(special_tokens.SELF_REWARD) == len(special_tokens.ALL) - 1
    assert tok.vocab_size == len(special_tokens.ALL)


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_docs(100, seed=3)), model_prefix=str(out / "my"),
                                   vocab_size=300, model_type="bpe", minloglevel=2)
    return out


def test_sentencepiece_model_loads_with_the_pipeline_tokens(sentencepiece_dir, tmp_path):
    from data_pipelines import special_tokens
    from data_pipelines.tokenizer import SentencePieceTokenizer, load_tokenizer

    tok = load_tokenizer(sentencepiece_dir)  # the folder holds my.model
    assert isinstance(tok, SentencePieceTokenizer)
    ids = [tok.special_id(t) for t in special_tokens.ALL]
    assert ids == list(range(300, 300 + len(special_tokens.ALL)))  # appended after its 300 pieces
    assert tok.vocab_size == 300 + len(special_tokens.ALL)
    text = "Q: 12 + 7 = ? A: 19."
    assert tok.detokenize(tok.tokenize(text)) == text
    assert not set(tok.tokenize(f"literal {special_tokens.SELF_REWARD}")) & set(ids)
    assert tok.detokenize(tok.tokenize("a") + [tok.eod]) == "a" + special_tokens.EOD
    tok.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").unique_identifiers == tok.unique_identifiers


def test_prepare_with_a_sentencepiece_tokenizer(sentencepiece_dir, tmp_path):
    from data_pipelines.prepare import prepare_data
    from data_pipelines.tokenizer import load_tokenizer

    cfg = {"tokenizer": {"path": str(sentencepiece_dir)},
           "sources": {"prose": {"generator": "prose", "num_docs": 50}}}
    prepared = prepare_data(cfg, tmp_path / "out", seed=0)
    assert prepared.stats["sources"]["prose"]["documents"] == 50
    assert load_tokenizer(prepared.tokenizer_dir).vocab_size == 309
