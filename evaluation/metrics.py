"""Reconstruction and codebook metrics that accumulate over a validation pass (DDP-safe).

All are torchmetrics ``Metric`` objects: every rank calls ``update`` with its share and every
rank calls ``compute()``, which all-reduces the states (calling it on rank 0 only deadlocks).
Images are NCHW in [-1, 1]; values outside are clamped, as writing an image file would.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

DATA_RANGE = (-1.0, 1.0)


class PSNR(PeakSignalNoiseRatio):
    """Mean over images of the per-image PSNR in dB (RGB, all pixels), images in [-1, 1].

    The range (-1, 1) is a data range of 2, which gives the same dB as [0, 1] images with
    range 1. Per-image averaging is what tokenizer papers report; an identical pair is +inf.
    """

    def __init__(self, **kwargs) -> None:
        dims = (1, 2, 3)  # per image
        super().__init__(data_range=DATA_RANGE, dim=dims, reduction="elementwise_mean", **kwargs)


class SSIM(StructuralSimilarityIndexMeasure):
    """Mean SSIM (Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03) for images in [-1, 1].

    Images are mapped to [0, 1] (data range 1) first. SSIM is not shift-invariant (its
    luminance term compares means against k1), so SSIM on [-1, 1] with range 2 differs from the
    [0, 1] / [0, 255] convention papers report.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(data_range=1.0, reduction="elementwise_mean", **kwargs)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        to01 = lambda x: (x.clamp(*DATA_RANGE) + 1) / 2
        super().update(to01(preds), to01(target))


def _entropy(counts: torch.Tensor) -> torch.Tensor:
    """Natural-log entropy of the empirical distribution along the last dim."""
    p = counts.double() / counts.sum(-1, keepdim=True).clamp_min(1)
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


class CodebookUsage(Metric):
    """Code histogram over a pass: usage fraction and perplexity per group, averaged.

    ``update(codes)`` takes integer codes of any shape; with ``groups > 1`` the last dim indexes
    the group (each group has its own vocabulary of ``vocab_size``, as in group-wise LFQ).
    ``compute()`` returns ``usage`` (fraction of codes seen at least once) and ``perplexity``
    (exp of the entropy of the code frequencies; equals ``vocab_size`` when use is uniform),
    both averaged over groups. ``counts`` (G, V) holds the full histogram.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, vocab_size: int, groups: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if vocab_size < 1 or groups < 1:
            raise ValueError(f"vocab_size and groups must be >= 1, got {vocab_size}, {groups}")
        self.vocab_size, self.groups = vocab_size, groups
        counts = torch.zeros(groups, vocab_size, dtype=torch.long)
        self.add_state("counts", default=counts, dist_reduce_fx="sum")

    def update(self, codes: torch.Tensor) -> None:
        if codes.is_floating_point() or codes.is_complex():
            raise TypeError(f"codes must be integers, got {codes.dtype}")
        if self.groups > 1 and codes.shape[-1] != self.groups:
            raise ValueError(f"last dim of codes must be groups={self.groups}, got {codes.shape}")
        codes = codes.reshape(-1, self.groups).long()  # (N, G)
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.vocab_size):
            lo, hi = int(codes.min()), int(codes.max())
            raise ValueError(f"codes span [{lo}, {hi}], outside [0, {self.vocab_size})")
        # One bincount for all groups: group g's codes are shifted into their own block.
        offsets = torch.arange(self.groups, device=codes.device) * self.vocab_size
        flat = (codes + offsets).reshape(-1)
        hist = torch.bincount(flat, minlength=self.groups * self.vocab_size)
        self.counts += hist.view(self.groups, self.vocab_size)

    def compute(self) -> dict[str, torch.Tensor]:
        usage = (self.counts > 0).double().mean(-1)  # (G,)
        perplexity = _entropy(self.counts).exp()  # (G,)
        return {"usage": usage.mean(), "perplexity": perplexity.mean()}


class BitBalance(Metric):
    """Per-bit frequency of ones over a pass, for binary / sign (LFQ) codes.

    ``update(bits)`` takes (..., bits) values where ones are > 0 (so {0, 1} and {-1, +1} both
    work). ``compute()`` returns ``ones_fraction`` (bits,), ``entropy`` (mean binary entropy per
    bit in bits: 1.0 when every bit is balanced) and ``max_imbalance`` (max |p - 0.5|).
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, bits: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if bits < 1:
            raise ValueError(f"bits must be >= 1, got {bits}")
        self.bits = bits
        self.add_state("ones", default=torch.zeros(bits, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, bits: torch.Tensor) -> None:
        if bits.shape[-1] != self.bits:
            raise ValueError(f"last dim must be bits={self.bits}, got {tuple(bits.shape)}")
        ones = (bits.reshape(-1, self.bits) > 0).long()  # (N, bits)
        self.ones += ones.sum(0)
        self.total += ones.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        p = self.ones.double() / self.total.clamp_min(1)  # (bits,)
        q = torch.stack([p, 1 - p], -1)  # (bits, 2)
        entropy = -(q * q.clamp_min(1e-300).log2()).sum(-1)
        return {
            "ones_fraction": p,
            "entropy": entropy.mean(),
            "max_imbalance": (p - 0.5).abs().max(),
        }
