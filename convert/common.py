"""What every reference-checkpoint converter shares: safe reading, key mapping with shape
validation, and writing an ordinary vistok export folder.

A converter reads the reference's state dict, infers the architecture from its shapes, builds the
vistok module with those arguments, renames every reference key onto it (``rename``) and fills it
(``fill_state``): a key no rule knows, a shape the module does not have, or a module tensor no
key fills is an error that names it. Nothing is unpickled (``weights_only=True``).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypedDict

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from typing_extensions import Unpack

from vistok.common.checkpoints import file_sha256
from vistok.common.export import write_card
from vistok.common.hub import save_pretrained

State = dict[str, Tensor]


class ConversionError(ValueError):
    """The checkpoint is not one the chosen format can convert; the message says what to do."""


class Options(TypedDict, total=False):
    """What ``python -m vistok.convert`` passes every converter besides the checkpoint and the
    output folder; each converter refuses those that do not apply to its format."""

    ema: bool  # convert the EMA weights (default False)
    tokenizer: str | None  # generators: the converted tokenizer folder they model
    resolution: int | None  # tokenizers: the image size (default: the reference's)


def option_values(**options: Unpack[Options]) -> tuple[bool, str | None, int | None]:
    """(ema, tokenizer, resolution) with their defaults; a misspelt option is refused."""
    unknown = sorted(set(options) - set(Options.__annotations__))
    if unknown:
        raise TypeError(f"unknown converter options {unknown}: use {list(Options.__annotations__)}")
    return options.get("ema", False), options.get("tokenizer"), options.get("resolution")


def read_checkpoint(path: str | Path, fmt: str) -> dict[str, Any]:
    """A checkpoint's top-level dict: ``torch.load(weights_only=True)``, or a safetensors file.
    Unreadable files are refused with the reason and what to do (nothing is unpickled beyond
    plain tensors)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} does not exist: give the {fmt} checkpoint file")
    try:
        if path.suffix == ".safetensors":
            ckpt = load_file(str(path))
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{path} holds Python objects besides tensors (training checkpoints often keep their "
            f"argparse 'args'), which are never unpickled here: {str(e).splitlines()[0]}. In an "
            "environment you trust, re-save only the weights, e.g. "
            "torch.save({'model': ckpt['model']}, 'weights.pt'), and convert that file."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, SafetensorError) as e:
        raise ConversionError(
            f"cannot read {path} ({str(e).splitlines()[0]}): the file is truncated or corrupt, or "
            "is not a PyTorch or safetensors checkpoint. Download it again and compare its size "
            "and SHA-256 with the published ones; a file that fails once you download it again "
            f"is not a {fmt} checkpoint."
        ) from e
    if not isinstance(ckpt, dict):
        raise ConversionError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def state_entry(ckpt: dict[str, Any], key: str, path: str | Path, fmt: str) -> State:
    """``ckpt[key]`` as a state dict of tensors, or an error saying what the file looks like."""
    state = ckpt.get(key)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        hint = ""
        if "state_dict" in ckpt:
            hint = " It looks like a Lightning checkpoint (a WeTok one converts with format wetok)."
        elif "model" in ckpt:
            hint = " It looks like a LlamaGen checkpoint (formats llamagen-vq, llamagen-gpt)."
        raise ConversionError(
            f"{path} has no {key!r} state dict (top-level keys: {sorted(ckpt)[:8]}), so it is not "
            f"a {fmt} checkpoint.{hint} Choose the format that matches the file."
        )
    return state


def require(state: State, key: str, path: str | Path, fmt: str) -> Tensor:
    if key not in state:
        raise ConversionError(
            f"{path} has no {key}, so it does not have the {fmt} layout (first keys: "
            f"{list(state)[:4]}). Choose the format that matches the file."
        )
    return state[key]


def count_indexed(state: State, prefix: str) -> int:
    """How many consecutive ``{prefix}{i}.`` groups of keys there are, from i = 0."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in state):
        n += 1
    return n


def rename(
    state: State,
    rules: Iterable[tuple[str, str]],
    ignored: Iterable[str],
    path: str | Path,
    fmt: str,
) -> tuple[State, dict[str, str]]:
    """Map reference keys onto module keys: the first rule whose regex fully matches the key gives
    the new key (``re`` replacement syntax); keys matching an ``ignored`` regex are dropped.

    Returns the renamed state and, per new key, the reference key it came from (for errors). A key
    that matches nothing is refused by name."""
    rules = [(re.compile(p), r) for p, r in rules]
    ignored = [re.compile(p) for p in ignored]
    out, sources = {}, {}
    for key, value in state.items():
        if any(p.fullmatch(key) for p in ignored):
            continue
        for pattern, repl in rules:
            if pattern.fullmatch(key):
                new = pattern.sub(repl, key)
                out[new], sources[new] = value, key
                break
        else:
            raise ConversionError(
                f"{path}: key {key} {tuple(value.shape)} fits no supported {fmt} layout. The "
                "checkpoint comes from another model or version; choose the matching format."
            )
    return out, sources


def fill_state(
    module: nn.Module,
    state: State,
    sources: dict[str, str],
    path: str | Path,
    fmt: str,
    fresh: tuple[str, ...] = (),
) -> None:
    """Load ``state`` into ``module`` after checking that it fits exactly: every key exists with
    the same shape, and every module tensor is filled except the training-state buffers named
    in ``fresh`` (suffixes), which keep their initial values."""
    own = module.state_dict()
    for key, value in state.items():
        src = sources.get(key, key)
        if key not in own:
            raise ConversionError(f"{path}: {src} has no place in the {fmt} layout read from it")
        if tuple(value.shape) != tuple(own[key].shape):
            raise ConversionError(
                f"{path}: {src} has shape {tuple(value.shape)}, but the {fmt} architecture read "
                f"from the checkpoint's other shapes needs {tuple(own[key].shape)}: the file "
                "mixes layouts or is not a supported variant."
            )
    missing = [k for k in own if k not in state and not k.endswith(fresh)]
    if missing:
        raise ConversionError(
            f"{path}: no weights for {missing[0]} ({len(missing)} missing): the checkpoint is "
            f"incomplete or not a {fmt} checkpoint."
        )
    module.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in state.items()}})


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
    module: nn.Module, out: str | Path, kind: str, checkpoint: str | Path, info: dict[str, Any]
) -> Path:
    """Write ``module`` as an ordinary export folder (weights, config.json, model card) whose
    source is the reference checkpoint (name and SHA-256)."""
    info = {
        "source": Path(checkpoint).name,
        "source_sha256": file_sha256(checkpoint),
        "global_step": None,
        "training_data": "the reference's release, converted with python -m vistok.convert",
        **info,
    }
    folder = save_pretrained(module, out, kind, info)
    write_card(folder)
    return folder
