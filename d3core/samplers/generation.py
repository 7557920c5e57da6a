"""``generate()`` on the decode engine: one batch decoded to the end, step snapshots for streaming, and the
decoders kept across calls so that captured graphs outlive one call.

With graphs on (CUDA, or emulated), a decoder and its captured graphs are worth keeping: a fresh
decoder per call captures its step shapes again (7-10 captures for 10-14 forwards of a tiny-model
batch). :func:`run` therefore takes its decoder from the model's :class:`DecoderPool`, keyed by the
program's class, the batch size, and the capacity rounded up to a bucket, so which decoder a call
gets, and with it its padded step shapes, depends on the call alone and never on earlier calls.
Without graphs every call builds its own decoder, as nothing is gained by keeping one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from d3core.samplers import graphs as graph_modes
from d3core.samplers.base import GenerationResult, validate_prompts
from d3core.samplers.engine import Decoder, Program, Row, is_eos
from d3core.samplers.packing import bucket

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """What an ``on_step`` hook sees after each step of :func:`run`."""

    tokens: torch.Tensor  # (B, gen_length) generation slots in prompt order; `undecided` where not committed
    undecided: int
    committed: list[int]  # per prompt: length of its final prefix (before the first undecided slot or EOS)
    done: list[bool]


OnStep = Callable[[Snapshot], None]


def committed_length(gen: np.ndarray, undecided: int, eos_ids: Sequence[int]) -> int:
    stop = (gen == undecided) | is_eos(gen, eos_ids)
    hits = np.nonzero(stop)[0]
    return int(hits[0]) if len(hits) else len(gen)


def row_seeds(n: int, generator: torch.Generator | None) -> list[int]:
    """Per-row noise seeds drawn from ``generator`` (the default CPU generator when None)."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**62, (n,), generator=generator, device=device).tolist()


class DecoderPool(dict):
    """A model's decoders, least recently used first; dropped on copy and pickling (graphs belong to one process).

    Kept as an attribute of the model, so it lives and dies with it."""

    MAX_DECODERS = 4
    ATTR = "_d3ray_decoders"

    def __deepcopy__(self, memo) -> "DecoderPool":
        return DecoderPool()

    def __reduce__(self):
        return DecoderPool, ()

    @classmethod
    def of(cls, model: torch.nn.Module) -> "DecoderPool":
        pool = model.__dict__.get(cls.ATTR)
        if pool is None:
            pool = cls()
            model.__dict__[cls.ATTR] = pool  # not a module, parameter or buffer: no state_dict entry
        return pool

    def take(self, model: torch.nn.Module, program: Program, rows: int, length: int, mode: str) -> Decoder:
        capacity = max(length, min(bucket(length), model.config.max_seq_len))
        key = (type(program), rows, capacity, mode)
        decoder = self.pop(key, None)
        if decoder is None:
            decoder = Decoder(model, program, rows, capacity, graphs=mode)
            logger.debug("new pooled decoder %s", key)
        self[key] = decoder  # most recently used last
        while len(self) > self.MAX_DECODERS:
            self.pop(next(iter(self)))
        return decoder


def release_decoders(model: torch.nn.Module) -> None:
    """Drop the decoders (caches and captured graphs) kept for ``model``."""
    model.__dict__.pop(DecoderPool.ATTR, None)


def _decoder(model: torch.nn.Module, program: Program, rows: int, length: int,
             verifier: torch.nn.Module | None) -> Decoder:
    mode = graph_modes.resolve(None, next(model.parameters()).device)
    if mode == "off" or not program.reusable:
        return Decoder(model, program, rows, length, verifier, graphs=mode)
    return DecoderPool.of(model).take(model, program, rows, length, mode)


@torch.inference_mode()
def run(program: Program, model: torch.nn.Module, prompts: Sequence[Sequence[int]], params,
        generator: torch.Generator | None = None, on_step: OnStep | None = None,
        verifier: torch.nn.Module | None = None, **stats) -> GenerationResult:
    """Decode a batch to the end: the ``generate()`` of every dLLM sampler.

    ``stats`` of the result: the sampler, ``batch_forwards``, and with graphs the ``graph_captures``
    and ``graph_replays`` of this call."""
    cfg = model.config
    validate_prompts(prompts, params.gen_length, cfg.max_seq_len, cfg.vocab_size)
    t0 = time.perf_counter()
    decoder = _decoder(model, program, len(prompts), max(len(p) for p in prompts) + params.gen_length, verifier)
    forwards = decoder.forwards
    runner = decoder.graphs
    captures, replays = (runner.captures, runner.replays) if runner is not None else (0, 0)
    rows = [decoder.add(p, params, seed) for p, seed in zip(prompts, row_seeds(len(prompts), generator))]
    try:
        while decoder.rows:
            report = decoder.step()
            if on_step is not None and report.forwarded:
                on_step(_snapshot(decoder, rows, params.gen_length))
    finally:
        for row in list(decoder.rows):  # a hook that raised leaves a pooled decoder empty
            decoder.cancel(row)
    failed = [row.error for row in rows if row.error]
    if failed:
        raise RuntimeError(failed[0])
    call = {"sampler": program.name, "batch_forwards": decoder.forwards - forwards}
    if runner is not None:
        call.update(graph_captures=runner.captures - captures, graph_replays=runner.replays - replays)
    return GenerationResult([row.result for row in rows], time.perf_counter() - t0, {**call, **stats})


def _snapshot(decoder: Decoder, rows: list[Row], gen_length: int) -> Snapshot:
    gen = np.empty((len(rows), gen_length), dtype=np.int64)
    for i, row in enumerate(rows):
        if row.result is not None:
            gen[i] = row.result.tokens
        else:
            gen[i] = decoder.tokens[row.cache_row, row.prompt_len: row.length]
    committed = [committed_length(g, decoder.mask_id, decoder.eos_ids) for g in gen]
    with torch.inference_mode(False):  # a hook may keep and edit the tensor outside inference mode
        tokens = torch.from_numpy(gen)
    return Snapshot(tokens, decoder.mask_id, committed, [row.result is not None for row in rows])
