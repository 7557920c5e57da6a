"""Text <-> token ids for the OpenAI endpoints: prompts, chat templates and incremental decoding."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from serve_apps.protocol import APIError, ChatMessage

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"  # what a partial multi-byte character decodes to


def encode_completion_prompt(tokenizer: Any, prompt: Any) -> list[int]:
    """A completions ``prompt``: text, a list of token ids, or a one-element list of either."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"prompt holds {len(prompt)} prompts: send one prompt per request", param="prompt",
                           code="unsupported_value")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"]) if prompt else []
    return [int(t) for t in prompt]


def encode_chat(tokenizer: Any, messages: Sequence[ChatMessage]) -> list[int]:
    """Chat messages through the tokenizer's own chat template, ending with the assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions", param="messages",
                       code="no_chat_template")
    convo = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        text = tokenizer.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja templates raise arbitrary exceptions on conversations they reject
        raise APIError(400, f"the chat template rejected these messages: {e}", param="messages",
                       code="invalid_messages") from e
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class TextStream:
    """Turns a growing list of final token ids into text deltas whose concatenation is the final text.

    Each push decodes the whole prefix and emits the part beyond what was sent; text that ends in
    a partial character, or that would rewrite already-sent text, is held back until it settles.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def push(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(int(t) for t in new_ids)
        text = self.decode(self.ids)
        if text.endswith(REPLACEMENT_CHAR) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def finish(self, final_ids: Sequence[int]) -> str:
        """The rest of the text once ``final_ids`` (the whole response) is known."""
        text = self.decode(final_ids)
        if not text.startswith(self.sent):
            logger.warning("streamed text %r is not a prefix of the final text %r; sending the tail only",
                           self.sent, text)
            common = 0
            while common < min(len(text), len(self.sent)) and text[common] == self.sent[common]:
                common += 1
            delta = text[common:]
        else:
            delta = text[len(self.sent):]
        self.sent = text
        return delta
