"""The checkpoints shipped inside the package: the tiny LLaDA teacher and the tiny AR baseline.

Both were trained once by ``pipelines/pretrain.py`` (command, seed, hardware and time in
docs/benchmarks.md) and are loaded through the same official-layout loaders as real
checkpoints, so nothing special-cases them.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_TEACHER_DIR = ASSETS / "tiny" / "teacher"
TINY_AR_DIR = ASSETS / "tiny" / "ar"


def _require(path: Path) -> str:
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"shipped checkpoint missing at {path}: reinstall d3ray, or rebuild it with pipelines/pretrain.py "
            "(see docs/benchmarks.md for the exact command)"
        )
    return str(path)


def load_tiny_teacher(device: str = "cpu"):
    from d3core.models.checkpoint import load_pretrained

    return load_pretrained(_require(TINY_TEACHER_DIR), device=device)


def load_tiny_ar(device: str = "cpu"):
    from d3core.models.ar import load_ar_model

    return load_ar_model(_require(TINY_AR_DIR), device=device)


def load_tiny_tokenizer():
    from d3core.models.tokenizer import load_tokenizer

    return load_tokenizer(str(_require(TINY_TEACHER_DIR)))
