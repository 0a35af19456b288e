"""Where a post-trained tokenizer comes from, and the check that its codes still mean the same.

Decoder post-training (RobusTok) changes only the decoder side of a tokenizer; the parts that turn
images into codes and codes into latents (``CODE_PARTS``: encoder, input projection, quantizer with
its codebook) stay frozen, so a generator trained on the source tokenizer's codes keeps working.
The post-trained checkpoint (and its export) records, under ``source_tokenizer``, the identity of
the tokenizer it started from (path, SHA-256 of the checkpoint file, EMA or not) and ``code_hash``:
a SHA-256 over every tensor of the code-defining parts. A tokenizer is accepted in place of the
source when the recorded source is the generator's tokenizer AND the code hash recomputed from its
own weights still matches, which a retrained or edited encoder/codebook cannot pass.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vistok.common.checkpoints import read_checkpoint

CODE_PARTS = ("encoder", "proj_in", "quantizer")
SOURCE_KEY = "source_tokenizer"


class CodeDrift(ValueError):
    """The code-defining parts of a post-trained tokenizer differ from its source's."""


def code_state(tokenizer: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor (parameters and persistent buffers) of the code-defining parts."""
    prefixes = tuple(f"{p}." for p in CODE_PARTS)
    return {k: v for k, v in tokenizer.state_dict().items() if k.startswith(prefixes)}


def code_hash(tokenizer: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``code_state``, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(code_state(tokenizer).items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def recorded_source(path: str | Path) -> dict[str, Any] | None:
    """The ``source_tokenizer`` entry of a checkpoint or exported folder, None when absent."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return read_checkpoint(path).get(SOURCE_KEY)
    from vistok.common.hub import CONFIG, resolve_folder

    try:
        config = resolve_folder(path) / CONFIG  # a folder, or a Hub id (cached download)
    except FileNotFoundError:
        return None
    return json.loads(config.read_text()).get(SOURCE_KEY) if config.is_file() else None


def source_config(path: str | Path) -> dict[str, Any]:
    """The tokenizer config (class_path/init_args) of a tokenizer checkpoint or exported folder,
    so that a post-training config names the tokenizer by checkpoint and never repeats it."""
    if str(path).endswith(".ckpt"):
        config = (read_checkpoint(path).get("hyper_parameters") or {}).get("tokenizer")
    else:
        from vistok.common.hub import read_config, resolve_folder

        config = read_config(resolve_folder(path), "tokenizer")["model"]
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"{path} is not a tokenizer checkpoint (no hyper_parameters.tokenizer)")
    return config


def load_source(tokenizer: nn.Module, path: str | Path, ema: bool = True) -> dict[str, Any]:
    """Copy the weights of the tokenizer checkpoint ``path`` into ``tokenizer`` (its EMA weights
    when ``ema`` and present: the weights codes are extracted with by default) and return the
    source identity to record. A checkpoint that is itself post-trained passes on its own source,
    so the lineage always names the tokenizer the generator was trained on."""
    from vistok.data.codes import read_tokenizer

    loaded = read_tokenizer(path, ema=ema)
    if loaded.tokenizer.config != tokenizer.config:
        raise ValueError(f"{path} holds another tokenizer configuration than the one to train")
    tokenizer.load_state_dict(loaded.tokenizer.state_dict())
    inherited = recorded_source(path)
    if inherited is not None:
        if inherited["code_hash"] != code_hash(tokenizer):
            raise CodeDrift(f"{path}: its code-defining weights differ from its recorded source")
        return inherited
    return {**loaded.identity, "code_hash": code_hash(tokenizer)}


def verify_codes_unchanged(tokenizer: nn.Module, source: dict[str, Any], when: str) -> None:
    found = code_hash(tokenizer)
    if found != source["code_hash"]:
        raise CodeDrift(
            f"{when}: the encoder / quantizer / codebook changed during post-training (code hash "
            f"{found[:12]}, source {source['code_hash'][:12]}); the generator's codes would no "
            "longer mean what they meant"
        )


def derived_from(tokenizer: nn.Module, path: str | Path, recorded: dict[str, Any]) -> bool:
    """Whether ``tokenizer`` (loaded from ``path``) was post-trained from the tokenizer a generator
    recorded (``recorded``: its path, sha256, ema) with its code-defining parts unchanged.

    False when ``path`` records no source or another one; ``TokenizerMismatch`` when it names the
    right source but its code-defining weights no longer hash to the recorded value."""
    from vistok.generators.inference import TokenizerMismatch

    source = recorded_source(path)
    if source is None or source.get("sha256") != recorded.get("sha256"):
        return False
    if "ema" in recorded and bool(source.get("ema")) != bool(recorded["ema"]):
        return False
    try:
        verify_codes_unchanged(tokenizer, source, str(path))
    except CodeDrift as e:
        raise TokenizerMismatch(str(e)) from e
    return True


def load_derived(path: str | Path, recorded: dict[str, Any], device="cpu"):
    """The tokenizer at ``path`` (a ``TokenizerCheckpoint``, its identity naming its source) if it
    was post-trained from the ``recorded`` tokenizer with its codes unchanged, else None."""
    from vistok.data.codes import TokenizerCheckpoint, read_tokenizer

    source = recorded_source(path)
    if source is None or source.get("sha256") != recorded.get("sha256"):
        return None
    tok = read_tokenizer(path, device=device)
    if not derived_from(tok.tokenizer, path, recorded):
        return None
    return TokenizerCheckpoint(tok.tokenizer, {**tok.identity, SOURCE_KEY: source})
