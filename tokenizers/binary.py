"""Binary tokenizer: CNN encoder -> per-bit Bernoulli probabilities -> bits -> CNN decoder.

Binary Latent Diffusion (https://arxiv.org/abs/2304.04820): f16 conv autoencoder whose latent
is a map of Bernoulli bits (sampled in training with a straight-through estimator, thresholded
in eval); the bits are linearly embedded for the decoder (``Tokenizer.proj_out``).
"""

from __future__ import annotations

from typing_extensions import Unpack

from vistok.tokenizers.quantizers.bernoulli import BernoulliQuantizer
from vistok.tokenizers.tokenizer import ConvArgs, Tokenizer, conv_nets, resolve_preset

_CNN = dict(channels=128, num_res_blocks=2, z_channels=256, mid_attention=True)

BINARY_PRESETS: dict[str, dict] = {
    "f16_b32": dict(_CNN, channel_mult=[1, 1, 2, 2, 4], bits=32),
    "f8_b16": dict(_CNN, channel_mult=[1, 2, 2, 4], bits=16),
}


class BinaryArgs(ConvArgs, total=False):
    bits: int  # Bernoulli bits per position


class BinaryTokenizer(Tokenizer):
    def __init__(
        self,
        preset: str = "f16_b32",
        resolution: int = 256,
        temperature: float = 1.0,
        temperature_end: float | None = None,
        anneal_steps: int = 0,
        **sizes: Unpack[BinaryArgs],
    ):
        cfg = resolve_preset(BINARY_PRESETS, preset, **sizes)
        encoder, decoder = conv_nets(cfg)
        quantizer = BernoulliQuantizer(
            bits=cfg["bits"],
            temperature=temperature,
            temperature_end=temperature_end,
            anneal_steps=anneal_steps,
        )
        super().__init__(encoder, quantizer, decoder, resolution)
