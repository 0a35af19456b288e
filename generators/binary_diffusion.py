"""Bernoulli diffusion over binary latents (Binary Latent Diffusion, Wang et al. 2023,
https://arxiv.org/abs/2304.04820).

- Forward process, in continuous time t in [0, 1]: ``q(z_t | z_0) = Bern(k_t z_0 + (1 - k_t)/2)``,
  i.e. each bit is kept with probability ``(1 + k_t)/2`` and flipped with ``(1 - k_t)/2``; t = 0
  is the data, t = 1 (k = 0) fair coins. Schedules: ``linear`` k_t = 1 - t (the paper's example
  k_t = 1 - t/T), ``cosine`` k_t = cos(pi t / 2) (keeps more of the data at small t).
- The DiT of ``vistok.generators.diffusion`` (adaLN-Zero on t and the class) reads z_t as +-1
  and predicts, per bit, the logit that the bit of z_0 differs from z_t; BCE loss against the
  actual flips. Then ``P(z_0 = 1 | z_t) = z_t (1 - f) + (1 - z_t) f``.
- Reverse step t -> s < t: the exact per-bit posterior under the model,
  ``p(z_s = a | z_t) = q(z_t | z_s = a) sum_c q(z_s = a | z_0 = c) p(c | z_t) / q(z_t | z_0 = c)``
  (normalised by construction), sampled; the last step (s = 0) thresholds ``P(z_0 = 1) > 0.5``.
  CFG acts on the flip logits (``u + s (c - u)``, the paper's ``(1 + w) c - w u`` with s = 1 + w),
  then the logits are divided by the temperature. 16-64 uniform steps are typical.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vistok.common.configurable import Configurable
from vistok.generators.diffusion import DiffusionSampling, DiT
from vistok.tokenizers.quantizers.base import channels_first, channels_last, rand

# ---------------------------------------------------------------------------------------------
# Helpers


def keep_coefficient(t: Tensor, schedule: str) -> Tensor:
    """k_t: the part of z_0 that survives at noise level t (1 at t = 0, 0 at t = 1)."""
    if schedule == "linear":
        return 1.0 - t
    if schedule == "cosine":
        return torch.cos(0.5 * math.pi * t).clamp_min(0.0)
    raise ValueError(f"schedule must be linear or cosine, got {schedule!r}")


def bernoulli(p: Tensor, generator: torch.Generator | None) -> Tensor:
    """Bits (int64) with P(1) = p, drawn from ``generator``."""
    return (rand(tuple(p.shape), generator, p.device) < p).long()


def posterior_one(zt: Tensor, p1: Tensor, kt: float, ks: float) -> Tensor:
    """P(z_s = 1 | z_t) with z_0 ~ Bern(p1), both (..., bits); see the module docstring."""
    zt = zt.float()
    kts = kt / ks  # the step s -> t alone keeps k_t / k_s of z_s

    def q(b: Tensor, a, k: float) -> Tensor:  # P(b | a) for a kept-with-(1+k)/2 channel
        return k * (b == a).float() + (1 - k) / 2

    # p(c | z_t) / q(z_t | c) for c = 0, 1
    w1 = p1 / q(zt, 1, kt)
    w0 = (1 - p1) / q(zt, 0, kt)
    one = q(zt, 1, kts) * (q(torch.ones_like(zt), 1, ks) * w1 + q(torch.ones_like(zt), 0, ks) * w0)
    return one.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Main module


class BinaryDiffusion(Configurable, nn.Module):
    """Class-conditional Bernoulli diffusion over a binary tokenizer's bits.

    Args:
        code_space: the tokenizer's ``CodeSpace.to_dict()`` (kind "bits").
        token_shape: ``[h, w]`` or ``[n]``; codes are (B, *token_shape, bits).
        num_classes: class labels; label ``num_classes`` is the null class. 0 = unconditional.
        preset: a name in ``DIT_PRESETS``; ``depth``/``dim``/``heads`` override it.
        patch_size: tokens per side grouped into one transformer token (default 1).
        schedule: ``linear`` or ``cosine`` k_t (see the module docstring).
        label_dropout: probability of the null label in training (for CFG).
    """

    kind = "bits"

    def __init__(
        self,
        code_space: dict,
        token_shape: list[int],
        num_classes: int = 1000,
        preset: str = "B",
        patch_size: int = 1,
        depth: int | None = None,
        dim: int | None = None,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        label_dropout: float = 0.1,
        schedule: Literal["linear", "cosine"] = "linear",
        qk_norm: bool = False,
    ):
        super().__init__()
        if code_space["kind"] != "bits":
            raise ValueError(
                f"binary diffusion models bits, but this tokenizer's codes are "
                f"{code_space['kind']!r}: use generator/dit.yaml (continuous) or generator/ar.yaml"
            )
        keep_coefficient(torch.zeros(()), schedule)  # validates the name
        self.token_shape = tuple(int(s) for s in token_shape)
        self.bits, self.num_classes, self.schedule = code_space["bits"], num_classes, schedule
        sizes = dict(depth=depth, dim=dim, heads=heads)
        options = dict(mlp_ratio=mlp_ratio, label_dropout=label_dropout, qk_norm=qk_norm)
        self.net = DiT.sized(
            self.bits, self.token_shape, patch_size, num_classes, preset, sizes, **options
        )

    def keep(self, t: Tensor) -> Tensor:
        return keep_coefficient(t, self.schedule)

    def noise(self, z0: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Sample z_t ~ q(z_t | z_0) for bits z0 (B, ..., bits) at per-sample t (B,)."""
        k = self.keep(t.float()).reshape(-1, *([1] * (z0.dim() - 1)))
        return bernoulli(k * z0.float() + (1 - k) / 2, generator)

    def forward(self, zt: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """Flip logits (B, *token_shape, bits) for bits zt in the tokenizer's layout."""
        if labels is None:
            labels = torch.full((zt.shape[0],), -1, dtype=torch.long, device=zt.device)
        x = channels_first(2.0 * zt.float() - 1.0)  # (B, bits, *S) in {-1, 1}
        return channels_last(self.net(x, t, labels))

    def loss(
        self, codes: Tensor, labels: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """BCE of the flip logits at t ~ U(0, 1); stats: accuracy of the implied z_0."""
        z0 = codes.long()
        t = rand((z0.shape[0],), generator, z0.device)  # (B,)
        zt = self.noise(z0, t, generator)
        logits = self(zt, t, labels).float()
        flips = (zt != z0).float()
        bce = F.binary_cross_entropy_with_logits(logits, flips)
        with torch.no_grad():
            x0_hat = torch.where(logits > 0, 1 - zt, zt)
            stats = {"bit_accuracy": (x0_hat == z0).float().mean(), "flip_rate": flips.mean()}
        return bce, stats

    def flip_logits(self, zt: Tensor, t: float, labels: Tensor, cfg_scale: float) -> Tensor:
        tt = torch.full((zt.shape[0],), t, device=zt.device)
        if cfg_scale == 1.0:
            return self(zt, tt, labels).float()
        null = torch.full_like(labels, -1)
        both = self(torch.cat([zt, zt]), torch.cat([tt, tt]), torch.cat([labels, null])).float()
        cond, uncond = both.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    @torch.no_grad()
    def generate(
        self, labels: Tensor, config: DiffusionSampling, generator: torch.Generator | None = None
    ) -> Tensor:
        """Bits (B, *token_shape, bits) int64 after ``config.steps`` reverse steps from noise."""
        if config.sampler not in (None, "posterior"):
            raise ValueError(f"binary diffusion samples the posterior; no {config.sampler} solver")
        device = self.net.pos.device
        if not self.num_classes:
            labels = torch.full((len(labels),), -1, dtype=torch.long)
        labels = labels.to(device)
        z = bernoulli(
            torch.full((len(labels), *self.token_shape, self.bits), 0.5, device=device), generator
        )
        ts = torch.linspace(1.0, 0.0, config.steps + 1)
        ks = self.keep(ts).tolist()
        for i, t in enumerate(ts[:-1].tolist()):
            logits = self.flip_logits(z, t, labels, config.scale_at(t)) / config.temperature
            f = torch.sigmoid(logits)
            p1 = torch.where(z.bool(), 1 - f, f)  # P(z_0 = 1 | z_t)
            if i < config.steps - 1:
                z = bernoulli(posterior_one(z, p1, ks[i], ks[i + 1]), generator)
        return (p1 > 0.5).long()  # the last step thresholds instead of sampling
