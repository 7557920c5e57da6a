"""The distillation export, from a sharded (DCP) checkpoint to a publishable student in its teacher's layout."""

from __future__ import annotations

import dataclasses

import json
import re

import pytest
import torch
import torch.distributed.checkpoint as dcp
from official_layout import install_in_hub_cache, write_dream_checkpoint, write_llada_checkpoint
from safetensors import safe_open

from d3core.models.checkpoint import load_config, load_pretrained, official_specs
from d3core.models.export import ModelCard, card_license, push_to_hub, set_evaluation
from d3core.models.registry import preset
from d3core.models.safetensors_io import plan_shards
from d3core.models.tokenizer import RemoteCodeError
from pipelines.distill import DistillConfig, export_student
from pipelines.recipes import get_recipe

LLADA_REPO, DREAM_REPO = "GSAI-ML/LLaDA-8B-Instruct", "Dream-org/Dream-v0-Instruct-7B"
SUMMARY = {"rows": 40, "steps": 10}
MODEL_CODE = {"configuration_llada.py", "modeling_llada.py", "configuration_dream.py", "modeling_dream.py",
              "generation_utils.py"}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    return {"llada": write_llada_checkpoint(root / "llada"), "dream": write_dream_checkpoint(root / "dream")}


@pytest.fixture()
def hub_cache(layouts, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    snapshots = {LLADA_REPO: install_in_hub_cache(cache, LLADA_REPO, layouts["llada"]),
                 DREAM_REPO: install_in_hub_cache(cache, DREAM_REPO, layouts["dream"])}
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return snapshots


def student_checkpoint(teacher: str, path, lora=None):
    """A distilled-looking student (the teacher, moved) saved as a sharded DCP checkpoint, as training leaves it."""
    model = load_pretrained(teacher)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    if lora is not None:
        from d3core.distill.lora import apply_lora

        model = apply_lora(model, lora)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(path), no_dist=True)
    return model


def files(path) -> set[str]:
    return {p.name for p in path.iterdir()}


def weights_are_split_like_the_index(out) -> None:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == sorted(f for f in files(out) if f.endswith(".safetensors"))
    assert all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s) for s in shards) and len(shards) > 1
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            assert sorted(f.keys()) == sorted(k for k, v in index["weight_map"].items() if v == shard)
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_hub_llada_teacher_exports_its_own_layout_in_bf16(hub_cache, layouts, tmp_path):
    teacher = layouts["llada"]
    student = student_checkpoint(str(teacher), tmp_path / "ckpt")
    out = tmp_path / "student"
    # a GPU preset: bf16 weights
    cfg = dataclasses.replace(get_recipe("llada-8b").distill, out=str(out), max_shard_bytes=20_000)
    export_student(cfg, str(tmp_path / "ckpt"), LLADA_REPO, SUMMARY)

    # the teacher's file list, minus its modeling code (auto_map points into its repo instead)
    expected = files(teacher) - MODEL_CODE
    assert {f for f in files(out) if not f.startswith("model-")} == {f for f in expected if not f.startswith("model-")}
    weights_are_split_like_the_index(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).read_bytes() == (teacher / name).read_bytes(), name  # verbatim, never re-saved
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    raw_teacher = json.loads((teacher / "config.json").read_text())
    raw = json.loads((out / "config.json").read_text())
    assert raw["torch_dtype"] == "bfloat16"
    assert raw["auto_map"] == {k: f"{LLADA_REPO}--{v}" for k, v in raw_teacher["auto_map"].items()}
    assert {k: v for k, v in raw.items() if k not in ("torch_dtype", "auto_map")} == \
        {k: v for k, v in raw_teacher.items() if k not in ("torch_dtype", "auto_map")}
    # weights: the student's, cast to bf16, loadable natively
    loaded = load_pretrained(str(out))
    for (name, a), b in zip(loaded.named_parameters(), student.parameters()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.detach().to(torch.bfloat16)), name
    # transformers resolves the auto_map entries into the teacher's repo (here: the offline cache)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    module = type(hf_config).__module__  # transformers_modules.<org>.<repo>.<commit>.configuration_llada
    assert type(hf_config).__name__ == "LLaDAConfig" and "GSAI_hyphen_ML" in module
    assert module.endswith(f"{hub_cache[LLADA_REPO].name}.configuration_llada")  # the teacher repo's snapshot
    # the model card
    card = (out / "README.md").read_text()
    assert card_license(card) == "mit"  # inherited from the teacher's card
    assert f"base_model: {LLADA_REPO}" in card and "| steps | 10 |" in card and "| weights | bfloat16 |" in card
    assert "Not evaluated yet" in card
    set_evaluation(str(out), "| task | system | AUP |\n|---|---|---|\n| gsm8k | student/d3llm | 123.4 |")
    card = (out / "README.md").read_text()
    assert "| gsm8k | student/d3llm | 123.4 |" in card and "Not evaluated yet" not in card
    assert card.count("## License") == 1 and card_license(card) == "mit"


def test_hub_dream_teacher_needs_the_flag_and_keeps_its_tokenizer_class(hub_cache, layouts, tmp_path):
    teacher = layouts["dream"]
    student_checkpoint(str(teacher), tmp_path / "ckpt")
    out = tmp_path / "student"
    with pytest.raises(RemoteCodeError, match="--trust-remote-code"):
        export_student(dataclasses.replace(get_recipe("dream-7b").distill, out=str(out)), str(tmp_path / "ckpt"),
                       DREAM_REPO, SUMMARY)
    assert not out.exists()  # refused before writing anything
    cfg = dataclasses.replace(get_recipe("dream-7b").distill, out=str(out), trust_remote_code=True,
                              max_shard_bytes=20_000)
    export_student(cfg, str(tmp_path / "ckpt"), f"hf://{DREAM_REPO}", SUMMARY)
    expected = files(teacher) - MODEL_CODE  # tokenization_dream.py is a tokenizer file and stays
    assert {f for f in files(out) if not f.startswith("model-")} == {f for f in expected if not f.startswith("model-")}
    assert (out / "tokenization_dream.py").read_bytes() == (teacher / "tokenization_dream.py").read_bytes()
    assert (out / "generation_config.json").read_bytes() == (teacher / "generation_config.json").read_bytes()
    weights_are_split_like_the_index(out)
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "Dream" and raw["architectures"] == ["DreamModel"]
    assert raw["auto_map"] == {"AutoConfig": f"{DREAM_REPO}--configuration_dream.DreamConfig",
                               "AutoModel": f"{DREAM_REPO}--modeling_dream.DreamModel"}
    assert "_name_or_path" not in raw and raw["torch_dtype"] == "bfloat16"
    from d3core.models.tokenizer import load_tokenizer

    assert type(load_tokenizer(str(out), trust_remote_code=True)).__name__ == "DreamTokenizer"
    assert card_license((out / "README.md").read_text()) == "apache-2.0"
    assert load_config(str(out)) == load_config(str(teacher))


def test_local_teacher_ships_its_code_and_keeps_its_auto_map(layouts, tmp_path):
    teacher = layouts["dream"]
    student_checkpoint(str(teacher), tmp_path / "ckpt")
    out = tmp_path / "student"
    cfg = DistillConfig(out=str(out), trust_remote_code=True, max_shard_bytes=20_000)
    export_student(cfg, str(tmp_path / "ckpt"), str(teacher), SUMMARY)
    assert {f for f in files(out) if not f.startswith("model-")} == \
        {f for f in files(teacher) if not f.startswith("model-")}
    for name in MODEL_CODE & files(teacher):
        assert (out / name).read_bytes() == (teacher / name).read_bytes()
    raw = json.loads((out / "config.json").read_text())
    assert raw["auto_map"] == json.loads((teacher / "config.json").read_text())["auto_map"]
    assert raw["torch_dtype"] == "float32"  # the tiny preset keeps fp32
    assert "base_model:" not in (out / "README.md").read_text()  # not a hub id: named in the text only


def test_lora_checkpoint_exports_merged_weights(layouts, tmp_path):
    pytest.importorskip("peft")
    from d3core.distill.lora import LoraSettings, merge_lora

    lora = LoraSettings(rank=4, alpha=8.0, targets=("q", "down"))
    model = student_checkpoint(str(layouts["llada"]), tmp_path / "ckpt", lora=lora)
    cfg = DistillConfig(out=str(tmp_path / "student"), lora_rank=4, lora_alpha=8.0,
                        lora_targets=("q", "down"))
    export_student(cfg, str(tmp_path / "ckpt"), str(layouts["llada"]), SUMMARY)
    merged = merge_lora(model).state_dict()
    exported = load_pretrained(str(tmp_path / "student")).state_dict()
    assert set(exported) == set(merged)
    for name, value in merged.items():
        assert torch.equal(exported[name], value), name


def test_the_shipped_tiny_teacher_exports_with_the_project_license(tmp_path):
    from d3core.models.shipped import TINY_TEACHER_DIR

    student_checkpoint(str(TINY_TEACHER_DIR), tmp_path / "ckpt")
    export_student(DistillConfig(out=str(tmp_path / "s")), str(tmp_path / "ckpt"), str(TINY_TEACHER_DIR), SUMMARY)
    assert card_license((tmp_path / "s" / "README.md").read_text()) == "apache-2.0"
    assert (tmp_path / "s" / "model.safetensors").exists()  # below the shard limit: one file, no index
    raw = json.loads((tmp_path / "s" / "config.json").read_text())
    assert raw["auto_map"]["AutoModel"] == "GSAI-ML/LLaDA-8B-Instruct--modeling_llada.LLaDAModelLM"


@pytest.mark.parametrize("arch,size,total,count", [
    # total_size and tensor count of the official model.safetensors.index.json files
    ("llada", "llada-8b", 16031162368, 291),
    ("dream", "dream-7b", 15231233024, 339),
])
def test_an_8b_export_is_sharded_at_5gb_like_the_official_repos(arch, size, total, count):
    specs = official_specs(preset(arch, size), torch.bfloat16)  # meta only: nothing allocated
    assert len(specs) == count and sum(s.nbytes for s in specs) == total
    shards = plan_shards(specs, DistillConfig().max_shard_bytes)
    assert len(shards) == 4 and all(sum(s.nbytes for s in shard) <= 5 * 10**9 for shard in shards)


def test_push_to_hub_uploads_the_export_dir(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload", kw))
            return "https://huggingface.co/org/student/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "student"
    out.mkdir()
    assert push_to_hub(str(out), "org/student") == "https://huggingface.co/org/student/commit/abc"
    assert calls[1] == ("create", "org/student", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[2][1]["folder_path"] == str(out) and calls[2][1]["repo_id"] == "org/student"
    with pytest.raises(ValueError, match="is remote"):
        push_to_hub("s3://bucket/student", "org/student")
    with pytest.raises(ValueError, match="ORG/NAME"):
        DistillConfig(push_to_hub="not a repo")


def test_model_card_without_a_known_license():
    card = ModelCard(title="s", base_model="/data/teacher", license=None, recipe={"steps": 3}).render()
    assert card_license(card) == "other" and "declares no license" in card
