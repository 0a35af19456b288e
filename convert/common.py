"""What every converter shares: reading a reference checkpoint safely, fitting its tensors to a
vistok model (refusing, with the first key or shape that does not fit), writing an export folder.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from vistok.common.checkpoints import file_sha256
from vistok.common.export import model_card
from vistok.common.hub import CARD, save_pretrained


class ConversionError(ValueError):
    """A reference checkpoint that does not fit the format it was given as."""


def read_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's top-level dict: ``torch.load(weights_only=True)``, or a safetensors file.

    Unreadable files are refused with what to do (never unpickled beyond plain tensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{path} holds objects that weights_only=True refuses to unpickle ({e}); load it "
            "in its own project and re-save its state dict as plain tensors"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, SafetensorError) as e:
        raise ConversionError(
            f"{path} cannot be read as a PyTorch or safetensors checkpoint ({e}); it is probably "
            "truncated or corrupt: download it again and compare its size/checksum"
        ) from e


def fit_state(
    model: nn.Module,
    source: dict[str, Tensor],
    rename: Callable[[str], str],
    fmt: str,
    where: str,
) -> dict[str, Tensor]:
    """``source`` renamed into ``model``'s keys, checked to fill it exactly.

    The first source key without a place, the first shape that differs, or the first model key
    left empty is named in the refusal."""
    own = model.state_dict()
    state: dict[str, Tensor] = {}
    for key, value in source.items():
        name = rename(key)
        if name not in own:
            raise ConversionError(
                f"{where}: key {key!r} has no place in a {fmt} model: the checkpoint is not in "
                f"the {fmt} layout (or a variant this converter does not support)"
            )
        if tuple(value.shape) != tuple(own[name].shape):
            raise ConversionError(
                f"{where}: {key!r} has shape {tuple(value.shape)} where the {fmt} layout read "
                f"from this checkpoint expects {tuple(own[name].shape)}"
            )
        state[name] = value.float() if value.is_floating_point() else value
    missing = [k for k in own if k not in state]
    if missing:
        raise ConversionError(
            f"{where}: the checkpoint has nothing for {missing[0]!r} "
            f"({len(missing)} tensors missing): it is incomplete or not a {fmt} checkpoint"
        )
    return state


def write_export(
    model: nn.Module, out: str | Path, card_info: dict[str, Any], kind: str = "tokenizer"
) -> Path:
    """An ordinary export folder (model.safetensors, config.json, README.md) for ``model``.

    ``card_info`` must hold ``source`` (the checkpoint path) and ``weights`` ("ema" or "raw"); the
    source's SHA-256 becomes the folder's identity, as for exports of vistok's own checkpoints."""
    source = Path(card_info["source"])
    info = {
        "info": model.describe(),
        "source_sha256": file_sha256(source),
        "global_step": None,
        "training_data": "not recorded (converted from a reference checkpoint)",
        **card_info,
        "source": source.name,
    }
    folder = save_pretrained(model, out, kind, info)
    config = json.loads((folder / "config.json").read_text())
    (folder / CARD).write_text(model_card(config, None, None))
    return folder
