"""The repo root is the package `vistok` without shadowing Hugging Face's `tokenizers`."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

TOP_LEVEL = ["tokenizers", "generators", "losses", "data", "evaluation", "common"]


def test_top_level_folders_are_namespace_packages():
    for name in TOP_LEVEL:
        assert (ROOT / name).is_dir(), name
        assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py would shadow"


def _run(code: str, cwd) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_diffusers_dit_imports_from_repo_root_with_transformers_installed(tmp_path):
    import transformers  # noqa: F401  (the clash only shows with transformers installed)

    code = (
        "from diffusers import DiTTransformer2DModel\n"
        "import tokenizers, vistok.tokenizers.tokenizer\n"
        "print(tokenizers.__file__)\n"
    )
    for cwd in (ROOT, tmp_path):
        printed = _run(code, cwd)
        found = Path(printed.strip()).resolve()
        assert "site-packages" in found.parts and found.parent != ROOT / "tokenizers", found


def test_code_imports_only_through_vistok():
    bare = re.compile(rf"^\s*(from|import)\s+({'|'.join(TOP_LEVEL)})(\s|\.|$)", re.M)
    offenders = []
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts or "tests" in path.parts:
            continue
        offenders += [f"{path}: {m.group(0).strip()}" for m in bare.finditer(path.read_text())]
    assert not offenders, offenders
