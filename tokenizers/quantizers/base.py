"""The one interface every quantizer implements.

Shapes: quantizers take the encoder output with channels at dim 1, ``(B, C, *spatial)``:
``(B, C, H, W)`` for 2D tokenizers and ``(B, C, N)`` for 1D ones, and return ``quantized`` in the
same shape. ``codes`` is what a generator models; its layout is declared by ``code_space``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from vistok.common.configurable import Configurable


class QuantizerOutput(NamedTuple):
    quantized: Tensor  # (B, C, *spatial), what the decoder sees (straight-through where discrete)
    codes: Tensor  # see CodeSpace.kind for the layout
    loss: Tensor  # scalar: the quantizer's own weighted loss terms, summed
    stats: dict[str, Tensor]  # every loss term unweighted + usage statistics, detached, for logging


@dataclass(frozen=True)
class CodeSpace:
    """What a generator needs to know to model the codes.

    kind:
      - "index":  codes (B, *spatial) int64 in [0, vocab_size)               (VQ, FSQ)
      - "groups": codes (B, *spatial, groups) int64 in [0, 2**(bits/groups))  (LFQ/GQ)
      - "bits":   codes (B, *spatial, bits) int64 in {0, 1}                   (Bernoulli binary)
      - "continuous": codes (B, channels, *spatial) float                     (KL, identity)

    Standard ``stats`` keys: ``usage`` = fraction of the codebook (mean over per-group codebooks)
    hit in this batch, ``perplexity`` = exp of the entropy of the batch's code histogram (mean
    over groups), ``bit_balance`` = mean over bit positions of the binary entropy (in bits) of
    that bit's frequency of ones in the batch (1 = every bit used half the time, 0 = stuck bits).
    All are per process (not reduced across ranks).
    """

    kind: Literal["index", "groups", "bits", "continuous"]
    channels: int  # latent channels the decoder takes
    vocab_size: int = 0  # index: codebook size; groups: entries per group; bits: 2
    groups: int = 1
    bits: int = 0  # total bits per token for groups/bits

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Perturbation:
    """One explicit perturbation: with probability ``alpha`` a token moves to a uniform pick
    among its ``delta`` nearest codes (its own included), so the change rate is
    alpha * (delta - 1) / delta. Positional codes (bits, FSQ channels) expose
    ``num_positions(delta, n)`` positions instead, 2**num ~ delta neighbours."""

    alpha: float
    delta: int
    generator: torch.Generator | None = None  # makes the draw reproducible
    latents: Tensor | None = None  # (B, in_channels, *S): the input given to forward


class Quantizer(Configurable, nn.Module):
    """Base class. Subclasses implement ``forward``, ``codes_to_latents`` and ``code_space``;
    discrete ones also ``perturb_with``."""

    code_space: CodeSpace
    perturb_max_delta: int = 100  # RobusTok's delta at strength 1: delta = int(ratio * 100)

    def forward(self, z: Tensor) -> QuantizerOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def codes_to_latents(self, codes: Tensor) -> Tensor:  # pragma: no cover - interface
        """Inverse of the code assignment: ``codes_to_latents(out.codes) == out.quantized``."""
        raise NotImplementedError

    def perturb(
        self,
        codes: Tensor,
        strength: float,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
    ) -> Tensor:
        """Replace codes by nearby valid codes (RobusTok latent perturbation).

        ``strength`` is RobusTok's ratio: alpha = strength, delta = int(strength *
        perturb_max_delta) (>= 2), handed to ``perturb_with``. ``latents`` is the tensor that was
        given to ``forward`` (B, in_channels, *S), used where the rule needs it (VQ picks among the
        nearest codebook entries of the encoder output, bit and FSQ codes move their
        least-confident positions first). Same code layout in and out, always valid codes;
        strength 0 is the identity; ``generator`` makes it reproducible.
        """
        alpha, delta = strength_to_alpha_delta(strength, self.perturb_max_delta)
        return self.perturb_with(codes, Perturbation(alpha, delta, generator, latents))

    def perturb_with(self, codes: Tensor, p: Perturbation) -> Tensor:
        """The hook each discrete quantizer implements: move codes by the explicit ``p``."""
        raise NotImplementedError(f"{type(self).__name__} has no discrete codes to perturb")

    def perturbed_latents(self, out: QuantizerOutput, codes: Tensor) -> Tensor:
        """Decoder input for ``codes`` (``out.codes`` moved by ``perturb``), with the gradient of
        the unperturbed path.

        The value is exactly ``codes_to_latents(codes)`` while the gradient flows to the encoder
        as if unperturbed (straight-through), so reconstruction, perceptual and GAN losses on
        perturbed latents still train the encoder.
        """
        target = self.codes_to_latents(codes).to(out.quantized.dtype)
        return target + (out.quantized - out.quantized.detach())


# ---------------------------------------------------------------------------------------------
# Shared utilities


def rand(shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    """Uniform [0, 1) drawn on the generator's device (a CPU generator also serves CUDA codes)."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def index_stats(codes: Tensor, vocab_size: int, groups: bool = False) -> dict[str, Tensor]:
    """``usage`` and ``perplexity`` of integer codes; ``groups``: the last dim indexes groups."""
    with torch.no_grad():
        flat = codes.reshape(-1, codes.shape[-1]) if groups else codes.reshape(-1, 1)  # (M, G)
        n_groups = flat.shape[1]
        offset = torch.arange(n_groups, device=flat.device) * vocab_size
        counts = torch.bincount((flat + offset).reshape(-1), minlength=n_groups * vocab_size)
        counts = counts.reshape(n_groups, vocab_size).float()  # (G, V)
        probs = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        entropy = torch.special.entr(probs).sum(-1)  # (G,) nats
        return {
            "usage": (counts > 0).float().mean(),
            "perplexity": entropy.exp().mean(),
        }


def bit_balance(bits: Tensor) -> Tensor:
    """Mean over bit positions of the binary entropy (bits) of their frequency; bits (..., n)."""
    with torch.no_grad():
        freq = bits.reshape(-1, bits.shape[-1]).float().mean(0)  # (n,)
        h = torch.special.entr(freq) + torch.special.entr(1 - freq)
        return (h / math.log(2)).mean()


def strength_to_alpha_delta(strength: float, max_delta: int) -> tuple[float, int]:
    """RobusTok's annealed pair: alpha = strength, delta = int(strength * max_delta).

    ``strength`` plays the role of RobusTok's ratio (1 at the start of training, 0.5 at the end
    of their schedule). Any strength > 0 keeps delta >= 2 so that it always perturbs something.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"perturbation strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return 0.0, 1
    return strength, max(2, int(strength * max_delta))


def least_confident_mask(
    confidence: Tensor | None,
    shape: tuple[int, int],
    alpha: float,
    num: int,
    generator: torch.Generator | None,
    device,
) -> Tensor:
    """Which (token, position) pairs to move, (M, n) bool; the rule shared by bit and FSQ codes.

    With probability ``alpha`` a token is perturbed: each of its ``num`` least-confident
    positions (smallest ``confidence``; a random subset when None) moves with probability 1/2.
    That is a uniform pick among the 2**num neighbouring codes that differ only there, the
    token's own code included: the analogue of RobusTok's uniform pick among the delta nearest
    codebook entries, so with delta = 2**num the change rate is alpha * (delta - 1) / delta.
    """
    m, n = shape
    r = min(num, n)
    if alpha <= 0 or r <= 0 or m == 0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    if confidence is None:
        confidence = rand(shape, generator, device)
    weakest = confidence.float().argsort(dim=1)[:, :r]  # (M, r)
    chosen = torch.zeros(shape, dtype=torch.bool, device=device).scatter_(1, weakest, True)
    token = rand((m, 1), generator, device) < alpha  # (M, 1)
    coin = rand(shape, generator, device) < 0.5  # (M, n)
    return chosen & coin & token


def perturb_bits(bits: Tensor, p: Perturbation) -> Tensor:
    """The bit rule shared by Bernoulli and LFQ/GQ codes; bits (B, *S, n) int64 in {0, 1}.

    With probability alpha per token, each of its round(log2(delta)) least-confident bits flips
    with probability 1/2 (``least_confident_mask``); change rate alpha * (1 - 2**-num_bits).
    ``p.latents`` (B, n, *S): the pre-quantization input, whose |x| ranks the bits of each token
    from least to most confident (random ranks when None).
    """
    n = bits.shape[-1]
    confidence = None
    if p.latents is not None:
        confidence = rearrange(p.latents.float().abs(), "b c ... -> (b ...) c")  # (M, n)
    flat = bits.reshape(-1, n)  # (M, n)
    num = num_positions(p.delta, n)
    mask = least_confident_mask(confidence, flat.shape, p.alpha, num, p.generator, bits.device)
    return (flat ^ mask.long()).reshape(bits.shape)


def num_positions(delta: int, n: int) -> int:
    """Positions to expose so that 2**num ~ delta neighbours: round(log2(delta)), at most n."""
    return min(n, round(math.log2(delta))) if delta > 1 else 0


def channels_last(z: Tensor) -> Tensor:
    """(B, C, *spatial) -> (B, *spatial, C): tokens first, for per-token maths."""
    return rearrange(z, "b c ... -> b ... c")


def channels_first(x: Tensor) -> Tensor:
    """(B, *spatial, C) -> (B, C, *spatial): back to the conv layout."""
    return rearrange(x, "b ... c -> b c ...")
