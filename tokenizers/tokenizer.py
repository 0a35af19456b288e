"""The tokenizer: encoder -> quantizer -> decoder, as one plain nn.Module.

Images are NCHW in [-1, 1]. The family files (``vq.py``, ``wetok.py``, ``binary.py``,
``gaussian.py``) subclass :class:`Tokenizer` with typed arguments and named presets; any other
combination of parts can be built directly from ``class_path``/``init_args`` configs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vistok.common.configurable import Configurable
from vistok.tokenizers.nets.cnn import CNNArgs, Decoder, Encoder
from vistok.tokenizers.quantizers.base import CodeSpace, Quantizer, QuantizerOutput


class ChannelLinear(nn.Linear):
    """A 1x1 convolution for any number of spatial dims: maps dim 1 of (B, C, *spatial)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class Tokenizer(Configurable, nn.Module):
    """encoder -> proj_in -> quantizer -> proj_out -> decoder.

    ``proj_in``/``proj_out`` adapt the encoder and decoder widths to what the quantizer takes and
    gives, so any quantizer fits any pair of nets. ``project=False`` leaves them out (identity)
    for models whose nets already have the quantizer's width (WeTok's released models have none).
    """

    def __init__(
        self,
        encoder: nn.Module,
        quantizer: Quantizer,
        decoder: nn.Module,
        resolution: int = 256,
        z_channels: int | None = None,
        project: bool = True,
    ):
        super().__init__()
        self.encoder, self.quantizer, self.decoder = encoder, quantizer, decoder
        self.resolution = resolution
        z = z_channels or encoder.z_channels
        q_in, q_out = quantizer.in_channels, quantizer.code_space.channels
        if project:
            self.proj_in = ChannelLinear(z, q_in)
            self.proj_out = ChannelLinear(q_out, decoder.z_channels)
        elif (z, q_out) != (q_in, decoder.z_channels):
            raise ValueError(
                f"project=False needs the encoder to give what the quantizer takes ({z} vs "
                f"{q_in} channels) and the decoder to take what it gives ({decoder.z_channels} "
                f"vs {q_out})"
            )
        else:
            self.proj_in, self.proj_out = nn.Identity(), nn.Identity()

    # --- what generators read --------------------------------------------------------------
    @property
    def code_space(self) -> CodeSpace:
        return self.quantizer.code_space

    @property
    def token_shape(self) -> tuple[int, ...]:
        """Spatial shape of the code map for an image at ``self.resolution``."""
        side = self.resolution // self.encoder.downsample
        return (side, side)

    @property
    def last_layer(self) -> Tensor:
        return self.decoder.last_layer

    # --- encode / decode -------------------------------------------------------------------
    def pre_quant(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> what the quantizer takes (B, C_q, h, w)."""
        return self.proj_in(self.encoder(images))

    def quantize(self, images: Tensor) -> QuantizerOutput:
        return self.quantizer(self.pre_quant(images))

    def decode(
        self, latents: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Quantized latents (B, C, h, w) -> images (B, 3, H, W)."""
        z = self.proj_out(latents)
        if getattr(self.decoder, "noise_channels", 0):
            return self.decoder(z, noise=noise, generator=generator)
        return self.decoder(z)

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, QuantizerOutput]:
        out = self.quantize(images)
        return self.decode(out.quantized, generator=generator), out

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images -> codes (discrete) or latents (continuous, deterministic in eval mode)."""
        return self.quantize(images).codes

    tokenize = encode

    @torch.no_grad()
    def detokenize(self, codes: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.decode(self.quantizer.codes_to_latents(codes), generator=generator)

    def describe(self) -> dict[str, Any]:
        return {
            "family": type(self).__name__,
            "resolution": self.resolution,
            "token_shape": list(self.token_shape),
            "code_space": self.code_space.to_dict(),
            "parameters": sum(p.numel() for p in self.parameters()),
        }


class ConvArgs(CNNArgs, total=False):
    """Arguments of the CNN encoder/decoder pair (see ``nets/cnn.py``), as a family takes them.

    A family extends it with the rest of what its presets set (``VQArgs``, ``WeTokArgs``, ...) and
    takes it as ``**sizes``: a key left out means the preset's value (and stays out of the
    recorded config); arguments with a real default stay explicit in the signature.
    """

    down_padding: str  # encoder only
    decoder_res_blocks: int  # decoder only: ResBlocks per level (default num_res_blocks)


def conv_nets(
    cfg: dict[str, Any], encoder_options: dict[str, Any] | None = None, **decoder_options: Any
) -> tuple[nn.Module, nn.Module]:
    """The CNN encoder and its mirrored decoder from a resolved family config."""
    own = ("down_padding", "decoder_res_blocks")
    shared = {k: cfg[k] for k in ConvArgs.__annotations__ if k in cfg and k not in own}
    encoder_options = {**{k: cfg[k] for k in own[:1] if k in cfg}, **(encoder_options or {})}
    encoder = Encoder(**shared, **encoder_options)
    if cfg.get("decoder_res_blocks") is not None:
        shared["num_res_blocks"] = cfg["decoder_res_blocks"]
    return encoder, Decoder(**shared, **decoder_options)


def resolve_preset(presets: dict[str, dict], preset: str, **given: Any) -> dict[str, Any]:
    """The preset's values, overridden by every argument that is not None."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
    return {**presets[preset], **{k: v for k, v in given.items() if v is not None}}
