"""Golden decode fixture: every sampler's exact outputs, recorded before an engine rewrite.

    python tests/d3core/samplers/golden.py record   # writes golden_decode.json.gz beside this file
    python tests/d3core/samplers/golden.py check    # compares the current code with it

For every sampler, three or more parameter sets at temperature 0 on 64 held-out synthetic
prompts, decoded at batch 1 (each prompt alone) and at batch 8 (consecutive groups), the
fixture holds per prompt the generation slots, NFE and unmask steps. A small random Dream
model with a sharpened head (decisive logits, so no float near-ties) covers the shifted-logit
paths at batch 8. ``test_golden.py`` replays it.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import torch

FIXTURE = Path(__file__).with_name("golden_decode.json.gz")
N_PROMPTS = 64
N_DREAM = 16

CONFIGS: list[tuple[str, dict]] = [
    ("vanilla", {}),
    ("vanilla", {"steps": 24}),
    ("vanilla", {"block_length": 48, "steps": 48}),
    ("fast_dllm", {"threshold": 0.9, "cache": "none"}),
    ("fast_dllm", {"threshold": 0.7, "cache": "prefix"}),
    ("fast_dllm", {"threshold": 0.7, "cache": "dual"}),
    ("fast_dllm", {"factor": 1.0, "cache": "dual"}),
    ("dparallel", {"threshold": 0.5}),
    ("dparallel", {"threshold": 0.3, "cache": "prefix"}),
    ("dparallel", {"threshold": 1.0, "cache": "dual"}),
    ("d3llm", {"threshold": 0.5}),
    ("d3llm", {"threshold": 0.5, "cache_delay_iter": 1}),
    ("d3llm", {"threshold": 0.3, "cache_delay_iter": 2, "refresh_interval": 4}),
    ("d3llm", {"threshold": 1.0, "cache_delay_iter": 1, "block_add_threshold": 0.5}),
    ("apd", {"mixture_weight": 0.7, "kv_window": None}),
    ("apd", {"mixture_weight": 0.7, "kv_window": 16}),
    ("apd", {"mixture_weight": 0.5, "kv_window": 8, "max_lookahead": 12}),
    ("ar", {}),
    ("ar", {"gen_length": 32}),
    ("ar", {"gen_length": 16}),
]


def config_key(name: str, kwargs: dict) -> str:
    return name + json.dumps(kwargs, sort_keys=True)


def held_out_prompts(tok, n: int = N_PROMPTS) -> list[list[int]]:
    from d3core.eval import synthetic
    from d3core.sft import encode_prompt

    return [encode_prompt(tok, p.question) for p in synthetic.generate("test", n, seed=0)]


def sharp_dream():
    """A random 2-layer Dream model (seeded) with a scaled-up head: decisive logits."""
    from d3core.models.registry import build_model

    model = build_model("dream", "tiny", seed=0, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=64).eval()
    with torch.no_grad():
        model.head.weight.mul_(40)
    return model


def decode(name: str, kwargs: dict, model, verifier, prompts, batch_size: int) -> list[dict]:
    from d3core.samplers import get_sampler

    spec = get_sampler(name)
    extra = {"verifier": verifier} if spec.needs_verifier else {}
    params = spec.params_cls(**kwargs)
    rows = []
    for i in range(0, len(prompts), batch_size):
        res = spec.generate(model, prompts[i:i + batch_size], params, **extra)
        rows += [{"tokens": s.tokens, "nfe": s.nfe, "unmask_step": s.unmask_step} for s in res.sequences]
    return rows


def compute() -> dict:
    from d3core.models.shipped import load_tiny_ar, load_tiny_teacher, load_tiny_tokenizer

    torch.set_num_threads(1)
    teacher, ar_model, tok = load_tiny_teacher(), load_tiny_ar(), load_tiny_tokenizer()
    dream = sharp_dream()
    prompts = held_out_prompts(tok)
    out: dict = {"prompts": prompts, "teacher": {}, "dream": {}}
    for name, kwargs in CONFIGS:
        model = ar_model if name == "ar" else teacher
        key = config_key(name, kwargs)
        out["teacher"][key] = {"batch1": decode(name, kwargs, model, ar_model, prompts, 1),
                               "batch8": decode(name, kwargs, model, ar_model, prompts, 8)}
        if name != "ar":
            out["dream"][key] = {"batch8": decode(name, kwargs, dream, ar_model, prompts[:N_DREAM], 8)}
        print(f"{key}: done", file=sys.stderr)
    return out


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "check"
    got = compute()
    if mode == "record":
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        got["recorded_at_commit"] = commit
        with gzip.open(FIXTURE, "wt") as f:
            json.dump(got, f)
        print(f"wrote {FIXTURE}")
        return
    with gzip.open(FIXTURE, "rt") as f:
        want = json.load(f)
    bad = [(model, key, run) for model in ("teacher", "dream") for key in want[model]
           for run in want[model][key] if got[model].get(key, {}).get(run) != want[model][key][run]]
    print("all equal" if not bad else f"{len(bad)} differ: {bad}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
