"""Reading checkpoints safely and refusing the wrong ones before anything is loaded."""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, memoised per (path, size, mtime): checkpoints and weights files are
    hashed once per process."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint, loaded with ``weights_only=True`` (never arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds objects that cannot be loaded safely (weights_only=True refused them): "
            f"{e}. Re-save it with plain tensors, or export it with export.py."
        ) from e


def config_differences(expected: Any, found: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two config trees differ, with both values."""
    if isinstance(expected, dict) and isinstance(found, dict):
        out = []
        for key in sorted(set(expected) | set(found)):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in found:
                out.append(f"{where}: missing in checkpoint (expected {expected[key]!r})")
            elif key not in expected:
                out.append(f"{where}: unexpected in checkpoint ({found[key]!r})")
            else:
                out += config_differences(expected[key], found[key], where)
        return out
    if isinstance(expected, (list, tuple)) and isinstance(found, (list, tuple)):
        if len(expected) == len(found):
            return [
                d
                for i, (a, b) in enumerate(zip(expected, found))
                for d in config_differences(a, b, f"{prefix}[{i}]")
            ]
    return [] if expected == found else [f"{prefix}: expected {expected!r}, found {found!r}"]


def state_dict_problems(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches, all found before loading any."""
    own = model.state_dict()
    problems = [f"missing key {k}" for k in own if k not in state]
    problems += [f"unexpected key {k}" for k in state if k not in own]
    problems += [
        f"shape mismatch for {k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    return problems


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    problems = state_dict_problems(model, state)
    if problems:
        shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise ValueError(f"{source} does not fit this model ({len(problems)} problems):\n  {shown}")
    model.load_state_dict(state)


def submodule_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    prefix = prefix.rstrip(".") + "."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
