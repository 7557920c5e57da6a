"""d3ray as an lm-evaluation-harness model: ``--model d3ray`` decodes with d3core's samplers.

    d3ray-lm-eval --model d3ray --model_args pretrained=DIR,sampler=d3llm,threshold=0.5 \\
        --tasks gsm8k_cot_zeroshot --apply_chat_template --batch_size 16 --output_path out/
    python -m d3core.eval.lm_eval_model ...          # the same command

The command line is lm-eval's own (every flag of ``lm_eval``), with ``d3ray`` registered first:
lm-eval 0.4.13 finds models only in its built-in table (it reads no plugin entry points), so a
bare ``lm_eval --model d3ray`` cannot see it; the peers ship the same kind of launcher
(``eval_llada.py``). From Python, ``import d3core.eval.lm_eval_model`` registers the model for
``lm_eval.simple_evaluate(model="d3ray", ...)``.

``model_args``: ``pretrained`` (path, fsspec URI, hub id or ``hf://`` URI), ``sampler`` (a
d3core sampler name), ``seed``, ``trust_remote_code``, and any field of that sampler's params
(``threshold``, ``gen_length``, ``block_length``, ``cache_delay_iter``...). As in the peers'
harnesses the generation length is ``gen_length`` (a task's ``max_gen_toks`` does not change
it); ``until`` strings cut the response, ``do_sample``/``temperature`` set the temperature.

NFE and TPF (generated tokens per forward, d3LLM's count: the kept text after the stop strings)
are logged per task and land in the results JSON under ``config.d3ray`` (:meth:`get_model_info`).
Only generation tasks (``output_type: generate_until``) are supported.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own table first: it is loaded only into an empty registry)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry
except ImportError as err:  # the optional extra is missing
    raise ImportError("d3core.eval.lm_eval_model needs lm-evaluation-harness: pip install 'd3ray[eval]'") from err

logger = logging.getLogger(__name__)

MODEL_NAME = "d3ray"
MODEL_KEYS = ("pretrained", "sampler", "seed", "trust_remote_code", "device", "batch_size", "max_batch_size")
DEFAULT_BATCH = 16  # what "auto" means: d3core batches whole requests, there is no memory probe
SYNTHETIC_TASK = "d3ray_synthetic"
# registered by import path, so running this file as a script and importing it resolve to one class
TARGET = "d3core.eval.lm_eval_model:D3RayLM"


@dataclass
class DecodeTally:
    """What one task's requests cost: requests, generated tokens (after stop strings), forwards, seconds."""

    requests: int = 0
    generated_tokens: int = 0
    nfe: int = 0
    seconds: float = 0.0
    prompts_truncated: int = 0

    def summary(self) -> dict:
        return {**dataclasses.asdict(self), "tpf": self.generated_tokens / max(self.nfe, 1),
                "mean_nfe": self.nfe / max(self.requests, 1),
                "tokens_per_second": self.generated_tokens / max(self.seconds, 1e-9)}


def _batch_size(value: Any) -> int:
    if value in (None, "", "auto") or str(value).startswith("auto"):
        return DEFAULT_BATCH
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size={value!r}: must be a positive int or 'auto'")
    return size


class D3RayLM(LM):
    """lm-eval's ``LM`` over a d3core checkpoint and sampler (see the module docstring)."""

    def __init__(self, pretrained: str, sampler: str = "d3llm", seed: int = 0, trust_remote_code: bool = False,
                 device: str | None = None, batch_size: Any = 1, max_batch_size: Any = None, **sampler_args) -> None:
        super().__init__()
        import torch

        from d3core.models.tokenizer import load_tokenizer
        from d3core.samplers import get_sampler

        self.spec = get_sampler(sampler)
        if self.spec.needs_verifier:
            raise ValueError(f"sampler={sampler!r} needs a verifier model, which lm-eval's model_args cannot "
                             "carry: pick vanilla, fast_dllm, dparallel, d3llm or ar")
        fields = {f.name for f in dataclasses.fields(self.spec.params_cls)}
        unknown = sorted(set(sampler_args) - fields)
        if unknown:
            raise ValueError(f"model_args {unknown} are not fields of {self.spec.params_cls.__name__}: use "
                             f"{sorted(fields)} or {list(MODEL_KEYS)}")
        self.params = self.spec.params_cls(**sampler_args)
        self.batch = _batch_size(batch_size)
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            logger.warning("device=%r but torch sees no CUDA device (lm-eval passes 'cuda' unless told otherwise): "
                           "decoding on the CPU", device)
            device = "cpu"
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.pretrained, self.seed = str(pretrained), int(seed)
        self.tokenizer = load_tokenizer(self.pretrained, bool(trust_remote_code))
        self.model = self._load(bool(trust_remote_code))
        self.generator = torch.Generator().manual_seed(self.seed)
        self.tallies: dict[str, DecodeTally] = defaultdict(DecodeTally)

    def _load(self, trust_remote_code: bool):
        if self.spec.autoregressive:
            from d3core.models.ar import load_ar_model
            from d3core.models.hub import resolve_checkpoint

            return load_ar_model(resolve_checkpoint(self.pretrained, trust_remote_code=trust_remote_code),
                                 device=self._device)
        from d3core.models.checkpoint import load_pretrained

        return load_pretrained(self.pretrained, device=self._device)

    # -- prompts ---------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The templated text; without a generation prompt the final (assistant prefix) message is continued."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def _encode(self, context: str) -> list[int]:
        """Context ids: a templated context already starts with BOS; a raw one gets the tokenizer's specials."""
        bos = getattr(self.tokenizer, "bos_token", None)
        templated = bool(bos) and context.startswith(bos)
        return self.tokenizer(context, add_special_tokens=not templated)["input_ids"]

    def _budget(self) -> int | None:
        from d3core.eval.harness import prompt_budget

        try:
            return prompt_budget(self.model, self.params)
        except ValueError:
            return None

    # -- lm-eval's request types -----------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        raise NotImplementedError("d3ray's lm-eval model decodes generation tasks only (output_type: "
                                  "generate_until): a diffusion LM has no exact log-likelihood; pick generative tasks")

    def loglikelihood_rolling(self, requests) -> list[float]:
        raise NotImplementedError("d3ray's lm-eval model decodes generation tasks only (output_type: "
                                  "generate_until): perplexity tasks are not supported")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[self._sampling_key(req.args[1])].append(i)
        out: list[str | None] = [None] * len(requests)
        budget = self._budget()
        for (temperature, until), order in groups.items():
            params = self.params
            if "temperature" in {f.name for f in dataclasses.fields(params)}:
                params = dataclasses.replace(params, temperature=temperature)
            for start in range(0, len(order), self.batch):
                chunk = order[start: start + self.batch]
                prompts = [self._encode(requests[i].args[0]) for i in chunk]
                cut = [budget is not None and len(p) > budget for p in prompts]
                if budget is not None:
                    prompts = [p[-budget:] for p in prompts]
                t0 = time.perf_counter()
                result = self.spec.generate(self.model, prompts, params, generator=self.generator)
                seconds = time.perf_counter() - t0
                for k, (i, seq) in enumerate(zip(chunk, result.sequences)):
                    text, generated = self._response(seq, until)
                    out[i] = text
                    tally = self.tallies[getattr(requests[i], "task_name", None) or "?"]
                    tally.requests += 1
                    tally.generated_tokens += generated
                    tally.nfe += seq.nfe
                    tally.seconds += seconds / len(chunk)
                    tally.prompts_truncated += cut[k]
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        for task, tally in self.tallies.items():
            s = tally.summary()
            logger.info("d3ray %s on %s: %d requests, TPF %.3f, mean NFE %.1f, %.0f tokens/s%s", self.spec.name,
                        task, s["requests"], s["tpf"], s["mean_nfe"], s["tokens_per_second"],
                        f", {s['prompts_truncated']} prompts cut to the context" if s["prompts_truncated"] else "")
        return [t or "" for t in out]

    @staticmethod
    def _sampling_key(gen_kwargs: dict) -> tuple[float, tuple[str, ...]]:
        until = gen_kwargs.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0) if gen_kwargs.get("do_sample") else 0.0
        return temperature, until

    def _response(self, seq, until: tuple[str, ...]) -> tuple[str, int]:
        """The response cut at the first ``until`` string and its generated-token count (d3LLM's)."""
        text = self.tokenizer.decode(seq.response_ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in until if s) if i >= 0]
        if not hits:
            return text, seq.num_generated
        kept = text[: min(hits)]
        return kept, len(self.tokenizer(kept, add_special_tokens=False)["input_ids"])

    def get_model_info(self) -> dict:
        from d3core.eval.records import run_metadata

        total = DecodeTally()
        for t in self.tallies.values():
            total.requests += t.requests
            total.generated_tokens += t.generated_tokens
            total.nfe += t.nfe
            total.seconds += t.seconds
            total.prompts_truncated += t.prompts_truncated
        return {MODEL_NAME: {"sampler": self.spec.name, "params": dataclasses.asdict(self.params),
                             "pretrained": self.pretrained, "decode": {k: v.summary() for k, v in self.tallies.items()},
                             "total": total.summary(), "provenance": run_metadata({"seed": self.seed})}}


if MODEL_NAME not in model_registry:
    model_registry.register(MODEL_NAME, target=TARGET)


# -- a local task over the synthetic set (offline, used by the tests and the docs) -------------------------
def write_synthetic_task(directory: str | Path, n: int = 16, seed: int = 0) -> str:
    """Write the synthetic test problems and an lm-eval task YAML over them into ``directory``; returns its name.

    Use it with ``--include_path DIRECTORY --tasks d3ray_synthetic --apply_chat_template`` (the tiny
    models were trained on chat-templated prompts). The score is exact match of the last number.
    """
    import json

    from d3core.eval import synthetic

    root = Path(directory).resolve()
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"{SYNTHETIC_TASK}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for p in synthetic.generate("test", n, seed):
            f.write(json.dumps({"id": p.id, "question": p.question, "answer": str(p.target)}) + "\n")
    yaml = "\n".join([
        f"task: {SYNTHETIC_TASK}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data))}",
        "output_type: generate_until",
        "test_split: test",
        'doc_to_text: "{{question}}"',
        'doc_to_target: "{{answer}}"',
        "generation_kwargs:",
        '  until: ["<|eot|>"]',
        "  do_sample: false",
        "filter_list:",
        "  - name: last-number",
        "    filter:",
        "      - function: regex",
        '        regex_pattern: "(-?[0-9]+)"',
        "        group_select: -1",
        "      - function: take_first",
        "metric_list:",
        "  - metric: exact_match",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        ""])
    (root / f"{SYNTHETIC_TASK}.yaml").write_text(yaml, encoding="utf-8")
    return SYNTHETIC_TASK


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``d3ray`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("d3core").setLevel(logging.INFO)
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
