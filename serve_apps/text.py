"""Text -> token ids for the OpenAI endpoints: completion prompts and chat templates."""

from __future__ import annotations

from typing import Any, Sequence

from serve_apps.protocol import APIError, ChatMessage

# OpenAI's "developer" role is the newer name of "system"; templates written before it know only "system".
ROLE_ALIASES = {"developer": "system"}


def encode_completion_prompt(tokenizer: Any, prompt: Any) -> list[int]:
    """One completions prompt: text (tokenized with the tokenizer's special tokens) or token ids."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"]) if prompt else []
    return [int(t) for t in prompt]


def decode_prompt(tokenizer: Any, prompt: Any) -> str:
    """The text ``echo`` returns for a prompt."""
    return prompt if isinstance(prompt, str) else tokenizer.decode(list(prompt), skip_special_tokens=True)


def encode_chat(tokenizer: Any, messages: Sequence[ChatMessage]) -> list[int]:
    """Chat messages through the tokenizer's own chat template, ending with the assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions", param="messages",
                       code="no_chat_template")
    convo = [{"role": ROLE_ALIASES.get(m.role, m.role), "content": m.text(f"messages.{i}")}
             for i, m in enumerate(messages)]
    try:
        text = tokenizer.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja templates raise arbitrary exceptions on conversations they reject
        raise APIError(400, f"the chat template rejected these messages: {e}", param="messages",
                       code="invalid_messages") from e
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])

