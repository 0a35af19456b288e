"""diffusers' AutoencoderKL encoder and decoder as vistok nets.

The modules ARE diffusers' ``Encoder`` / ``Decoder`` (``diffusers.models.autoencoders.vae``), so a
released VAE's weights load under their own names and compute exactly what diffusers computes;
these subclasses only add what vistok's :class:`~vistok.tokenizers.tokenizer.Tokenizer` reads
(``z_channels``, ``downsample``, ``last_layer``) and record their typed constructor arguments.
"""

from __future__ import annotations

from diffusers.models.autoencoders.vae import Decoder, Encoder
from torch import Tensor

from vistok.common.configurable import Configurable

_BLOCK_OUT = [128, 256, 512, 512]  # SD-VAE / SDXL-VAE / FLUX-VAE


class DiffusersEncoder(Configurable, Encoder):
    """Images (B, 3, H, W) -> (mean, logvar) on 2 * latent_channels, (B, 2C, H/f, W/f)."""

    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        block_out_channels: list[int] = _BLOCK_OUT,  # noqa: B006 - recorded in the config as is
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        mid_block_add_attention: bool = True,
    ):
        super().__init__(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            double_z=True,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.z_channels = 2 * latent_channels
        self.downsample = 2 ** (len(block_out_channels) - 1)


class DiffusersDecoder(Configurable, Decoder):
    """Latents (B, latent_channels, h, w) -> images (B, 3, h*f, w*f)."""

    def __init__(
        self,
        out_channels: int = 3,
        latent_channels: int = 4,
        block_out_channels: list[int] = _BLOCK_OUT,  # noqa: B006 - recorded in the config as is
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        mid_block_add_attention: bool = True,
    ):
        super().__init__(
            in_channels=latent_channels,
            out_channels=out_channels,
            up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.z_channels = latent_channels

    @property
    def last_layer(self) -> Tensor:
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        return super().forward(z)
