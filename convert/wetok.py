"""WeTok Lightning checkpoints -> vistok WeTok tokenizer.

WeTok's ``VQModel`` (public ``src/WeTok/models/lfqgan.py``) saves ``state_dict`` with
``encoder.*``, ``decoder.*`` (``Decoder`` or, after generative decoding, ``GANDecoder`` whose
``conv_in`` takes latent + noise), the discriminator and LPIPS under ``loss.*`` (ignored), and
with ``use_ema`` LitEma's shadows as ``model_ema.<parameter name without dots>`` plus
``model_ema.decay`` / ``model_ema.num_updates``. The GFQ quantizer holds no weights.

The architecture is read from the shapes (width, channel multipliers, res blocks, mid blocks,
latent bits, generative decoder) and must be WeTok's: a key or shape that does not fit is refused
by name. The number of groups is not stored in the weights: every released WeTok model uses
groups of 8 bits (``n_embed: 256``), which is assumed unless the checkpoint's
``hyper_parameters`` say otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor
from typing_extensions import Unpack

from vistok.common.configurable import instantiate
from vistok.convert.common import (
    ConversionError,
    Options,
    fit_state,
    option_values,
    read_checkpoint,
    write_export,
)
from vistok.tokenizers.wetok import WETOK_PRESETS, WeTok

FORMAT = "wetok"
BITS_PER_GROUP = 8  # n_embed 256 in every released WeTok config
IGNORED = ("loss.", "model_ema.", "quantize.")


def _count(state: dict[str, Tensor], pattern: str) -> int:
    found = {m.group(1) for k in state if (m := re.match(pattern, k))}
    return len(found)


def read_architecture(state: dict[str, Tensor], where: str) -> dict:
    """WeTok constructor arguments from the encoder/decoder shapes."""
    try:
        channels = state["encoder.conv_in.weight"].shape[0]
        levels = _count(state, r"encoder\.down\.(\d+)\.")
        mult = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
        num_res_blocks = _count(state, r"encoder\.down\.0\.block\.(\d+)\.")
        bits = state["encoder.conv_out.weight"].shape[0]
        decoder_in = state["decoder.conv_in.weight"].shape[1]
    except KeyError as e:
        raise ConversionError(
            f"{where}: no {e.args[0]!r}: not a WeTok checkpoint (expected WeTok's VQModel "
            "state_dict with encoder.down.*, encoder.conv_out, decoder.conv_in, ...)"
        ) from e
    if levels == 0 or any(m % channels for m in mult) or decoder_in not in (bits, 2 * bits):
        raise ConversionError(f"{where}: encoder/decoder shapes do not form a WeTok model")
    return dict(
        channels=channels,
        channel_mult=[m // channels for m in mult],
        num_res_blocks=num_res_blocks,
        num_mid_blocks=_count(state, r"encoder\.mid_block\.(\d+)\."),
        bits=bits,
        generative=decoder_in == 2 * bits,
    )


def _groups(ckpt: dict, bits: int) -> int:
    hp = ckpt.get("hyper_parameters") or {}
    if "num_codebooks" in hp:
        return int(hp["num_codebooks"])
    if bits % BITS_PER_GROUP:
        raise ConversionError(f"{bits} latent bits is not a whole number of WeTok's 8-bit groups")
    return bits // BITS_PER_GROUP


def build(arch: dict, groups: int, resolution: int) -> WeTok:
    """The WeTok tokenizer of this architecture, named by its preset when it is one."""
    arch = dict(arch)
    generative = arch.pop("generative")
    preset = next(
        (
            name
            for name, p in WETOK_PRESETS.items()
            if {k: p[k] for k in ("channels", "channel_mult", "num_res_blocks", "bits", "groups")}
            == {
                **{k: arch[k] for k in ("channels", "channel_mult", "num_res_blocks", "bits")},
                "groups": groups,
            }  # fmt: skip
            and arch["num_mid_blocks"] == arch["num_res_blocks"]
        ),
        None,
    )
    if preset is not None:
        return WeTok(preset=preset, resolution=resolution, generative=generative)
    # Off-preset widths (the reduced-width fixtures) keep WeTok's 32 groups at every width.
    return WeTok(
        resolution=resolution, groups=groups, generative=generative, norm_groups=32, **arch
    )


def vistok_key(key: str, levels: int) -> str:
    """WeTok's parameter name -> vistok's (decoder levels are stored in processing order)."""
    key = key.replace("nin_shortcut", "shortcut")
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.levels.\1.blocks.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.levels.\1.down.conv.", key)
    key = re.sub(r"^(encoder|decoder)\.mid_block\.", r"\1.mid.layers.", key)

    def level(m: re.Match) -> str:
        return f"decoder.levels.{levels - 1 - int(m.group(1))}."

    key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.conv1\.", lambda m: level(m) + "up.conv.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: level(m) + "blocks.", key)
    key = re.sub(r"^decoder\.adaptive\.(\d+)\.gamma\.", lambda m: level(m) + "norm.to_scale.", key)
    key = re.sub(r"^decoder\.adaptive\.(\d+)\.beta\.", lambda m: level(m) + "norm.to_bias.", key)
    return key


def ema_weights(state: dict[str, Tensor], names: list[str], where: str) -> dict[str, Tensor]:
    """LitEma's shadow of each named parameter (its key is the name with the dots removed)."""
    flat = [n.replace(".", "") for n in names]
    if len(set(flat)) != len(flat):
        raise ConversionError(f"{where}: LitEma names collide once dots are removed")
    if not any(k.startswith("model_ema.") for k in state):
        raise ConversionError(
            f"{where} has no model_ema.* weights (trained without use_ema): convert without --ema"
        )
    missing = [n for n, f in zip(names, flat) if f"model_ema.{f}" not in state]
    if missing:
        raise ConversionError(
            f"{where}: no EMA weight model_ema.{missing[0].replace('.', '')} for {missing[0]!r}"
        )
    return {n: state[f"model_ema.{f}"] for n, f in zip(names, flat)}


def convert(checkpoint: str, out: str, **options: Unpack[Options]) -> Path:
    ema, tokenizer, resolution = option_values(**options)
    if tokenizer is not None:
        raise ConversionError("--tokenizer is for generator formats; a WeTok file is a tokenizer")
    ckpt = read_checkpoint(checkpoint, FORMAT)
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise ConversionError(
            f"{checkpoint} has no 'state_dict': not a WeTok Lightning checkpoint (top-level keys "
            f"{sorted(ckpt)[:5]})"
        )
    arch = read_architecture(state, checkpoint)
    model_keys = [k for k in state if not k.startswith(IGNORED)]
    with torch.device("meta"):  # shapes only; the real tensors come from the checkpoint
        model = build(arch, _groups(ckpt, arch["bits"]), resolution or 256)
    weights = ema_weights(state, model_keys, checkpoint) if ema else state
    source = {k: weights[k] for k in model_keys}
    levels = len(arch["channel_mult"])
    fitted = fit_state(model, source, lambda k: vistok_key(k, levels), FORMAT, checkpoint)
    model.load_state_dict(fitted, strict=True, assign=True)
    model.quantizer = instantiate(model.quantizer.config)  # weightless: its buffers for real
    info = {"info": model.describe(), "weights": "ema" if ema else "raw"}
    return write_export(model.eval(), out, "tokenizer", checkpoint, info)
