"""The special tokens every TurboLaser tokenizer carries, in a fixed order (ids 0..8 when trained here).

- ``EOD`` ends a document (megatron-core's ``eod``); ``PAD`` pads.
- ``SYSTEM`` / ``USER`` / ``ASSISTANT`` open a chat turn and ``END_OF_TURN`` closes it (SFT, RL).
- ``THINK_LONG`` / ``THINK_SHORT`` select the reasoning mode at the start of an answer
  (Hunyuan-TurboS adaptive long-short chain of thought).
- ``SELF_REWARD`` is LaSeR's reserved token z_c (arXiv 2510.14943): appended after a response's first
  end of turn to read the model's self-reward; it must never come out of the data.

Raw text never produces these ids: the tokenizer encodes their strings as ordinary text, and
formatting code inserts the ids explicitly.
"""

EOD = "<|endoftext|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end_of_turn|>"
THINK_LONG = "<|think_long|>"
THINK_SHORT = "<|think_short|>"
SELF_REWARD = "<|self_reward|>"

ALL = (EOD, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN, THINK_LONG, THINK_SHORT, SELF_REWARD)
