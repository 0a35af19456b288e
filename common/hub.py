"""Hub folders: ``model.safetensors`` + ``config.json`` + ``README.md``, written and read back.

A folder is self-contained: ``config.json`` holds every constructor argument of the module
(nested components included, as ``class_path``/``init_args``), so loading needs no training
config. Built on huggingface_hub and safetensors rather than ``PyTorchModelHubMixin`` because the
mixin loads with ``strict=False`` by default and drops non-JSON init args; here loading is strict
(a missing, unexpected or misshapen tensor is an error naming it) and configs may only name vistok
classes. Nothing is unpickled.

Integrity (format 2): ``config.json`` records the SHA-256 of ``model.safetensors``
(``weights_sha256``), and the safetensors metadata holds a copy of the rest of ``config.json``
(``vistok_config``). Loading refuses weights whose hash differs, and a ``config.json`` that differs
from the copy, naming the fields: constructor arguments that change the code space or the function
without changing a tensor shape (groups, bits, temperatures, normalisation, patch sizes ...) cannot
be edited unseen. A file that is not safetensors at all is named for what it is.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vistok.common.checkpoints import config_differences, file_sha256, state_dict_problems
from vistok.common.configurable import instantiate
from vistok.common.version import package_version

FORMAT_VERSION = 2  # bump when a folder written by this version cannot be read by older ones
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
HASH_KEY, META_KEY = "weights_sha256", "vistok_config"
DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "*.md", "*.png"]


def save_pretrained(
    module: nn.Module, out_dir: str | Path, kind: str, info: dict[str, Any] | None = None
) -> Path:
    """Write ``module`` (a Configurable nn.Module) as a Hub folder; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Clone: safetensors refuses tensors that share storage or are not contiguous.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    config = {
        "vistok_version": package_version(),
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model": module.config,
        **(info or {}),
    }
    # Round-tripped through JSON so that the copy compares equal to what config.json reads back.
    config = json.loads(json.dumps(config))
    metadata = {"format": "pt", "kind": kind, META_KEY: json.dumps(config, sort_keys=True)}
    save_file(state, str(out / WEIGHTS), metadata=metadata)
    config[HASH_KEY] = file_sha256(out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _not_safetensors(path: Path) -> str | None:
    """What ``path`` is when it is not a safetensors file (None when it looks like one)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        what = "a zip archive (a torch.save checkpoint: pickled), not safetensors"
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        what = "a pickle file, not safetensors"
    elif head.startswith(b"version https://git-lfs"):
        return f"{path} is a Git LFS pointer, not the weights: fetch them with `git lfs pull`"
    elif len(head) < 9:
        what = f"{size} bytes long, too short for safetensors"
    else:
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len + 8 <= size and head[8:9] == b"{":
            return None
        what = f"not a safetensors file (it starts with {head[:16]!r})"
    return f"{path} is {what}; re-export it with export.py"


def _check_integrity(folder: Path, config: dict[str, Any]) -> None:
    path = folder / WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        copy = (f.metadata() or {}).get(META_KEY)
    recorded = config.get(HASH_KEY)
    if copy is None and recorded is None and config.get("format_version") == 1:
        warnings.warn(
            f"{folder} was exported before weights were hashed (format 1): its integrity "
            "cannot be checked; re-export it with export.py",
            stacklevel=3,
        )
        return
    if recorded is None or copy is None:
        missing = f"{CONFIG} has no {HASH_KEY}" if recorded is None else f"{path} has no copy"
        raise ValueError(f"{folder}: {missing}; the folder was altered: re-export it")
    actual = file_sha256(path)
    if actual != recorded:
        raise ValueError(
            f"{path} has SHA-256 {actual}, not the {recorded} recorded in {CONFIG}: the weights "
            "were modified or corrupted; download or export the folder again"
        )
    found = {k: v for k, v in config.items() if k != HASH_KEY}
    edits = [
        e.replace("in checkpoint", f"in {CONFIG}")
        for e in config_differences(json.loads(copy), found)
    ]
    if edits:
        raise ValueError(
            f"{folder / CONFIG} was edited after export: it differs from the copy stored in "
            f"{WEIGHTS} in " + "; ".join(edits)
        )


def parameter_count(folder: str | Path) -> int:
    """Numbers stored in a folder's ``model.safetensors``, read from its header alone."""
    with safe_open(str(Path(folder) / WEIGHTS), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


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
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS}")
    what = _not_safetensors(folder / WEIGHTS)
    if what:
        raise ValueError(what)
    module = instantiate(config["model"])
    state = load_file(str(folder / WEIGHTS))
    problems = state_dict_problems(module, state)
    if problems:
        raise ValueError(f"{folder / WEIGHTS} does not fit its config.json: " + "; ".join(problems))
    _check_integrity(folder, config)
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
