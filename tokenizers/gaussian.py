"""KL-VAE: CNN encoder -> diagonal Gaussian posterior -> CNN decoder (LDM / SD-VAE).

https://arxiv.org/abs/2112.10752. ``kl_f8c4`` is the SD-VAE shape (f8, 4 channels);
``kl_f16c16`` the f16 / 16-channel shape used by many latent-diffusion follow-ups.
"""

from __future__ import annotations

from typing_extensions import Unpack

from vistok.tokenizers.quantizers.gaussian import DiagonalGaussian
from vistok.tokenizers.tokenizer import ConvArgs, Tokenizer, conv_nets, resolve_preset

_CNN = dict(channels=128, num_res_blocks=2, mid_attention=True)

KL_PRESETS: dict[str, dict] = {
    "kl_f8c4": dict(_CNN, channel_mult=[1, 2, 4, 4], z_channels=8, latent_channels=4),
    "kl_f16c16": dict(_CNN, channel_mult=[1, 1, 2, 2, 4], z_channels=32, latent_channels=16),
}


class KLArgs(ConvArgs, total=False):
    latent_channels: int  # channels of the Gaussian latent


class KLTokenizer(Tokenizer):
    def __init__(
        self,
        preset: str = "kl_f8c4",
        resolution: int = 256,
        kl_weight: float = 1e-6,
        **sizes: Unpack[KLArgs],
    ):
        cfg = resolve_preset(KL_PRESETS, preset, **sizes)
        encoder, decoder = conv_nets(cfg)
        quantizer = DiagonalGaussian(channels=cfg["latent_channels"], kl_weight=kl_weight)
        super().__init__(encoder, quantizer, decoder, resolution)
