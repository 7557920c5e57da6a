"""One completion's text as its decoder row commits tokens: detokenization, stop strings, ``max_tokens``.

A dLLM row commits tokens anywhere in its canvas, but only the contiguous committed prefix
(before the first undecided slot or EOS) is final. :class:`ChoiceText` turns that growing prefix
into text, truncates it at the first stop string or at ``max_tokens``, and hands out stream deltas
that are never revised: text that may still become part of a stop string, or that ends in a
partial UTF-8 character, is held back until it settles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"  # what a partial multi-byte character decodes to


@dataclass(frozen=True)
class Choice:
    """The final output of one row (OpenAI ``choices[i]``)."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    finish_reason: str  # "stop": EOS or a stop string; "length": max_tokens or the canvas ran out
    nfe: int


@dataclass(frozen=True)
class Delta:
    """Newly final text of one choice while streaming (with its tokens' log-probabilities)."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None


class ChoiceText:
    """Tracks the final prefix of one row; ``update`` returns the new stream delta (possibly empty)."""

    def __init__(self, tokenizer: Any, index: int, stop: Sequence[str], max_tokens: int | None,
                 want_logprobs: bool) -> None:
        self.tokenizer, self.index = tokenizer, index
        self.stop = tuple(s for s in stop if s)
        self.max_tokens = max_tokens
        self.want_logprobs = want_logprobs
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""
        self.sent_chars = 0
        self.sent_tokens = 0
        self.finish_reason: str | None = None  # set once this choice needs no more tokens
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def update(self, ids: Sequence[int], logprobs: Sequence[float], sampler_done: bool, hit_eos: bool) -> Delta | None:
        """``ids`` is the row's committed prefix (no EOS); ``sampler_done``: the row has no more slots to fill."""
        if self.finish_reason is not None:
            return None
        ids, logprobs = list(ids), list(logprobs)
        if self.max_tokens is not None and len(ids) >= self.max_tokens:
            ids, logprobs = ids[: self.max_tokens], logprobs[: self.max_tokens]
            self.finish_reason = "length"
        if len(ids) != len(self.ids) or self.finish_reason is not None or sampler_done:
            self.ids, self.logprobs = ids, logprobs
            self.text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = self._stop_at(self.text)
            if cut is not None:
                self.text = self.text[:cut]
                self.ids, self.logprobs = self._tokens_through_stop(cut)
                self.finish_reason = "stop"
        if self.finish_reason is None and sampler_done:
            self.finish_reason = "stop" if hit_eos else "length"
        return self._delta()

    def _stop_at(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _tokens_through_stop(self, cut: int) -> tuple[list[int], list[float]]:
        """The shortest token prefix whose text reaches the stop string (vLLM counts the stop's tokens)."""
        for k in range(1, len(self.ids) + 1):
            if len(self.tokenizer.decode(self.ids[:k], skip_special_tokens=True)) > cut:
                return self.ids[:k], self.logprobs[:k]
        return self.ids, self.logprobs

    def _delta(self) -> Delta | None:
        final = self.finish_reason is not None
        safe = self.text if final else self.text[: max(len(self.text) - self._hold, 0)]
        if not final:
            safe = safe.rstrip(REPLACEMENT_CHAR)
        if len(safe) <= self.sent_chars:
            return None
        text = safe[self.sent_chars:]
        self.sent_chars = len(safe)
        if not self.want_logprobs:
            return Delta(self.index, text, (), None)
        # Tokens of a delta: those whose text is now wholly sent (all of them at the end).
        n_tok = len(self.ids) if final else self._tokens_within(len(safe))
        new_ids = tuple(self.ids[self.sent_tokens: n_tok])
        new_lp = tuple(self.logprobs[self.sent_tokens: n_tok])
        self.sent_tokens = max(self.sent_tokens, n_tok)
        return Delta(self.index, text, new_ids, new_lp)

    def _tokens_within(self, chars: int) -> int:
        k = self.sent_tokens
        while k < len(self.ids) and len(self.tokenizer.decode(self.ids[: k + 1], skip_special_tokens=True)) <= chars:
            k += 1
        return k

    def choice(self, nfe: int) -> Choice:
        return Choice(self.index, self.text, tuple(self.ids), tuple(self.logprobs) if self.want_logprobs else None,
                      self.finish_reason or "length", nfe)
