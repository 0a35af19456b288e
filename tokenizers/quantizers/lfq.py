"""Lookup-free quantization (LFQ) and WeTok's group-wise LFQ (GQ).

LFQ: MAGVIT-v2, Yu et al. 2023, https://arxiv.org/abs/2310.05737, trained at 18 bits in
Open-MAGVIT2, Luo et al. 2024, https://arxiv.org/abs/2409.04410. GQ: WeTok, Zhuang et al. 2025,
https://arxiv.org/abs/2508.05599: the D channels of a token are split into G groups of D/G bits,
each group is an independent LFQ with its own implicit codebook of 2**(D/G) entries. The implicit
codebook of a token is still 2**D, but the entropy loss only ever builds G * 2**(D/G) logits per
token, which is what makes 18-bit and larger codes affordable.

Conventions: bit i of a group is 1 where the latent is > 0 (quantized value +1, else -1) and the
group index is sum_i bit_i * 2**i. Entropy terms are in nats and averaged over tokens and groups.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from vistok.tokenizers.quantizers.base import (
    CodeSpace,
    Perturbation,
    Quantizer,
    QuantizerOutput,
    bit_balance,
    index_stats,
    perturb_bits,
)

log = logging.getLogger(__name__)


def group_codebook(bits_per_group: int) -> Tensor:
    """All 2**d codes of one group as +-1 rows, row k holding the bits of k (LSB first)."""
    k = torch.arange(2**bits_per_group)
    bits = (k[:, None] >> torch.arange(bits_per_group)) & 1  # (2**d, d)
    return bits.float() * 2 - 1


def entropy_terms(
    x: Tensor, codebook: Tensor, temperature: float, pooled_marginal: bool
) -> tuple[Tensor, Tensor]:
    """Per-sample entropy and codebook (batch-marginal) entropy; x (M, G, d), codebook (K, d).

    The per-token distribution over a group's codebook is softmax(2 x . c / T), i.e.
    softmax(-||x - c||^2 / T) since ||c||^2 = d for every entry. The marginal is averaged over
    the tokens of the batch, per group (the method as described) or pooled over tokens and
    groups (WeTok's public code); both entropies are means over groups.
    """
    logits = 2 * torch.einsum("mgd,kd->mgk", x, codebook) / temperature  # (M, G, K)
    log_p = F.log_softmax(logits, dim=-1)
    p = log_p.exp()
    per_sample = -(p * log_p).sum(-1).mean()
    marginal = p.mean(dim=(0, 1)) if pooled_marginal else p.mean(dim=0)  # (K,) or (G, K)
    # clamp: the gradient of p log p is infinite at 0 and softmax at T = 0.01 underflows.
    codebook_entropy = -(marginal * marginal.clamp_min(1e-12).log()).sum(-1).mean()
    return per_sample, codebook_entropy


class LFQ(Quantizer):
    """Sign quantization of ``bits`` channels in ``groups`` groups; codes (B, *S, G) int64.

    loss = commitment_weight * MSE(x, sign(x))
         + entropy_weight * (sample_weight * H[p(c|x)] - batch_weight * H[E_x p(c|x)])
    with the entropy terms computed in training only. ``factorize = k`` splits each group index
    into k sub-indices of D/(G k) bits (``split_codes`` / ``join_codes``) for AR heads that
    predict sub-tokens one after another.
    """

    def __init__(
        self,
        bits: int,
        groups: int = 1,
        commitment_weight: float = 0.25,
        entropy_weight: float = 0.1,
        sample_weight: float = 1.0,
        batch_weight: float = 1.0,
        temperature: float = 0.01,
        pooled_marginal: bool = False,
        factorize: int = 1,
        perturb_max_delta: int = 100,
    ):
        super().__init__()
        if bits % groups:
            raise ValueError(f"bits ({bits}) must be divisible by groups ({groups})")
        self.bits = bits
        self.groups = groups
        self.bits_per_group = bits // groups
        if self.bits_per_group % factorize:
            raise ValueError(
                f"bits per group ({self.bits_per_group}) must be divisible by factorize "
                f"({factorize})"
            )
        self.commitment_weight = commitment_weight
        self.entropy_weight = entropy_weight
        self.sample_weight = sample_weight
        self.batch_weight = batch_weight
        self.temperature = temperature
        self.pooled_marginal = pooled_marginal
        self.factorize = factorize
        self.perturb_max_delta = perturb_max_delta
        self.in_channels = bits
        self.code_space = CodeSpace(
            "groups", channels=bits, vocab_size=2**self.bits_per_group, groups=groups, bits=bits
        )
        d = self.bits_per_group
        self.register_buffer("codebook", group_codebook(d), persistent=False)  # (2**d, d)
        self.register_buffer("powers", 2 ** torch.arange(d), persistent=False)  # (d,)
        log.info(
            "LFQ: %d bits in %d group(s) of %d, codebook-entropy marginal %s",
            bits,
            groups,
            d,
            "pooled over groups (WeTok public code)" if pooled_marginal else "per group",
        )

    def extra_repr(self) -> str:
        marginal = "pooled" if self.pooled_marginal else "per-group"
        return f"bits={self.bits}, groups={self.groups}, marginal={marginal}"

    def forward(self, z: Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = rearrange(z.float(), "b (g d) ... -> b ... g d", g=self.groups)  # (B, *S, G, d)
            ones = x > 0
            q = torch.where(ones, 1.0, -1.0)
            commitment = F.mse_loss(x, q)
            loss = self.commitment_weight * commitment
            stats = {"commitment": commitment.detach()}
            if self.training and self.entropy_weight > 0:
                flat = x.reshape(-1, self.groups, self.bits_per_group)  # (M, G, d)
                per_sample, cb_entropy = entropy_terms(
                    flat, self.codebook, self.temperature, self.pooled_marginal
                )
                entropy = self.sample_weight * per_sample - self.batch_weight * cb_entropy
                loss = loss + self.entropy_weight * entropy
                stats.update(
                    entropy=entropy.detach(),
                    per_sample_entropy=per_sample.detach(),
                    codebook_entropy=cb_entropy.detach(),
                )
            out = q + (x - x.detach())  # value exactly +-1, gradient straight to the encoder
        quantized = rearrange(out, "b ... g d -> b (g d) ...").to(z.dtype)
        codes = (ones.long() * self.powers).sum(-1)  # (B, *S, G)
        stats.update(index_stats(codes, self.code_space.vocab_size, groups=True))
        stats["bit_balance"] = bit_balance(ones.flatten(-2))
        return QuantizerOutput(quantized, codes, loss, stats)

    def codes_to_bits(self, codes: Tensor) -> Tensor:
        """(B, *S, G) group indices -> (B, *S, G*d) bits in {0, 1}, group-major."""
        bits = (codes[..., None] >> torch.arange(self.bits_per_group, device=codes.device)) & 1
        return bits.flatten(-2)

    def bits_to_codes(self, bits: Tensor) -> Tensor:
        """(B, *S, G*d) bits -> (B, *S, G) group indices."""
        bits = rearrange(bits.long(), "... (g d) -> ... g d", g=self.groups)
        return (bits * self.powers).sum(-1)

    def codes_to_latents(self, codes: Tensor) -> Tensor:
        bits = self.codes_to_bits(codes)  # (B, *S, D)
        return rearrange(bits.float() * 2 - 1, "b ... c -> b c ...")

    # ---- sub-token factorization for AR heads -------------------------------------------------

    @property
    def sub_vocab_size(self) -> int:
        return 2 ** (self.bits_per_group // self.factorize)

    def split_codes(self, codes: Tensor) -> Tensor:
        """(..., G) -> (..., G, k): sub-index j holds bits [j*d/k, (j+1)*d/k) of the group."""
        width = self.bits_per_group // self.factorize
        shifts = torch.arange(self.factorize, device=codes.device) * width
        return (codes[..., None] >> shifts) & (2**width - 1)

    def join_codes(self, sub_codes: Tensor) -> Tensor:
        """(..., G, k) -> (..., G), inverse of ``split_codes``."""
        width = self.bits_per_group // self.factorize
        shifts = torch.arange(self.factorize, device=sub_codes.device) * width
        return (sub_codes << shifts).sum(-1)

    # ---- latent perturbation ------------------------------------------------------------------

    @torch.no_grad()
    def perturb_with(self, codes: Tensor, p: Perturbation) -> Tensor:
        """``perturb_bits`` on the bits of all groups at once (at strength 1: 7 bits, 128
        neighbours); ``p.latents`` is the pre-quantization input (|x| = confidence)."""
        return self.bits_to_codes(perturb_bits(self.codes_to_bits(codes), p))  # (B, *S, G)
