"""Starting decoder post-training (RobusTok) from a trained tokenizer.

Only the decoder side trains; the code-defining parts stay frozen and their hash is recorded, so
a generator trained on the source tokenizer's codes keeps working. The identity and lineage
checks (``source_tokenizer``, ``code_hash``, ``CodeDrift``) live in
``vistok.tokenizers.checkpoint``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from vistok.common.checkpoints import read_checkpoint
from vistok.common.hub import read_config, resolve_folder
from vistok.tokenizers.checkpoint import CodeDrift, code_hash, read_tokenizer, recorded_source


def source_config(path: str | Path) -> dict[str, Any]:
    """The tokenizer config (class_path/init_args) of a tokenizer checkpoint or exported folder,
    so that a post-training config names the tokenizer by checkpoint and never repeats it."""
    if str(path).endswith(".ckpt"):
        config = (read_checkpoint(path).get("hyper_parameters") or {}).get("tokenizer")
    else:
        config = read_config(resolve_folder(path), "tokenizer")["model"]
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"{path} is not a tokenizer checkpoint (no hyper_parameters.tokenizer)")
    return config


def load_source(tokenizer: nn.Module, path: str | Path, ema: bool = True) -> dict[str, Any]:
    """Copy the weights of the tokenizer checkpoint ``path`` into ``tokenizer`` (its EMA weights
    when ``ema`` and present: the weights codes are extracted with by default) and return the
    source identity to record. A checkpoint that is itself post-trained passes on its own source,
    so the lineage always names the tokenizer the generator was trained on."""
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
