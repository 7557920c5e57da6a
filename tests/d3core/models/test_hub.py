"""Checkpoint references: hub ids and hf:// URIs resolve inside the loaders; remote-code tokenizers need the flag."""

from __future__ import annotations

import pytest
import torch
from official_layout import install_in_hub_cache, write_dream_checkpoint, write_llada_checkpoint

from d3core.models import hub
from d3core.models.checkpoint import load_config, load_pretrained
from d3core.models.tokenizer import RemoteCodeError, check_remote_code, load_tokenizer, tokenizer_file_names

LLADA_REPO, DREAM_REPO = "GSAI-ML/LLaDA-8B-Instruct", "Dream-org/Dream-v0-Instruct-7B"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    return {"llada": write_llada_checkpoint(root / "llada"), "dream": write_dream_checkpoint(root / "dream")}


@pytest.fixture()
def hub_cache(layouts, tmp_path, monkeypatch):
    """An offline HF cache holding both official repos (the way huggingface_hub lays one out)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    install_in_hub_cache(cache, LLADA_REPO, layouts["llada"])
    install_in_hub_cache(cache, DREAM_REPO, layouts["dream"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("ref,expected", [
    ("GSAI-ML/LLaDA-8B-Instruct", hub.HubRef(LLADA_REPO)),
    ("hf://GSAI-ML/LLaDA-8B-Instruct", hub.HubRef(LLADA_REPO)),
    ("hf://Dream-org/Dream-v0-Instruct-7B@v0.1", hub.HubRef(DREAM_REPO, "v0.1")),
    ("s3://bucket/LLaDA-8B-Instruct", None),
    ("memory://x/y", None),
    ("/abs/path/ckpt", None),
    ("runs/a/b", None),
])
def test_parse_hub_ref(ref, expected):
    assert hub.parse_hub_ref(ref) == expected


def test_an_existing_local_dir_wins_over_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.parse_hub_ref("org/name") is None
    assert hub.resolve_checkpoint("org/name") == "org/name"


def test_bad_hf_uris_name_the_form():
    with pytest.raises(ValueError, match=r"hf://ORG/NAME\[@REVISION\]"):
        hub.parse_hub_ref("hf://GSAI-ML/LLaDA-8B-Instruct/config.json")
    with pytest.raises(ValueError, match="empty revision"):
        hub.parse_hub_ref("hf://GSAI-ML/LLaDA-8B-Instruct@")


@pytest.mark.parametrize("ref", [LLADA_REPO, f"hf://{LLADA_REPO}", f"hf://{LLADA_REPO}@main"])
def test_load_pretrained_resolves_hub_refs_offline(hub_cache, layouts, ref):
    model = load_pretrained(ref)
    local = load_pretrained(str(layouts["llada"]))
    assert load_config(ref) == local.config
    ids = torch.tensor([[5, 9, 11, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids), local(ids))


def test_a_repo_missing_from_the_offline_cache_names_the_fix(hub_cache):
    with pytest.raises(FileNotFoundError, match=r"nobody/nothing is not in the HF cache.*hf download nobody/nothing"):
        load_pretrained("nobody/nothing")


@pytest.mark.parametrize("weights,trust", [(True, False), (False, False), (True, True), (False, True)])
def test_hub_downloads_fetch_python_files_only_when_trusted(monkeypatch, weights, trust):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: calls.append((repo_id, kw)) or "/cache/snapshot")
    assert hub.resolve_checkpoint(f"hf://{DREAM_REPO}@abc", weights=weights, trust_remote_code=trust) == \
        "/cache/snapshot"
    ((repo_id, kw),) = calls
    assert repo_id == DREAM_REPO and kw["revision"] == "abc"
    patterns = kw["allow_patterns"]
    assert ("*.py" in patterns) is trust
    assert ("*.safetensors" in patterns) is weights
    assert {"*.json", "*.txt", "README.md"} <= set(patterns)  # configs, vocab/merges, model card


def test_dream_tokenizer_needs_the_flag_and_the_error_names_it(layouts):
    with pytest.raises(RemoteCodeError, match="tokenization_dream.DreamTokenizer.*pass --trust-remote-code"):
        load_tokenizer(str(layouts["dream"]))
    with pytest.raises(RemoteCodeError, match="trust_remote_code: true"):
        check_remote_code(str(layouts["dream"]), False, flag="trust_remote_code: true")
    tok = load_tokenizer(str(layouts["dream"]), trust_remote_code=True)
    assert type(tok).__name__ == "DreamTokenizer"  # the class from the checkpoint's own file
    assert tok.mask_token == "<|mask|>" and tok.mask_token_id == load_config(str(layouts["dream"])).mask_id
    text = tok.apply_chat_template([{"role": "user", "content": "ann has 7 apples ."}], add_generation_prompt=True,
                                   tokenize=False)
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # LLaDA's fast tokenizer runs no checkpoint code: no flag needed
    assert check_remote_code(str(layouts["llada"]), False) == []
    assert load_tokenizer(str(layouts["llada"])).mask_token == "<|mask|>"


def test_dream_tokenizer_through_the_hub_cache(hub_cache):
    with pytest.raises(RemoteCodeError, match="--trust-remote-code"):
        load_tokenizer(DREAM_REPO)
    assert type(load_tokenizer(f"hf://{DREAM_REPO}", trust_remote_code=True)).__name__ == "DreamTokenizer"


def test_tokenizer_files_of_the_official_layouts(layouts):
    assert tokenizer_file_names(str(layouts["llada"])) == ["special_tokens_map.json", "tokenizer.json",
                                                           "tokenizer_config.json"]
    assert tokenizer_file_names(str(layouts["dream"])) == ["added_tokens.json", "merges.txt",
                                                           "special_tokens_map.json", "tokenization_dream.py",
                                                           "tokenizer_config.json", "vocab.json"]


def test_tokenizer_from_remote_fsspec_storage(layouts):
    import fsspec

    fs = fsspec.filesystem("memory")
    for f in layouts["dream"].iterdir():
        fs.pipe_file(f"/d3ray-tok/dream/{f.name}", f.read_bytes())
    try:
        tok = load_tokenizer("memory://d3ray-tok/dream", trust_remote_code=True)
        assert tok.mask_token_id == load_config(str(layouts["dream"])).mask_id
    finally:
        fs.rm("/d3ray-tok", recursive=True)


def test_ar_baseline_resolves_hub_refs_too(hub_cache, tmp_path):
    from d3core.models.ar import build_ar_model, load_ar_model

    ar = build_ar_model(seed=3)
    ar.save_pretrained(str(tmp_path / "ar"))
    install_in_hub_cache(hub_cache, "Qwen/Qwen2.5-7B-Instruct", tmp_path / "ar")
    ids = torch.tensor([[2, 7, 9]])
    with torch.no_grad():
        expected = ar.eval()(ids).logits
        for ref in ("Qwen/Qwen2.5-7B-Instruct", "hf://Qwen/Qwen2.5-7B-Instruct"):
            assert torch.equal(load_ar_model(ref)(ids).logits, expected), ref


def test_loading_a_dllm_tokenizer_logs_no_model_type_warning(caplog):
    """transformers warned once per load ("a model of type `llada` to instantiate a model of type ``")
    because it read config.json to find a tokenizer class the tokenizer config already names."""
    import logging

    from transformers.utils import logging as hf_logging

    from d3core.models.shipped import load_tiny_tokenizer

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            tok = load_tiny_tokenizer()
    finally:
        hf_logging.disable_propagation()
    assert tok("7 + 5")["input_ids"] and not [r for r in caplog.records if "model of type" in r.getMessage()]
