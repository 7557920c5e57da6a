"""One completion's text as its decoder row commits tokens: detokenization, stop strings, ``max_tokens``.

A dLLM row commits tokens anywhere in its canvas, but only the contiguous committed prefix
(before the first undecided slot or EOS) is final. :class:`ChoiceText` turns that growing prefix
into text, truncates it at the first stop string or at ``max_tokens``, and hands out stream deltas
that are never revised: text that may still become part of a stop string, or that ends in a
partial UTF-8 character, is held back until it settles.

With log-probabilities, each token also gets its text (:class:`TokenStarts`), and the listed
tokens' texts concatenate exactly to the returned text, in a whole answer and in every stream delta.
A stop string can begin inside a token: that token is listed with its text cut where the stop
string begins, and a token wholly inside the stop string is not listed (it still counts in
``token_ids`` and ``usage.completion_tokens``: the model produced it).
"""

from __future__ import annotations

import bisect
import itertools
import os
from dataclasses import dataclass
from typing import Any, Sequence

REPLACEMENT_CHAR = "\ufffd"  # what a partial multi-byte character decodes to


@dataclass(frozen=True)
class Choice:
    """The final output of one row (OpenAI ``choices[i]``).

    ``logprobs`` and ``token_texts`` list the tokens that make up ``text`` (see the module docstring):
    the texts concatenate to ``text``.
    """

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    finish_reason: str  # "stop": EOS or a stop string; "length": max_tokens or the canvas ran out
    nfe: int
    token_texts: tuple[str, ...] | None = None
    tokens_computed: int = 0  # window tokens the model recomputed for this row over all its steps
    tokens_committed: int = 0  # generation slots the row committed (model or EOS fill) before it ended


@dataclass(frozen=True)
class Delta:
    """Newly final text of one choice while streaming (with its tokens' log-probabilities and texts).

    ``text_offset`` is where ``text`` starts in the choice's whole text; with log-probabilities
    ``token_texts`` concatenate to ``text``.
    """

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    token_texts: tuple[str, ...] | None = None
    text_offset: int = 0


class TokenStarts:
    """Where each token's text starts in a row's text, by incremental detokenization.

    Token ``k``'s text is the text of ``ids[:k+1]`` minus the text of ``ids[:k]``, so a word-level
    tokenizer's spaces belong to the token after them ("7", " +", " 5"), and a character split over
    several tokens belongs to the token that completes it. ``starts[k]`` is the length of the text
    of ``ids[:k]``; committed tokens never change, so each token costs one decode of its prefix.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.starts = [0]

    def extend(self, ids: Sequence[int], text: str) -> None:
        """Adds ``starts[k]`` for every ``k <= len(ids)``; ``text`` is the (possibly cut) text of ``ids``."""
        for k in range(len(self.starts), len(ids) + 1):
            prefix = self.tokenizer.decode(list(ids[:k]), skip_special_tokens=True).rstrip(REPLACEMENT_CHAR)
            at = len(prefix) if text.startswith(prefix) else len(os.path.commonprefix([prefix, text]))
            self.starts.append(max(at, self.starts[-1]))

    def texts(self, text: str, first: int, last: int, end: int) -> tuple[str, ...]:
        """The texts of tokens ``first..last-1``, the last one ending at ``end``."""
        bounds = [min(s, end) for s in self.starts[first:last]] + [end]
        return tuple(text[a:b] for a, b in itertools.pairwise(bounds))

    def within(self, chars: int, n: int) -> int:
        """How many of the first ``n`` tokens end within the first ``chars`` characters."""
        return bisect.bisect_right(self.starts, chars, 0, n + 1) - 1


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
        self.stopped_in_text = False  # a stop string cut the text
        self._prefix: list[int] = []  # the row's final answer tokens so far (before max_tokens and stop cuts)
        self._prefix_logprobs: list[float] = []
        self.starts = TokenStarts(tokenizer)
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def extend(self, ids: Sequence[int], logprobs: Sequence[float], sampler_done: bool,
               hit_eos: bool) -> Delta | None:
        """:meth:`update` with the answer tokens that became final since the last call (a step's RowOutput)."""
        self._prefix += ids
        self._prefix_logprobs += logprobs
        return self.update(self._prefix, self._prefix_logprobs, sampler_done, hit_eos)

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
                self.finish_reason, self.stopped_in_text = "stop", True
            if self.want_logprobs:
                self.starts.extend(self.ids, self.text)
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

    def _listed(self) -> int:
        """How many tokens the log-probabilities list: all but those wholly inside a stop string."""
        if not self.stopped_in_text:
            return len(self.ids)
        return bisect.bisect_left(self.starts.starts, len(self.text), 0, len(self.ids))

    def _delta(self) -> Delta | None:
        final = self.finish_reason is not None
        safe = self.text if final else self.text[: max(len(self.text) - self._hold, 0)]
        if not final:
            safe = safe.rstrip(REPLACEMENT_CHAR)
        end, n_tok = len(safe), 0
        if self.want_logprobs:
            # A delta carries whole tokens: its text ends where the last token it lists ends.
            n_tok = self._listed() if final else self.starts.within(end, len(self.ids))
            end = end if final else self.starts.starts[n_tok]
        if end <= self.sent_chars:
            return None
        text, offset = self.text[self.sent_chars: end], self.sent_chars
        self.sent_chars = end
        if not self.want_logprobs:
            return Delta(self.index, text, (), None, None, offset)
        first, self.sent_tokens = self.sent_tokens, max(self.sent_tokens, n_tok)
        return Delta(self.index, text, tuple(self.ids[first: n_tok]), tuple(self.logprobs[first: n_tok]),
                     self.starts.texts(self.text, first, n_tok, end), offset)

    def choice(self, nfe: int, computed: int = 0, committed: int = 0) -> Choice:
        """The final choice; ``computed`` and ``committed`` are the row's token-forwards and committed slots."""
        reason = self.finish_reason or "length"
        if not self.want_logprobs:
            return Choice(self.index, self.text, tuple(self.ids), None, reason, nfe, None, computed, committed)
        n = self._listed()
        return Choice(self.index, self.text, tuple(self.ids), tuple(self.logprobs[:n]), reason, nfe,
                      self.starts.texts(self.text, 0, n, len(self.text)), computed, committed)
