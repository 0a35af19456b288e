"""Bernoulli binary latents.

Binary Latent Diffusion, Wang et al. 2023, https://arxiv.org/abs/2304.04820, and Instella-T2I,
Wang et al. 2025, https://arxiv.org/abs/2506.21022: the encoder predicts one logit per bit,
p = sigmoid(logit / T); training samples b ~ Bernoulli(p) with the straight-through estimator
b + p - sg(p); evaluation thresholds p > 0.5. Quantized values are {0, 1} floats (the decoder's
input projection absorbs the offset).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vistok.tokenizers.quantizers.base import (
    CodeSpace,
    Perturbation,
    Quantizer,
    QuantizerOutput,
    bit_balance,
    channels_first,
    channels_last,
    perturb_bits,
)


class BernoulliQuantizer(Quantizer):
    """codes (B, *S, bits) int64 in {0, 1}.

    Temperature: linear from ``temperature`` to ``temperature_end`` over ``anneal_steps``
    training forwards, counted in a buffer so a resumed checkpoint continues the schedule.
    ``deterministic_eval=False`` samples in eval too; ``forward(z, sample=...)`` overrides both.
    No loss of its own.
    """

    def __init__(
        self,
        bits: int,
        temperature: float = 1.0,
        temperature_end: float | None = None,
        anneal_steps: int = 0,
        deterministic_eval: bool = True,
        perturb_max_delta: int = 100,
    ):
        super().__init__()
        if temperature <= 0 or (temperature_end is not None and temperature_end <= 0):
            raise ValueError("temperatures must be > 0")
        self.bits = bits
        self.temperature_start = temperature
        self.temperature_end = temperature_end
        self.anneal_steps = anneal_steps
        self.deterministic_eval = deterministic_eval
        self.perturb_max_delta = perturb_max_delta
        self.in_channels = bits
        self.code_space = CodeSpace("bits", channels=bits, vocab_size=2, bits=bits)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, temperature={self.temperature:g}"

    @property
    def temperature(self) -> float:
        """Temperature of the current step."""
        if self.temperature_end is None or self.anneal_steps <= 0:
            return self.temperature_start
        frac = min(int(self.step) / self.anneal_steps, 1.0)
        return self.temperature_start + (self.temperature_end - self.temperature_start) * frac

    def forward(self, z: Tensor, sample: bool | None = None) -> QuantizerOutput:
        if sample is None:
            sample = self.training or not self.deterministic_eval
        temperature = self.temperature
        with torch.autocast(device_type=z.device.type, enabled=False):
            p = torch.sigmoid(z.float() / temperature)  # (B, bits, *S)
            if sample:
                b = torch.bernoulli(p.detach())
            else:
                b = (p.detach() > 0.5).float()
            out = b + (p - p.detach())  # value exactly b, gradient of p
            ent = (torch.special.entr(p) + torch.special.entr(1 - p)).mean() / math.log(2)
        if self.training:
            self.step += 1
        codes = channels_last(b.long())  # (B, *S, bits)
        stats = {
            "bit_balance": bit_balance(codes),
            "p_entropy": ent.detach(),  # mean binary entropy of p in bits: 0 = confident
            "temperature": torch.tensor(temperature, device=z.device),
        }
        return QuantizerOutput(out.to(z.dtype), codes, z.new_zeros((), dtype=torch.float32), stats)

    def codes_to_latents(self, codes: Tensor) -> Tensor:
        return channels_first(codes.float())  # (B, bits, *S)

    # ---- latent perturbation ------------------------------------------------------------------

    @torch.no_grad()
    def perturb_with(self, codes: Tensor, p: Perturbation) -> Tensor:
        """``perturb_bits``; ``p.latents``: the logits given to forward (|logit| = confidence)."""
        return perturb_bits(codes, p)
