"""Chat conversations as token ids and an SFT loss mask, with special ids inserted explicitly.

Layout, one turn after another (``[X]`` is the special id of ``special_tokens.X``, ``tok(s)`` the
tokenizer's ids for the text ``s``; there is no BOS and no EOD: packing separates documents with
``cu_seqlens``, and ``[END_OF_TURN]`` after an assistant answer is the stop token)::

    system / user:  [SYSTEM|USER] tok(content) [END_OF_TURN]                    loss 0 ... 0
    assistant:      [ASSISTANT] [THINK_LONG|THINK_SHORT]? tok(body) [END_OF_TURN]
                    loss: 0     0 (if present)            1 ... 1   1

    body = content                                                  (no "reasoning" field)
    body = "<think>\\n" + reasoning + "\\n</think>\\n\\n" + content   (message has "reasoning")

Why these choices:
- The thinking-mode token (Hunyuan-TurboS adaptive long/short chain of thought) sits right after
  ``[ASSISTANT]``. By default it is *given* by whoever asks, both here and in :func:`format_prompt`;
  the model reads it and never has to produce it, so it is not in the loss. With ``learn_mode``
  (CoT fusion, ``fusion.model_picks_mode``) it is in the loss: the model learns to pick its own mode,
  and a prompt formatted with ``thinking="auto"`` ends at ``[ASSISTANT]`` so that it does
  (:func:`split_mode` reads the choice back).
- The assistant's ``[END_OF_TURN]`` is in the loss: the model must learn to stop.
- The reasoning lives inside the same assistant turn, so the model learns to write it; its
  ``<think>`` / ``</think>`` delimiters are ordinary text (the special-token set has no
  think-delimiter ids, and plain text keeps the body one tokenize() call, as the model would
  generate it).
- Special ids come only from ``tokenizer.special_id``; content is tokenized with special-token
  strings as plain text, so a user writing "<|assistant|>" cannot forge a turn.
"""

from typing import Any, Sequence

from data_pipelines import special_tokens
from data_pipelines.errors import DataConfigError

ROLE_TOKENS = {
    "system": special_tokens.SYSTEM,
    "user": special_tokens.USER,
    "assistant": special_tokens.ASSISTANT,
}
THINKING_TOKENS = {"long": special_tokens.THINK_LONG, "short": special_tokens.THINK_SHORT}
THINK_OPEN = "<think>\n"
THINK_CLOSE = "\n</think>\n\n"


AUTO = "auto"   # format_prompt only: no mode token, the model generates it


def _thinking_id(tokenizer, thinking: str | None) -> list[int]:
    if thinking is None:
        return []
    if thinking not in THINKING_TOKENS:
        raise DataConfigError(
            f"thinking: must be one of {sorted(THINKING_TOKENS)} or None (no mode token), "
            f"got {thinking!r}"
        )
    return [tokenizer.special_id(THINKING_TOKENS[thinking])]


def _checked(messages: Sequence[dict[str, Any]]) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataConfigError(
            f"messages: expected a non-empty list of {{'role', 'content'}} dicts, got {messages!r}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLE_TOKENS:
            role = m.get("role") if isinstance(m, dict) else m
            raise DataConfigError(
                f"messages[{i}].role: must be one of {sorted(ROLE_TOKENS)}, got {role!r}"
            )
        if not isinstance(m.get("content"), str):
            raise DataConfigError(
                f"messages[{i}].content: must be a string, got {m.get('content')!r}"
            )
        if "reasoning" in m:
            if m["role"] != "assistant":
                raise DataConfigError(
                    f"messages[{i}].reasoning: only assistant messages carry reasoning, this one "
                    f"is {m['role']!r}; move the text into 'content' or drop the field"
                )
            if not isinstance(m["reasoning"], str):
                raise DataConfigError(
                    f"messages[{i}].reasoning: must be a string, got {m['reasoning']!r}"
                )


def _body(message: dict[str, Any]) -> str:
    if "reasoning" in message:
        return THINK_OPEN + message["reasoning"] + THINK_CLOSE + message["content"]
    return message["content"]


def _turn_opening(role: str, tokenizer, think: list[int]) -> list[int]:
    opening = [tokenizer.special_id(ROLE_TOKENS[role])]
    return opening + think if role == "assistant" else opening


def format_chat(
    messages: Sequence[dict[str, Any]], tokenizer, thinking: str | None = None, learn_mode: bool = False
) -> tuple[list[int], list[int]]:
    """Ids and loss mask (1 = train on this token) of a whole conversation, for SFT.

    The mask is 1 exactly on assistant body tokens and the assistant's end-of-turn (and, with
    ``learn_mode``, on the assistant's mode token); a conversation without an assistant turn would
    train on nothing, so it is an error rather than a silent no-op.
    """
    _checked(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataConfigError(
            "messages: the conversation has no assistant turn, so SFT has nothing to learn from; "
            "add an {'role': 'assistant', 'content': ...} message or drop the example"
        )
    think = _thinking_id(tokenizer, thinking)
    if learn_mode and not think:
        raise DataConfigError("format_chat: learn_mode trains the mode token, so give thinking='short' or 'long'")
    end = tokenizer.special_id(special_tokens.END_OF_TURN)
    ids: list[int] = []
    loss_mask: list[int] = []
    for m in messages:
        opening = _turn_opening(m["role"], tokenizer, think)
        body = tokenizer.tokenize(_body(m))
        trained = 1 if m["role"] == "assistant" else 0
        mode_trained = trained if learn_mode else 0
        ids += opening + body + [end]
        loss_mask += [0] + [mode_trained] * (len(opening) - 1) + [trained] * (len(body) + 1)
    return ids, loss_mask


def format_prompt(
    messages: Sequence[dict[str, Any]], tokenizer, thinking: str | None = None
) -> list[int]:
    """Ids of a conversation so far, ending with ``[ASSISTANT]`` (+ mode token) to generate from.

    Earlier assistant turns are rendered exactly as in :func:`format_chat`, so a prompt is a prefix
    of the training layout and generation continues where training did. ``thinking="auto"``: no mode
    token anywhere; a model trained with ``learn_mode`` generates its own first.
    """
    _checked(messages)
    think = [] if thinking == AUTO else _thinking_id(tokenizer, thinking)
    end = tokenizer.special_id(special_tokens.END_OF_TURN)
    ids: list[int] = []
    for m in messages:
        ids += _turn_opening(m["role"], tokenizer, think) + tokenizer.tokenize(_body(m)) + [end]
    return ids + _turn_opening("assistant", tokenizer, think)


def split_mode(tokens: Sequence[int], tokenizer) -> tuple[str | None, list[int]]:
    """(the mode a response generated from a ``thinking="auto"`` prompt chose, the response after it):
    its first token if that is a mode token, else None and the tokens unchanged."""
    if tokens:
        for mode, token in THINKING_TOKENS.items():
            if int(tokens[0]) == tokenizer.special_id(token):
                return mode, list(tokens[1:])
    return None, list(tokens)
