"""diffusers ``AutoencoderKL`` folders -> vistok :class:`DiffusersKL` tokenizer.

The folder is what ``AutoencoderKL.save_pretrained`` writes (``config.json`` and
``diffusion_pytorch_model.safetensors``, or ``.bin`` read with ``weights_only=True``), e.g.
stabilityai/sd-vae-ft-ema, sd-vae-ft-mse, sdxl-vae, or FLUX.1's ``vae/`` subfolder. The nets are
diffusers' own modules, so the weights keep their names; only ``quant_conv`` /
``post_quant_conv`` (1x1 convs) become the tokenizer's channel projections, and the attention
names of checkpoints saved before diffusers 0.14 (query/key/value/proj_attn) are renamed the way
diffusers renames them on load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from typing_extensions import Unpack

from vistok.convert.common import (
    ConversionError,
    Options,
    State,
    fit_state,
    option_values,
    read_checkpoint,
    write_export,
)
from vistok.tokenizers.diffusers_vae import DIFFUSERS_VAE_PRESETS, DiffusersKL

FORMAT = "diffusers-vae"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"{folder} has no config.json: give the folder AutoencoderKL.save_pretrained wrote "
            "(for FLUX, its vae/ subfolder)"
        )
    config = json.loads(path.read_text())
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConversionError(f"{path} describes a {config['_class_name']}, not an AutoencoderKL")
    blocks = [*config.get("down_block_types", []), *config.get("up_block_types", [])]
    unsupported = [b for b in blocks if b not in ("DownEncoderBlock2D", "UpDecoderBlock2D")]
    if unsupported:
        raise ConversionError(f"{path}: block type {unsupported[0]!r} is not supported")
    if config.get("use_quant_conv", True) != config.get("use_post_quant_conv", True):
        raise ConversionError(f"{path}: use_quant_conv and use_post_quant_conv differ")
    if (config.get("in_channels", 3), config.get("out_channels", 3)) != (3, 3):
        raise ConversionError(f"{path}: only RGB (3-channel) VAEs are supported")
    return config


def build(config: dict, resolution: int) -> DiffusersKL:
    """The tokenizer for this config, named by its preset when it is one."""
    args = dict(
        latent_channels=config.get("latent_channels", 4),
        block_out_channels=list(config.get("block_out_channels", [64])),
        layers_per_block=config.get("layers_per_block", 1),
        norm_num_groups=config.get("norm_num_groups", 32),
        use_quant_conv=config.get("use_quant_conv", True),
        scaling_factor=config.get("scaling_factor", 0.18215),
        shift_factor=config.get("shift_factor"),
    )
    extra = dict(
        act_fn=config.get("act_fn", "silu"),
        mid_block_add_attention=config.get("mid_block_add_attention", True),
    )
    for name, preset in DIFFUSERS_VAE_PRESETS.items():
        if preset == args:
            return DiffusersKL(preset=name, resolution=resolution, **extra)
    return DiffusersKL(resolution=resolution, **args, **extra)


def vistok_key(key: str) -> str:
    key = re.sub(r"^quant_conv\.", "proj_in.", key)
    key = re.sub(r"^post_quant_conv\.", "proj_out.", key)
    m = re.match(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$", key)
    return f"{m.group(1)}{_OLD_ATTENTION[m.group(2)]}.{m.group(3)}" if m else key


def convert(checkpoint: str, out: str, **options: Unpack[Options]) -> Path:
    ema, tokenizer, resolution = option_values(**options)
    if ema or tokenizer is not None:
        raise ConversionError(
            "a diffusers VAE folder holds one set of weights and is a tokenizer: "
            "drop --ema/--tokenizer (sd-vae-ft-ema is itself the EMA release)"
        )
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise ConversionError(f"{checkpoint} is not a folder: give the AutoencoderKL folder")
    config = read_config(folder)
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise ConversionError(f"{folder} has none of {', '.join(WEIGHT_FILES)}")
    state: State = read_checkpoint(weights, FORMAT)
    model = build(config, resolution or config.get("sample_size", 256))
    # 1x1 conv kernels (O, I, 1, 1) -> the projections' Linear weights (O, I).
    source = {
        k: v.flatten(1) if re.match(r"^(post_)?quant_conv\.weight$", k) else v
        for k, v in state.items()
    }
    fitted = fit_state(model, source, vistok_key, FORMAT, str(weights))
    with torch.no_grad():
        model.load_state_dict(fitted, strict=True)
    info = {"info": model.describe(), "weights": "raw"}
    return write_export(model.eval(), out, "tokenizer", weights, info)
