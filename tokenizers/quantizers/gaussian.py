"""Diagonal Gaussian posterior with a KL penalty (the "KL" autoencoder).

Kingma & Welling 2013, https://arxiv.org/abs/1312.6114, as used for the KL-regularised
autoencoders of latent diffusion, Rombach et al. 2022, https://arxiv.org/abs/2112.10752.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vistok.tokenizers.quantizers.base import CodeSpace, Quantizer, QuantizerOutput


class DiagonalGaussian(Quantizer):
    """The encoder outputs (mean, logvar) on 2 * channels; codes are the latent itself.

    Training samples mean + std * eps (reparameterisation); eval returns the mean (the mode);
    ``forward(z, sample=...)`` overrides either. KL to N(0, I) is summed over channels and
    positions and averaged over the batch (the latent-diffusion convention, where the default
    weight 1e-6 comes from), so its scale grows with the latent size.
    """

    def __init__(
        self,
        channels: int,
        kl_weight: float = 1e-6,
        logvar_min: float = -30.0,
        logvar_max: float = 20.0,
    ):
        super().__init__()
        self.channels = channels
        self.kl_weight = kl_weight
        self.logvar_min = logvar_min
        self.logvar_max = logvar_max
        self.in_channels = 2 * channels
        self.code_space = CodeSpace("continuous", channels=channels)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kl_weight={self.kl_weight:g}"

    def _split(self, z: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = z.float().chunk(2, dim=1)  # (B, C, *S) each
        return mean, logvar.clamp(self.logvar_min, self.logvar_max)

    def mode(self, z: Tensor) -> Tensor:
        """The deterministic latent: the posterior mean, (B, channels, *S)."""
        return z.chunk(2, dim=1)[0]

    def kl(self, z: Tensor) -> Tensor:
        """KL(N(mean, var) || N(0, I)), summed over channels and positions, batch-averaged."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            mean, logvar = self._split(z)
            kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
            return kl.flatten(1).sum(1).mean()

    def forward(
        self, z: Tensor, sample: bool | None = None, generator: torch.Generator | None = None
    ) -> QuantizerOutput:
        if sample is None:
            sample = self.training
        with torch.autocast(device_type=z.device.type, enabled=False):
            mean, logvar = self._split(z)
            x = mean
            if sample:
                noise = torch.randn(mean.shape, generator=generator, device=mean.device)
                x = mean + (0.5 * logvar).exp() * noise
        kl = self.kl(z)
        quantized = x.to(z.dtype)
        stats = {
            "kl": kl.detach(),
            "mean_std": (0.5 * logvar).exp().mean().detach(),
        }
        return QuantizerOutput(quantized, quantized.detach(), self.kl_weight * kl, stats)

    def codes_to_latents(self, codes: Tensor) -> Tensor:
        return codes
