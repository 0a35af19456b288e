"""diffusers' AutoencoderKL encoder and decoder as vistok nets.

The modules ARE diffusers' ``Encoder`` / ``Decoder`` (``diffusers.models.autoencoders.vae``), so a
released VAE's weights load under their own names and compute exactly what diffusers computes;
these subclasses only add what vistok's :class:`~vistok.tokenizers.tokenizer.Tokenizer` reads
(``z_channels``, ``downsample``, ``last_layer``) and record their typed constructor arguments.
"""

from __future__ import annotations

from typing import TypedDict

from diffusers.models.autoencoders.vae import Decoder, Encoder
from torch import Tensor
from typing_extensions import Unpack

from vistok.common.configurable import Configurable


class VAESizes(TypedDict, total=False):
    """The sizes of a DownEncoderBlock2D / UpDecoderBlock2D autoencoder (diffusers' names)."""

    latent_channels: int
    block_out_channels: list[int]
    layers_per_block: int
    norm_num_groups: int


class VAENetArgs(VAESizes, total=False):
    """What the encoder and the decoder both take; absent keys take SD-VAE's values."""

    act_fn: str
    mid_block_add_attention: bool


# SD-VAE / SDXL-VAE / FLUX-VAE (apart from FLUX's 16 latent channels).
SD_VAE_NETS = VAENetArgs(
    latent_channels=4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    mid_block_add_attention=True,
)


def _diffusers_args(arch: VAENetArgs, block_types: str, block: str) -> dict:
    """diffusers' keyword arguments for ``arch``, every level a ``block``."""
    args = {**SD_VAE_NETS, **arch}
    args["block_out_channels"] = tuple(args["block_out_channels"])
    args[block_types] = (block,) * len(args["block_out_channels"])
    return args


class DiffusersEncoder(Configurable, Encoder):
    """Images (B, 3, H, W) -> (mean, logvar) on 2 * latent_channels, (B, 2C, H/f, W/f)."""

    def __init__(self, in_channels: int = 3, **arch: Unpack[VAENetArgs]):
        args = _diffusers_args(arch, "down_block_types", "DownEncoderBlock2D")
        latent_channels = args.pop("latent_channels")
        super().__init__(in_channels, latent_channels, double_z=True, **args)
        self.z_channels = 2 * latent_channels
        self.downsample = 2 ** (len(self.down_blocks) - 1)


class DiffusersDecoder(Configurable, Decoder):
    """Latents (B, latent_channels, h, w) -> images (B, 3, h*f, w*f)."""

    def __init__(self, out_channels: int = 3, **arch: Unpack[VAENetArgs]):
        args = _diffusers_args(arch, "up_block_types", "UpDecoderBlock2D")
        latent_channels = args.pop("latent_channels")
        super().__init__(latent_channels, out_channels, **args)
        self.z_channels = latent_channels

    @property
    def last_layer(self) -> Tensor:
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        return super().forward(z)
