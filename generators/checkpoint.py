"""Reading a generator: the net from an ``ARModule`` / ``DiffusionModule`` run checkpoint or an
exported folder / Hub id, with its identity and the tokenizer identity it was trained with (which
``vistok.tokenizers.checkpoint.resolve_tokenizer`` turns back into that tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from vistok.common.checkpoints import file_sha256, load_strict, read_checkpoint, submodule_state
from vistok.common.configurable import instantiate
from vistok.common.ema import load_averages
from vistok.common.hub import WEIGHTS, load_pretrained, resolve_folder
from vistok.generators.ar import GPT

# Training-checkpoint hyper-parameters that hold the net's config (AR, diffusion); the weights
# are under ``net.`` in both (``GeneratorModule.net``).
NET_KEYS = ("gpt_config", "generator_config")


class GeneratorCheckpoint(NamedTuple):
    model: Any  # GPT, FlowMatching or BinaryDiffusion, eval mode
    hparams: dict[str, Any]
    identity: dict[str, Any]  # path, sha256, ema

    @property
    def gpt(self) -> GPT:
        return self.model


def load_generator(path: str, ema: bool | None = None, device="cpu") -> GeneratorCheckpoint:
    """The generator net (eval mode) from an ``ARModule`` / ``DiffusionModule`` checkpoint (EMA
    weights by default when present), or from an exported folder / Hub id (with the weights it
    was exported with)."""
    if not str(path).endswith(".ckpt"):
        folder = resolve_folder(path)
        gpt, config = load_pretrained(folder, kind="generator", device=device)
        recorded = {**config["tokenizer_identity"], "folder": str(folder / "tokenizer")}
        identity = {
            "path": str(folder),
            "sha256": file_sha256(folder / WEIGHTS),
            "ema": config.get("weights") == "ema",
        }
        return GeneratorCheckpoint(gpt, {"tokenizer_identity": recorded}, identity)
    ckpt = read_checkpoint(path)
    hp = ckpt.get("hyper_parameters") or {}
    key = next((k for k in NET_KEYS if k in hp), None)
    if key is None or "tokenizer_identity" not in hp:
        raise ValueError(f"{path} is not a generator checkpoint (no gpt_config/generator_config)")
    gpt = instantiate(hp[key])
    state = ckpt["state_dict"]
    load_strict(gpt, submodule_state(state, "net"), str(path))
    if ema is False:
        use_ema = False
    else:
        use_ema = load_averages(gpt, state, str(path))
        if ema and not use_ema:
            raise ValueError(f"{path} has no EMA weights (trained without ema_decay)")
    identity = {"path": str(Path(path).resolve()), "sha256": file_sha256(path), "ema": use_ema}
    return GeneratorCheckpoint(gpt.eval().requires_grad_(False).to(device), hp, identity)
