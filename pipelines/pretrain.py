"""Pretrain the embedded tiny models on the synthetic task: the LLaDA teacher and the AR baseline.

    python pipelines/pretrain.py --kind dllm --out runs/pretrain/teacher --steps 12000
    python pipelines/pretrain.py --kind ar   --out runs/pretrain/ar      --steps 4000

Trains on an endless seeded stream of train-split problems, logs with a progress bar,
evaluates on held-out test problems, checkpoints every ``--ckpt-every`` steps and resumes
from the latest checkpoint in ``OUT/_state`` when rerun with the same ``--out``. The result
is an HF-format directory: the official LLaDA layout for the dLLM, ``LlamaForCausalLM`` for
the AR model, each with the tokenizer. Their outputs are shipped in ``d3core/assets`` so
the default pipeline never runs this.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass

import torch

from d3core.eval import synthetic
from d3core.eval.harness import evaluate_synthetic
from d3core.models import tiny_tokenizer
from d3core.models.ar import build_ar_model
from d3core.models.checkpoint import init_from_causal_lm, load_pretrained, save_pretrained
from d3core.models.registry import build_model
from d3core.samplers.ar import ARParams
from d3core.samplers.vanilla import VanillaParams
from d3core.sft import ar_loss, collate_ar, collate_diffusion, encode_prompt, encode_response, masked_diffusion_loss

logger = logging.getLogger("d3ray.pretrain")

KINDS = ("dllm", "ar")


@dataclass(frozen=True)
class PretrainConfig:
    kind: str = "dllm"
    out: str = "runs/pretrain/teacher"
    arch: str = "llada"
    steps: int = 12000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 300
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    gen_length: int = 48
    block_length: int = 16
    seed: int = 0
    threads: int = 0
    init_from: str = ""  # dllm only: a dLLM checkpoint to continue, or an HF causal LM (AR-to-diffusion, as Dream)
    ckpt_every: int = 500
    eval_every: int = 1000
    eval_n: int = 128
    final_eval_n: int = 500

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: must be one of {KINDS}")
        for name in ("steps", "batch_size", "gen_length", "ckpt_every", "eval_every", "eval_n"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be positive")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr={self.lr}: must lie in (0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio}: must lie in [0, 1]")
        if self.init_from and self.kind != "dllm":
            raise ValueError(f"init_from={self.init_from!r} applies to kind='dllm' only")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps}: must lie in [0, steps={self.steps})")


def lr_at(cfg: PretrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build(cfg: PretrainConfig) -> torch.nn.Module:
    if cfg.kind == "dllm":
        model = build_model(cfg.arch, "tiny", seed=cfg.seed)
        if cfg.init_from:
            init_weights_from(model, cfg.init_from)
        return model
    return build_ar_model(seed=cfg.seed)


def init_weights_from(model: torch.nn.Module, uri: str) -> None:
    """Start from a d3core dLLM checkpoint (to train further) or from an HF causal LM (AR-to-diffusion)."""
    if load_config_type(uri) in ("llada", "dream"):
        model.load_state_dict(load_pretrained(uri).state_dict())
    else:
        init_from_causal_lm(model, uri)


def load_config_type(uri: str) -> str:
    import fsspec

    with fsspec.open(uri.rstrip("/") + "/config.json", "r") as f:
        return str(json.load(f).get("model_type", "")).lower()


def make_batch(cfg: PretrainConfig, tok, stream: synthetic.TrainStream):
    problems = [next(stream) for _ in range(cfg.batch_size)]
    prompts = [encode_prompt(tok, p.question) for p in problems]
    responses = [encode_response(tok, p.answer) for p in problems]
    if cfg.kind == "dllm":
        return collate_diffusion(prompts, responses, cfg.gen_length, tiny_tokenizer.EOS_ID, tiny_tokenizer.PAD_ID,
                                 tiny_tokenizer.MASK_ID)
    return collate_ar(prompts, responses, tiny_tokenizer.EOS_ID, tiny_tokenizer.PAD_ID)


def evaluate(cfg: PretrainConfig, model, tok, n: int) -> dict:
    problems = synthetic.generate("test", n, seed=0)
    model.eval()
    if cfg.kind == "dllm":
        params = VanillaParams(gen_length=cfg.gen_length, block_length=cfg.block_length)
        report = evaluate_synthetic(model, tok, "vanilla", params, problems)
    else:
        report = evaluate_synthetic(model, tok, "ar", ARParams(gen_length=cfg.gen_length), problems)
    model.train()
    return report.summary()


def _state_path(cfg: PretrainConfig) -> str:
    return os.path.join(cfg.out, "_state", "state.pt")


def save_state(cfg, model, opt, step, stream, gen) -> None:
    path = _state_path(cfg)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                "stream_rng": stream.rng.getstate(), "stream_count": stream.count,
                "torch_rng": gen.get_state(), "config": dataclasses.asdict(cfg)}, tmp)
    os.replace(tmp, path)


def train(cfg: PretrainConfig) -> dict:
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    tok = tiny_tokenizer.build_tokenizer()
    model = build(cfg).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    stream = synthetic.TrainStream(seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if os.path.exists(_state_path(cfg)):
        state = torch.load(_state_path(cfg), weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        stream.rng.setstate(state["stream_rng"])
        stream.count = state["stream_count"]
        gen.set_state(state["torch_rng"])
        step = state["step"]
        logger.info("resumed from %s at step %d", _state_path(cfg), step)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("training %s (%.3fM params) for %d steps, batch %d", cfg.kind, n_params / 1e6, cfg.steps,
                cfg.batch_size)
    history = []
    ema = None
    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"pretrain[{cfg.kind}]", mininterval=5)
    while step < cfg.steps:
        batch = make_batch(cfg, tok, stream)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss = masked_diffusion_loss(model, batch, gen) if cfg.kind == "dllm" else ar_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr_at(cfg, step - 1):.2e}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_state(cfg, model, opt, step, stream, gen)
        if step % cfg.eval_every == 0 and step < cfg.steps:
            report = evaluate(cfg, model, tok, cfg.eval_n)
            history.append({"step": step, "loss_ema": ema, "elapsed_s": time.time() - t0, **report})
            logger.info("step %d loss %.3f eval %s", step, ema, json.dumps(report))
    bar.close()
    final = evaluate(cfg, model, tok, cfg.final_eval_n)
    export(cfg, model, tok)
    summary = {"config": dataclasses.asdict(cfg), "params": n_params, "final_eval": final, "history": history,
               "train_seconds_this_run": time.time() - t0, "examples_seen": stream.count,
               "torch_threads": torch.get_num_threads()}
    with open(os.path.join(cfg.out, "pretrain_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info("final eval on %d held-out problems: %s", cfg.final_eval_n, json.dumps(final))
    return summary


def export(cfg: PretrainConfig, model, tok) -> None:
    if cfg.kind == "dllm":
        save_pretrained(model, cfg.out)
    else:
        model.save_pretrained(cfg.out)
    tok.save_pretrained(cfg.out)


def parse_args(argv=None) -> PretrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(PretrainConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    return PretrainConfig(**vars(parser.parse_args(argv)))


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    train(parse_args(argv))


if __name__ == "__main__":
    main()
