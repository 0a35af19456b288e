"""Finite scalar quantization.

Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple",
https://arxiv.org/abs/2309.15505. Each of the len(levels) channels is squashed into a bounded
range and rounded to one of levels[i] integers; the code of a token is the mixed-radix number of
its digits. No codebook, no auxiliary loss.
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
    channels_first,
    channels_last,
    index_stats,
    least_confident_mask,
    num_positions,
    rand,
)


class FSQ(Quantizer):
    """codes (B, *S) int64 in [0, prod(levels)); quantized values in [-1, 1].

    Channel i takes the integers -(L//2) .. (L-1)//2 (L = levels[i]), scaled by 1/(L//2), so odd
    levels are symmetric and even ones have one more step below zero, as in the paper.
    """

    def __init__(self, levels: list[int], eps: float = 1e-3, perturb_max_delta: int = 100):
        super().__init__()
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ needs at least one channel and levels >= 2, got {levels}")
        self.levels = list(levels)
        self.eps = eps
        self.perturb_max_delta = perturb_max_delta
        n = len(levels)
        self.in_channels = n
        self.vocab_size = math.prod(levels)
        self.code_space = CodeSpace("index", channels=n, vocab_size=self.vocab_size)
        lv = torch.tensor(levels)
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long), lv[:-1]]), dim=0)
        self.register_buffer("_levels", lv, persistent=False)  # (n,)
        self.register_buffer("_basis", basis, persistent=False)  # (n,) mixed-radix place values
        self.register_buffer("_half", (lv // 2).float(), persistent=False)  # (n,)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, vocab={self.vocab_size}"

    def bound(self, x: Tensor) -> Tensor:
        """(..., n) -> values in (-(L//2) - 0.5, (L-1)//2 + 0.5), so rounding lands in range."""
        lv = self._levels.float()
        half_l = (lv - 1) * (1 - self.eps) / 2
        # Even levels are offset by half a step; the shift puts that offset's zero back at x = 0.
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(x + shift) * half_l - offset

    def forward(self, z: Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = channels_last(z.float())  # (B, *S, n)
            bounded = self.bound(x)
            rounded = bounded.round().detach()
            # Value exactly the grid point, gradient of the bounded latent (straight-through).
            out = (rounded + (bounded - bounded.detach())) / self._half
        quantized = channels_first(out).to(z.dtype)
        digits = rounded.long() + self._half.long()  # (B, *S, n) in [0, L)
        codes = (digits * self._basis).sum(-1)  # (B, *S)
        stats = index_stats(codes, self.vocab_size)
        return QuantizerOutput(quantized, codes, z.new_zeros((), dtype=torch.float32), stats)

    def codes_to_digits(self, codes: Tensor) -> Tensor:
        return (codes[..., None] // self._basis) % self._levels  # (B, *S, n)

    def digits_to_codes(self, digits: Tensor) -> Tensor:
        return (digits * self._basis).sum(-1)

    def codes_to_latents(self, codes: Tensor) -> Tensor:
        digits = self.codes_to_digits(codes).float()
        return channels_first((digits - self._half) / self._half)  # (B, n, *S)

    # ---- latent perturbation ------------------------------------------------------------------

    @torch.no_grad()
    def perturb_with(self, codes: Tensor, p: Perturbation) -> Tensor:
        """With probability alpha per token, each of its num_dims = round(log2(delta)) (capped at
        the number of channels) least-confident channels moves one level with probability 1/2;
        change rate alpha * (1 - 2**-num_dims).

        With ``p.latents`` (B, n, *S, the pre-quantization input) a channel's confidence is its
        distance from the rounding boundary and it moves to its second-nearest level; without,
        channels and directions are random. A move past either end of the range reflects back
        (to the only neighbour there), so every chosen move changes the code.
        """
        digits = self.codes_to_digits(codes)  # (B, *S, n)
        n = len(self.levels)
        flat = digits.reshape(-1, n)  # (M, n)
        m = flat.shape[0]
        confidence = None
        direction = torch.where(rand((m, n), p.generator, flat.device) < 0.5, 1, -1)
        if p.latents is not None:
            bounded = self.bound(channels_last(p.latents.float())).reshape(-1, n)
            residual = bounded - bounded.round()  # in [-0.5, 0.5]
            confidence = -residual.abs()  # near the boundary = least confident
            direction = torch.where(residual == 0, direction, residual.sign().long())
        num_dims = num_positions(p.delta, n)
        move = least_confident_mask(confidence, (m, n), p.alpha, num_dims, p.generator, flat.device)
        top = self._levels - 1
        new = flat + direction * move.long()
        new = torch.where(new < 0, -new, new)
        new = torch.where(new > top, 2 * top - new, new)
        return self.digits_to_codes(new.reshape(digits.shape))
