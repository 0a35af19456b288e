"""Hub folders: ``model.safetensors`` + ``config.json`` + ``README.md``, written and read back.

A folder is self-contained: ``config.json`` holds every constructor argument of the module
(nested components included, as ``class_path``/``init_args``), so loading needs no training
config. Built on huggingface_hub and safetensors rather than ``PyTorchModelHubMixin`` because the
mixin loads with ``strict=False`` by default and drops non-JSON init args; here loading is strict
(a missing, unexpected or misshapen tensor is an error naming it) and configs may only name vistok
classes. Nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file, save_file
from torch import nn

from vistok.common.checkpoints import state_dict_problems
from vistok.common.configurable import instantiate

FORMAT_VERSION = 1  # bump when a folder written by this version cannot be read by older ones
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "*.md", "*.png"]


def save_pretrained(
    module: nn.Module, out_dir: str | Path, kind: str, info: dict[str, Any] | None = None
) -> Path:
    """Write ``module`` (a Configurable nn.Module) as a Hub folder; returns the folder."""
    from vistok import __version__

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Clone: safetensors refuses tensors that share storage or are not contiguous.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "kind": kind})
    config = {
        "vistok_version": __version__,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model": module.config,
        **(info or {}),
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def resolve_folder(src: str | Path) -> Path:
    """A local folder as is; anything else is taken as a Hub repo id and downloaded."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.suffix or str(src).count("/") != 1:
        raise FileNotFoundError(f"{src!r} is neither a folder nor a Hub repo id (user/name)")
    # Every file an export writes, at any depth: a generator folder carries its tokenizer in
    # tokenizer/ (fnmatch's * matches across /).
    return Path(snapshot_download(repo_id=str(src), allow_patterns=DOWNLOAD_PATTERNS))


def read_config(folder: Path, kind: str | None = None) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG}: not an exported vistok folder")
    config = json.loads(path.read_text())
    version = config.get("format_version")
    if not isinstance(version, int):
        raise ValueError(f"{path} has no format_version: not written by vistok's export")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{folder} was written by vistok {config.get('vistok_version')} (format {version}); "
            f"this vistok reads format {FORMAT_VERSION} at most: upgrade vistok to load it"
        )
    if kind is not None and config.get("kind") != kind:
        raise ValueError(f"{folder} holds a {config.get('kind')!r}, not a {kind!r}")
    return config


def load_pretrained(
    src: str | Path, kind: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the module of an exported folder (or Hub id) and load its weights strictly."""
    folder = resolve_folder(src)
    config = read_config(folder, kind)
    module = instantiate(config["model"])
    state = load_file(str(folder / WEIGHTS))
    problems = state_dict_problems(module, state)
    if problems:
        raise ValueError(f"{folder / WEIGHTS} does not fit its config.json: " + "; ".join(problems))
    module.load_state_dict(state)
    module.requires_grad_(False).eval().to(device)
    return module, config


def push_folder(folder: str | Path, repo_id: str, private: bool = False, api=None) -> str:
    """Upload an exported folder as a Hub model repo (created when missing); returns its URL."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")
    return f"https://huggingface.co/{repo_id}"
