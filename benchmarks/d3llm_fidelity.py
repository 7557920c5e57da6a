"""d3ray's ``d3llm`` against the official d3LLM decoder (LLaDA variant) on the shipped tiny teacher.

    git clone https://github.com/hao-ai-lab/d3LLM /tmp/d3LLM && pip install einops
    python benchmarks/d3llm_fidelity.py --reference /tmp/d3LLM --out runs/bench/d3llm_fidelity.json

The reference's ``generate_multi_block`` (no cache) and ``generate_multi_block_kv_cache`` run
on the official ``LLaDAModelLM`` from that checkout (``utils/utils_LLaDA/model``) with the tiny
teacher's weights; d3ray runs ``d3llm`` with the same settings on the same prompts, one at a
time (the reference is batch 1). Reports, per setting and commit rule, how many prompts give
the same response tokens (up to the first EOS) and the same NFE. Nothing of the reference is
copied: it is imported from the path given. Its modeling code predates transformers 5, so
two shims are applied at run time: ``DynamicCache[i]`` returns the layer's (keys, values) as it
did in transformers 4, and the model is built from its config and loaded with
``load_state_dict`` instead of ``from_pretrained``.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys

import torch

logger = logging.getLogger("d3ray.bench.d3llm_fidelity")

SETTINGS = [
    {"threshold": 0.5},
    {"threshold": 0.3},
    {"threshold": 1.0},
    {"threshold": 0.5, "cache_delay_iter": 1},
    {"threshold": 0.5, "cache_delay_iter": 2},
    {"threshold": 0.3, "cache_delay_iter": 1, "refresh_interval": 4},
]
SHARED = dict(block_add_threshold=0.1, decoded_token_threshold=0.95, early_stop=True)


def load_reference(root: str, weights_dir: str):
    sys.path[:0] = [root, os.path.join(root, "d3llm", "d3llm_LLaDA")]
    from safetensors.torch import load_file
    from transformers.cache_utils import DynamicCache

    if not hasattr(DynamicCache, "__getitem__"):
        DynamicCache.__getitem__ = lambda self, i: (self.layers[i].keys, self.layers[i].values)
        DynamicCache.__len__ = lambda self: len(self.layers)
    import d3llm_llada_generate_util as ref  # noqa: E402  (from the reference checkout)
    from utils.utils_LLaDA.model.configuration_llada import LLaDAConfig
    from utils.utils_LLaDA.model.modeling_llada import LLaDAModelLM

    config = LLaDAConfig.from_pretrained(weights_dir)
    config.use_cache = False
    model = LLaDAModelLM(config, init_params=False)
    state = {}
    for path in glob.glob(os.path.join(weights_dir, "*.safetensors")):
        state.update(load_file(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"reference model does not take the tiny teacher's weights: missing {missing}, "
                           f"unexpected {unexpected}")
    return ref, model.eval()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="a checkout of github.com/hao-ai-lab/d3LLM")
    parser.add_argument("--out", default="runs/bench/d3llm_fidelity.json")
    parser.add_argument("--n", type=int, default=50, help="held-out prompts")
    args = parser.parse_args()
    if not os.path.isdir(os.path.join(args.reference, "d3llm", "d3llm_LLaDA")):
        parser.error(f"--reference {args.reference!r} is not a d3LLM checkout (no d3llm/d3llm_LLaDA in it)")
    if args.n < 1:
        parser.error(f"--n={args.n}: must be >= 1")
    torch.set_num_threads(1)
    from d3core.eval import synthetic
    from d3core.models.shipped import TINY_TEACHER_DIR, load_tiny_teacher, load_tiny_tokenizer
    from d3core.samplers import get_sampler
    from d3core.sft import encode_prompt

    ref, theirs = load_reference(args.reference, str(TINY_TEACHER_DIR))
    ours, tok = load_tiny_teacher(), load_tiny_tokenizer()
    cfg, spec = ours.config, get_sampler("d3llm")
    prompts = [encode_prompt(tok, p.question) for p in synthetic.generate("test", args.n, seed=0)]
    eos = cfg.eos_ids[0]

    def response(tokens: list[int]) -> list[int]:
        return tokens[: tokens.index(eos)] if eos in tokens else tokens

    rows = []
    for setting in SETTINGS:
        kw = dict(SHARED, **setting)
        ref_out = []
        for p in prompts:
            x = torch.tensor([p])
            common = dict(max_new_tokens=48, block_size=16, mask_id=cfg.mask_id, eos_token_id=eos,
                          threshold=kw["threshold"], block_add_threshold=kw["block_add_threshold"], early_stop=True,
                          decoded_token_threshold=kw["decoded_token_threshold"])
            with torch.no_grad():
                if "cache_delay_iter" in kw:
                    out, nfe = ref.generate_multi_block_kv_cache(
                        theirs, x, cache_delay_iter=kw["cache_delay_iter"],
                        refresh_interval=kw.get("refresh_interval", 10000), **common)
                else:
                    out, nfe = ref.generate_multi_block(theirs, x, **common)
            ref_out.append((response(out[0, len(p):].tolist()), int(nfe)))
        for rule in ("llada", "dream"):
            params = spec.params_cls(gen_length=48, block_length=16, commit_rule=rule, **kw)
            mine = [spec.generate(ours, [p], params).sequences[0] for p in prompts]
            same_tokens = sum(response(m.tokens) == r[0] for m, r in zip(mine, ref_out))
            same_nfe = sum(m.nfe == r[1] for m, r in zip(mine, ref_out))
            rows.append({"setting": setting, "commit_rule": rule, "n": len(prompts), "same_tokens": same_tokens,
                         "same_nfe": same_nfe})
            logger.info("%-60s rule %-5s tokens %d/%d NFE %d/%d", json.dumps(setting), rule, same_tokens,
                        len(prompts), same_nfe, len(prompts))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"reference": os.path.abspath(args.reference), "results": rows}, f, indent=2)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
