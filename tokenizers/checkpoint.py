"""Reading a tokenizer, and knowing which one it is: the one home for both.

``read_tokenizer`` rebuilds a frozen tokenizer from a ``TokenizerModule`` run checkpoint
(``.ckpt``, its EMA weights when asked for and present), an exported folder or a Hub id, together
with its identity: path, SHA-256 of the checkpoint file (for an export: of the checkpoint it was
exported from), ``class_path`` and whether EMA weights were used. Codes, generators and exports
record that identity, and ``resolve_tokenizer`` gives a generator back the tokenizer it recorded,
refusing another one (``TokenizerMismatch``).

Lineage. Decoder post-training (RobusTok, ``vistok.tokenizers.posttrain``) changes only the
decoder side; the parts that turn images into codes and codes into latents (``CODE_PARTS``:
encoder, input projection, quantizer with its codebook) stay frozen, so a generator trained on
the source tokenizer's codes keeps working. A post-trained checkpoint (and its export) records,
under ``source_tokenizer``, the identity of the tokenizer it started from and ``code_hash``: a
SHA-256 over every tensor of the code-defining parts. It is accepted in place of the source when
the recorded source is the generator's tokenizer AND the code hash recomputed from its own weights
still matches, which a retrained or edited encoder/codebook cannot pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from vistok.common.checkpoints import (
    file_sha256,
    load_strict,
    read_checkpoint,
    state_dict_problems,
    submodule_state,
)
from vistok.common.configurable import instantiate
from vistok.common.ema import load_averages
from vistok.common.hub import CONFIG, load_pretrained, resolve_folder

# The parts that turn images into codes and codes into latents (encoder, input projection,
# quantizer with its codebook); the stages after the first keep them frozen (and out of the EMA).
CODE_PARTS = ("encoder", "proj_in", "quantizer")
FROZEN_IN_STAGE = {
    "main": (),
    "generative_decoder": CODE_PARTS,
    "post_train": CODE_PARTS,
    "decoder_finetune": CODE_PARTS,  # MAETok stage 2
}
SOURCE_KEY = "source_tokenizer"  # where a post-trained tokenizer records its source


class TokenizerMismatch(ValueError):
    """The tokenizer is not the one the generator was trained for."""


class TokenizerCheckpoint(NamedTuple):
    tokenizer: Any  # vistok.tokenizers.tokenizer.Tokenizer, eval mode, frozen
    identity: dict[str, Any]  # path, sha256, class_path, ema


def read_tokenizer(
    path: str | os.PathLike, ema: bool = True, device: str | torch.device = "cpu"
) -> TokenizerCheckpoint:
    """Rebuild a tokenizer from a ``TokenizerModule`` checkpoint: its config from
    ``hyper_parameters["tokenizer"]``, its weights (``tokenizer.*``) loaded strictly, then the EMA
    averages (``ema.<parameter name>``) copied in when ``ema`` is set and the checkpoint has them.

    An exported folder (or Hub id) is read as exported; its identity is the checkpoint it was
    exported from, so codes and generators stay paired across export."""
    if not str(path).endswith(".ckpt"):
        tokenizer, config = load_pretrained(path, kind="tokenizer", device=device)
        identity = {
            "path": str(path),
            "sha256": config.get("source_sha256"),
            "class_path": config["model"]["class_path"],
            "ema": config.get("weights") == "ema",
        }
        return TokenizerCheckpoint(tokenizer, identity)
    ckpt = read_checkpoint(path)
    hparams = ckpt.get("hyper_parameters") or {}
    config = hparams.get("tokenizer")
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"{path} is not a tokenizer checkpoint (no hyper_parameters.tokenizer)")
    tokenizer = instantiate(config)
    state = ckpt["state_dict"]
    load_strict(tokenizer, submodule_state(state, "tokenizer"), str(path))
    used_ema = ema and load_averages(tokenizer, state, str(path))
    tokenizer.requires_grad_(False).eval().to(device)
    identity = {
        "path": str(Path(path).resolve()),
        "sha256": file_sha256(path),
        "class_path": config["class_path"],
        "ema": used_ema,
    }
    return TokenizerCheckpoint(tokenizer, identity)


def load_tokenizer_from_checkpoint(path: str | os.PathLike, ema: bool = True, device="cpu"):
    """The frozen tokenizer (eval mode, EMA weights when asked for and present)."""
    return read_tokenizer(path, ema, device).tokenizer


def load_tokenizer_weights(tokenizer: nn.Module, path: str | Path, stage: str = "main") -> None:
    """Initialise ``tokenizer`` from a tokenizer training checkpoint (e.g. WeTok stage 1).

    The checkpoint must hold the same tokenizer family; for the ``generative_decoder`` stage the
    decoder takes the stage-1 decoder with its extra noise inputs zero-initialised.
    """
    ckpt = read_checkpoint(path)
    found = ckpt.get("hyper_parameters", {}).get("tokenizer", {}).get("class_path")
    expected = tokenizer.config["class_path"]
    if found != expected:
        raise ValueError(f"{path} holds a {found!r} tokenizer, not a {expected!r}")
    state = submodule_state(ckpt["state_dict"], "tokenizer")
    if stage == "generative_decoder" and getattr(tokenizer.decoder, "noise_channels", 0):
        decoder_state = submodule_state(state, "decoder")
        rest = {k: v for k, v in state.items() if not k.startswith("decoder.")}
        own_rest = {k: v for k, v in tokenizer.state_dict().items() if not k.startswith("decoder.")}
        problems = [
            p
            for p in state_dict_problems(tokenizer, {**own_rest, **rest})
            if not p.startswith("missing key decoder.")
        ]
        if problems:
            raise ValueError(f"{path} does not fit this tokenizer: {problems[:20]}")
        tokenizer.load_state_dict({**tokenizer.state_dict(), **rest})
        tokenizer.decoder.load_stage1(decoder_state)
    else:
        load_strict(tokenizer, state, str(path))


# ---------------------------------------------------------------------------------------------
# Lineage of post-trained tokenizers


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
    try:
        config = resolve_folder(path) / CONFIG  # a folder, or a Hub id (cached download)
    except FileNotFoundError:
        return None
    return json.loads(config.read_text()).get(SOURCE_KEY) if config.is_file() else None


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
    source = recorded_source(path)
    if source is None or source.get("sha256") != recorded.get("sha256"):
        return None
    tok = read_tokenizer(path, device=device)
    if not derived_from(tok.tokenizer, path, recorded):
        return None
    return TokenizerCheckpoint(tok.tokenizer, {**tok.identity, SOURCE_KEY: source})


def resolve_tokenizer(recorded: dict, path: str | None = None, device="cpu") -> TokenizerCheckpoint:
    """The generator's tokenizer: ``path``, the one exported beside it, or the recorded one;
    refused if its hash (for an exported tokenizer: its source checkpoint's) differs, unless it
    was post-trained from the recorded one with its encoder and quantizer verified unchanged
    (``load_derived``)."""
    chosen = path or recorded.get("folder") or recorded["path"]
    exported = not str(chosen).endswith(".ckpt")
    if exported:
        tok = read_tokenizer(chosen, device=device)
        sha = str(tok.identity["sha256"])
    elif not Path(chosen).is_file():
        raise FileNotFoundError(
            f"tokenizer checkpoint {chosen} not found; pass --tokenizer (its sha256 must be "
            f"{recorded['sha256']})"
        )
    else:
        sha = file_sha256(chosen)
    if sha != recorded["sha256"]:
        derived = load_derived(chosen, recorded, device)  # post-trained from it, codes intact
        if derived is not None:
            return derived
        what = (
            f"was exported from a checkpoint with sha256 {sha[:12]}, not"
            if exported
            else f"(sha256 {sha[:12]}) is not"
        )
        raise TokenizerMismatch(
            f"tokenizer {chosen} {what} the one this generator was trained on ({recorded['path']}"
            f", sha256 {recorded['sha256'][:12]}). Its codes would mean something else; use the "
            "generator's tokenizer."
        )
    if exported:
        return tok
    return read_tokenizer(chosen, recorded.get("ema", True), device)
