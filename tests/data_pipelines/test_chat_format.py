import pytest

from data_pipelines import special_tokens as st
from data_pipelines.chat_format import THINK_CLOSE, THINK_OPEN, format_chat, format_prompt, split_mode
from data_pipelines.errors import DataConfigError
from data_pipelines.synthetic_corpus import GENERATORS, generate_documents
from data_pipelines.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    docs = [d for g in sorted(GENERATORS) for d in generate_documents(g, 300, seed=0)]
    return train_bpe(iter(docs), vocab_size=400, out_dir=tmp_path_factory.mktemp("tok"))


CONVERSATION = [
    {"role": "system", "content": "You are a kind fox."},
    {"role": "user", "content": "Q: 2 + 3 = ?"},
    {"role": "assistant", "content": "A: 5."},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "8."},
]


def test_loss_mask_is_assistant_tokens_and_their_end_of_turn(tok):
    sid = tok.special_id
    S, U, A, E = sid(st.SYSTEM), sid(st.USER), sid(st.ASSISTANT), sid(st.END_OF_TURN)
    sys_, u1, a1, u2, a2 = (tok.tokenize(m["content"]) for m in CONVERSATION)
    ids, mask = format_chat(CONVERSATION, tok)
    assert ids == [S, *sys_, E, U, *u1, E, A, *a1, E, U, *u2, E, A, *a2, E]
    expected = (
        [0] * (len(sys_) + 2)
        + [0] * (len(u1) + 2)
        + [0] + [1] * len(a1) + [1]
        + [0] * (len(u2) + 2)
        + [0] + [1] * len(a2) + [1]
    )
    assert mask == expected
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == [*a1, E, *a2, E]


@pytest.mark.parametrize("thinking, token", [("long", st.THINK_LONG), ("short", st.THINK_SHORT)])
def test_thinking_token_follows_assistant_and_is_not_trained(tok, thinking, token):
    A, T = tok.special_id(st.ASSISTANT), tok.special_id(token)
    ids, mask = format_chat(CONVERSATION, tok, thinking=thinking)
    plain, plain_mask = format_chat(CONVERSATION, tok)
    starts = [i for i, t in enumerate(ids) if t == A]
    assert len(starts) == 2 and all(ids[i + 1] == T and mask[i + 1] == 0 for i in starts)
    assert ids.count(T) == 2
    # removing the mode tokens gives back the plain layout and mask
    assert [t for t in ids if t != T] == plain
    assert [m for t, m in zip(ids, mask) if t != T] == plain_mask
    prompt = format_prompt(CONVERSATION[:2], tok, thinking=thinking)
    assert prompt[-2:] == [A, T] and ids[: len(prompt)] == prompt


def test_learn_mode_trains_the_mode_token_and_auto_prompts_leave_it_to_the_model(tok):
    A, T, L = tok.special_id(st.ASSISTANT), tok.special_id(st.THINK_SHORT), tok.special_id(st.THINK_LONG)
    given, given_mask = format_chat(CONVERSATION, tok, thinking="short")
    ids, mask = format_chat(CONVERSATION, tok, thinking="short", learn_mode=True)
    assert ids == given
    starts = [i for i, t in enumerate(ids) if t == A]
    # only the mode tokens change: now targets; [ASSISTANT] itself and every other mask entry stay
    assert all(mask[i] == 0 and mask[i + 1] == 1 for i in starts)
    assert [m for i, m in enumerate(mask) if i - 1 not in starts] == \
        [m for i, m in enumerate(given_mask) if i - 1 not in starts]
    with pytest.raises(DataConfigError, match="learn_mode"):
        format_chat(CONVERSATION, tok, learn_mode=True)
    auto = format_prompt(CONVERSATION[:2], tok, thinking="auto")
    assert auto[-1] == A and T not in auto and auto == format_prompt(CONVERSATION[:2], tok)
    body = tok.tokenize("8.")
    assert split_mode([L, *body], tok) == ("long", body)
    assert split_mode([T, *body], tok) == ("short", body)
    assert split_mode(body, tok) == (None, body) and split_mode([], tok) == (None, [])


def test_reasoning_is_rendered_before_the_answer_inside_the_turn_and_trained(tok):
    msgs = [
        {"role": "user", "content": "Q: 1 + 1 = ?"},
        {"role": "assistant", "reasoning": "one and one", "content": "A: 2."},
    ]
    ids, mask = format_chat(msgs, tok, thinking="long")
    body = tok.tokenize(THINK_OPEN + "one and one" + THINK_CLOSE + "A: 2.")
    turn = [tok.special_id(st.ASSISTANT), tok.special_id(st.THINK_LONG), *body,
            tok.special_id(st.END_OF_TURN)]
    assert ids[-len(turn):] == turn
    assert mask[-len(turn):] == [0, 0] + [1] * (len(body) + 1)
    assert tok.detokenize(body) == "<think>\none and one\n</think>\n\nA: 2."


def test_special_strings_in_content_stay_text(tok):
    specials = {tok.special_id(t) for t in st.ALL}
    content = f"say {st.ASSISTANT} then {st.END_OF_TURN} and {st.THINK_LONG}"
    msgs = [{"role": "user", "content": content}, {"role": "assistant", "content": content}]
    ids, mask = format_chat(msgs, tok)
    structural = [i for i, t in enumerate(ids) if t in specials]
    assert len(structural) == 4  # USER, END_OF_TURN, ASSISTANT, END_OF_TURN: nothing from text
    assert tok.detokenize(ids[1:structural[1]]) == content


def test_prompt_is_a_prefix_of_the_training_layout(tok):
    ids, _ = format_chat(CONVERSATION, tok)
    prompt = format_prompt(CONVERSATION[:4], tok)
    assert prompt[-1] == tok.special_id(st.ASSISTANT)
    assert ids[: len(prompt)] == prompt


@pytest.mark.parametrize(
    "messages, thinking, match",
    [
        ([], None, "messages: expected a non-empty"),
        ([{"role": "robot", "content": "hi"}], None, r"messages\[0\].role"),
        ([{"role": "user", "content": "hi"}], None, "no assistant turn"),
        ([{"role": "assistant", "content": 3}], None, r"messages\[0\].content"),
        (
            [{"role": "user", "content": "a", "reasoning": "b"},
             {"role": "assistant", "content": "c"}],
            None,
            r"messages\[0\].reasoning",
        ),
        ([{"role": "assistant", "content": "hi"}], "medium", "thinking: must be one of"),
    ],
)
def test_bad_conversations_raise_data_config_error(tok, messages, thinking, match):
    with pytest.raises(DataConfigError, match=match):
        format_chat(messages, tok, thinking=thinking)


def test_prompt_rejects_bad_thinking_and_empty(tok):
    with pytest.raises(DataConfigError, match="thinking"):
        format_prompt([{"role": "user", "content": "hi"}], tok, thinking="LONG")
    with pytest.raises(DataConfigError, match="messages"):
        format_prompt([], tok)
