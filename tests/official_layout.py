"""Tiny checkpoints in the official HF repos' file layouts, and a Hugging Face cache to put them in.

The file lists mirror GSAI-ML/LLaDA-8B-Instruct and Dream-org/Dream-v0-Instruct-7B (weights
aside, checked against copies of both repos; see docs/checkpoints.md):

- LLaDA: ``config.json`` (with ``auto_map``), ``configuration_llada.py``, ``modeling_llada.py``,
  ``generation_config.json``, ``special_tokens_map.json``, ``tokenizer.json``,
  ``tokenizer_config.json``, ``README.md`` (license: mit), shards + ``model.safetensors.index.json``.
- Dream: the same config/generation/README files (license: apache-2.0) plus ``configuration_dream.py``,
  ``modeling_dream.py``, ``generation_utils.py``, and a slow-style tokenizer: ``vocab.json``,
  ``merges.txt``, ``added_tokens.json``, ``special_tokens_map.json``, ``tokenizer_config.json``
  whose ``auto_map`` names ``tokenization_dream.DreamTokenizer``, and ``tokenization_dream.py``.

The Python files are written here: the modeling stand-ins are placeholders that nothing imports
(d3ray implements both architectures natively), the configuration stand-ins define only the
config class (transformers imports it while loading a remote-code tokenizer), and
``tokenization_dream.py`` is a real tokenizer class (a byte-level BPE over vocab.json/merges.txt),
so loading it really needs ``trust_remote_code=True``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from d3core.models.checkpoint import save_pretrained
from d3core.models.registry import build_model

DREAM_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>")
DREAM_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                       "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DREAM_TOKENIZER_CLASS = '''"""Test stand-in for Dream's tokenizer class: byte-level BPE (vocab.json, merges.txt)."""

from transformers import Qwen2Tokenizer


class DreamTokenizer(Qwen2Tokenizer):
    """Qwen2's byte-level BPE under Dream's class name."""
'''
PLACEHOLDER_CODE = '"""Placeholder for the official {name}: nothing imports it (d3ray implements the model)."""\n'
# transformers imports the configuration class named by config.json's auto_map while loading a
# remote-code tokenizer, so the stand-in must define it.
CONFIG_CODE = '''"""Test stand-in for the official {module}.py: the config class only."""

from transformers import PretrainedConfig


class {cls}(PretrainedConfig):
    model_type = "{model_type}"
'''
LLADA_FILES = ["README.md", "config.json", "configuration_llada.py", "generation_config.json",
               "model.safetensors.index.json", "modeling_llada.py", "special_tokens_map.json", "tokenizer.json",
               "tokenizer_config.json"]
DREAM_FILES = ["README.md", "added_tokens.json", "config.json", "configuration_dream.py", "generation_config.json",
               "generation_utils.py", "merges.txt", "model.safetensors.index.json", "modeling_dream.py",
               "special_tokens_map.json", "tokenization_dream.py", "tokenizer_config.json", "vocab.json"]


def _token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _readme(license_id: str, title: str) -> str:
    return f"---\nlibrary_name: transformers\nlicense: {license_id}\npipeline_tag: text-generation\n---\n# {title}\n"


def _official_config(path: Path, auto_map: dict, extra: dict) -> None:
    raw = json.loads((path / "config.json").read_text())
    raw.update(auto_map=auto_map, **extra)
    (path / "config.json").write_text(json.dumps(raw, indent=2))


def write_dream_tokenizer(path: Path) -> dict[str, int]:
    """Dream's tokenizer files (vocab.json/merges.txt BPE trained on the synthetic task); returns the special ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from d3core.eval import synthetic

    path.mkdir(parents=True, exist_ok=True)
    corpus = [f"{p.question} {p.target} #### = + - *" for p in synthetic.generate("train", 200, seed=0)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    core.model.save(str(path))  # vocab.json, merges.txt
    base = len(json.loads((path / "vocab.json").read_text()))
    special = {tok: base + i for i, tok in enumerate(DREAM_SPECIALS)}
    (path / "added_tokens.json").write_text(json.dumps(special, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": ["<|beginoftext|>", "<|mask|>"], "bos_token": _token("<|beginoftext|>"),
        "eos_token": _token("<|endoftext|>"), "mask_token": _token("<|mask|>"), "pad_token": _token("<|endoftext|>"),
    }, indent=2))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(i): dict(_token(t), special=True) for t, i in special.items()},
        "additional_special_tokens": ["<|beginoftext|>", "<|mask|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "bos_token": "<|beginoftext|>", "chat_template": DREAM_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>", "errors": "replace", "mask_token": "<|mask|>", "model_max_length": 4096,
        "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "DreamTokenizer",
        "unk_token": None,
    }, indent=2))
    (path / "tokenization_dream.py").write_text(DREAM_TOKENIZER_CLASS)
    return special


def write_dream_checkpoint(path: Path, seed: int = 0, max_shard_bytes: int = 60_000) -> Path:
    """A random tiny Dream in Dream-org/Dream-v0-Instruct-7B's file layout (sharded, tokenizer class file included)."""
    special = write_dream_tokenizer(path)
    mask, eos = special["<|mask|>"], special["<|endoftext|>"]
    model = build_model("dream", "tiny", seed=seed, vocab_size=max(special.values()) + 1, hidden_size=32,
                        num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, mask_id=mask,
                        eos_ids=(eos, special["<|im_end|>"]), pad_id=eos, bos_id=eos)
    save_pretrained(model, str(path), max_shard_bytes=max_shard_bytes)
    _official_config(path, {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
                     {"_name_or_path": "Dream-org/Dream-v0-Instruct-7B", "torch_dtype": "float32",
                      "transformers_version": "4.46.2", "use_cache": True, "initializer_range": 0.02})
    (path / "generation_config.json").write_text(json.dumps({
        "_from_model_config": True, "alg": "origin", "alg_temp": None, "bos_token_id": eos,
        "eos_token_id": [eos, special["<|im_end|>"]], "eps": 0.001, "mask_token_id": None, "output_history": False,
        "pad_token_id": eos, "steps": 512, "temperature": 0.0, "top_k": None, "top_p": None,
        "transformers_version": "4.46.2"}, indent=2))
    (path / "configuration_dream.py").write_text(
        CONFIG_CODE.format(module="configuration_dream", cls="DreamConfig", model_type="Dream"))
    for name in ("modeling_dream.py", "generation_utils.py"):
        (path / name).write_text(PLACEHOLDER_CODE.format(name=name))
    (path / "README.md").write_text(_readme("apache-2.0", "Dream-v0-Instruct-7B (tiny random stand-in)"))
    return path


def write_llada_checkpoint(path: Path, seed: int = 0, max_shard_bytes: int = 60_000) -> Path:
    """A random tiny LLaDA in GSAI-ML/LLaDA-8B-Instruct's file layout (fast tokenizer, no tokenizer code)."""
    from d3core.models.tiny_tokenizer import save_tokenizer

    model = build_model("llada", "tiny", seed=seed, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                        intermediate_size=64)
    save_pretrained(model, str(path), max_shard_bytes=max_shard_bytes)
    save_tokenizer(str(path))
    # As transformers 4.x wrote LLaDA's files: PreTrainedTokenizerFast, the chat template inside
    # tokenizer_config.json, additional_special_tokens, and a special_tokens_map.json.
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("backend", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens", [])
    cfg["chat_template"] = (path / "chat_template.jinja").read_text()
    (path / "chat_template.jinja").unlink()
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    keys = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "additional_special_tokens")
    (path / "special_tokens_map.json").write_text(json.dumps({k: cfg[k] for k in keys if k in cfg}, indent=2))
    _official_config(path, {"AutoConfig": "configuration_llada.LLaDAConfig",
                            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                            "AutoModel": "modeling_llada.LLaDAModelLM"},
                     {"torch_dtype": "float32", "transformers_version": "4.46.3", "precision": "amp_bf16",
                      "init_device": "meta", "flash_attention": False})
    (path / "configuration_llada.py").write_text(
        CONFIG_CODE.format(module="configuration_llada", cls="LLaDAConfig", model_type="llada"))
    (path / "modeling_llada.py").write_text(PLACEHOLDER_CODE.format(name="modeling_llada.py"))
    (path / "README.md").write_text(_readme("mit", "LLaDA-8B-Instruct (tiny random stand-in)"))
    return path


def install_in_hub_cache(cache: Path, repo_id: str, src: Path, commit: str = "0123456789abcdef" * 2 + "01234567",
                         skip_suffixes: tuple[str, ...] = ()) -> Path:
    """Put ``src``'s files into an HF hub cache as the ``main`` snapshot of ``repo_id``; returns the snapshot dir.

    This is the layout ``huggingface_hub`` itself writes (``models--ORG--NAME/{refs,snapshots}``),
    so ``snapshot_download`` under ``HF_HUB_OFFLINE=1`` resolves the repo from it.
    """
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(skip_suffixes):
            shutil.copyfile(f, snapshot / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
