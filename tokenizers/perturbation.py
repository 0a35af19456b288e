"""RobusTok latent perturbation during main training.

RobusTok ("Robust Latent Matters" and "Image Tokenizer Needs Post-Training"): the decoder
learns to reconstruct from codes a generator might plausibly produce instead of the exact ones.
The first ``floor(beta * B)`` images of each per-device batch have their codes
replaced by nearby valid codes (the quantizer's own ``perturb`` rule) AFTER the quantizer losses
are computed, so the perturbed latents feed only the reconstruction, perceptual and GAN losses;
the encoder still gets the straight-through gradient.

Strength schedule (RobusTok's ratio): ``start_ratio`` until ``anneal_start``, then linear to
``end_ratio`` at ``anneal_end`` (in steps or epochs). For VQ the ratio is alpha and
``int(ratio * 100)`` is delta (the number of nearest codebook entries to pick among).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from vistok.common.configurable import Configurable
from vistok.tokenizers.quantizers.base import Quantizer, QuantizerOutput


class LatentPerturbation(Configurable, nn.Module):
    def __init__(
        self,
        beta: float = 0.1,
        start_ratio: float = 1.0,
        end_ratio: float = 0.5,
        anneal_start: int = 40,
        anneal_end: int = 120,
        unit: Literal["steps", "epochs"] = "epochs",
        seed: int = 0,
    ):
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(
                f"beta (fraction of each batch perturbed) must be in [0, 1], got {beta}"
            )
        if anneal_end < anneal_start:
            raise ValueError("anneal_end must not come before anneal_start")
        self.beta, self.start_ratio, self.end_ratio = beta, start_ratio, end_ratio
        self.anneal_start, self.anneal_end, self.unit, self.seed = (
            anneal_start,
            anneal_end,
            unit,
            seed,
        )

    def strength(self, step: int, epoch: int) -> float:
        t = step if self.unit == "steps" else epoch
        if t <= self.anneal_start or self.anneal_end == self.anneal_start:
            return self.start_ratio if t <= self.anneal_start else self.end_ratio
        frac = min(1.0, (t - self.anneal_start) / (self.anneal_end - self.anneal_start))
        return self.start_ratio + frac * (self.end_ratio - self.start_ratio)

    def forward(
        self,
        quantizer: Quantizer,
        out: QuantizerOutput,
        latents: Tensor,
        step: int,
        epoch: int,
        rank: int = 0,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Decoder input with the first beta*B images perturbed, and what was done (for logs)."""
        n, strength = int(self.beta * latents.shape[0]), self.strength(step, epoch)
        stats = {"perturb/strength": torch.tensor(strength), "perturb/images": torch.tensor(n)}
        if n == 0 or strength == 0.0:
            return out.quantized, stats
        # Seeded by (seed, step, rank): reproducible runs, different draws on every rank.
        gen = torch.Generator(device=latents.device)
        gen.manual_seed(hash((self.seed, step, rank)) & 0x7FFF_FFFF_FFFF_FFFF)
        head = out._replace(quantized=out.quantized[:n], codes=out.codes[:n])
        codes = quantizer.perturb(head.codes, strength, gen, latents[:n])
        perturbed = quantizer.perturbed_latents(head, codes)  # (n, C, *S)
        changed = (perturbed.detach() != head.quantized.detach()).any(dim=1)  # (n, *S)
        stats["perturb/replaced"] = changed.float().mean()  # effective token replacement rate
        return torch.cat([perturbed, out.quantized[n:]]), stats
