"""No quantization: a plain autoencoder bottleneck.

As in MAETok, Chen et al. 2025, https://arxiv.org/abs/2502.03444 (no KL, no VQ).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vistok.tokenizers.quantizers.base import CodeSpace, Quantizer, QuantizerOutput


class Identity(Quantizer):
    """Passes the latent through; codes are the latent itself, loss 0."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.in_channels = channels
        self.code_space = CodeSpace("continuous", channels=channels)

    def forward(self, z: Tensor) -> QuantizerOutput:
        loss = torch.zeros((), device=z.device)
        return QuantizerOutput(z, z.detach(), loss, {})

    def codes_to_latents(self, codes: Tensor) -> Tensor:
        return codes
