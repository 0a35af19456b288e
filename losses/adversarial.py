"""Adversarial pieces for tokenizer training.

- ``PatchDiscriminator``: the PatchGAN of pix2pix (Isola et al. 2017,
  https://arxiv.org/abs/1611.07004) as used by VQGAN (https://arxiv.org/abs/2012.09841): one logit
  per overlapping patch.
- Discriminator losses (hinge, vanilla/BCE) and generator losses (hinge, non-saturating).
- ``LeCAM``: the regulariser of Tseng et al. 2021, "Regularizing Generative Adversarial Networks
  under Limited Data", https://arxiv.org/abs/2104.03310, with EMAs of the mean real/fake logits.
- ``adaptive_weight``: VQGAN's balance of the GAN loss against the reconstruction loss by the ratio
  of their gradient norms at the decoder's last layer (VQGAN eq. 7).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vistok.common.configurable import Configurable
from vistok.common.nets import num_groups


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(num_groups(channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group' or 'none', got {kind!r}")


class PatchDiscriminator(Configurable, nn.Module):
    """Images (B, in_channels, H, W) -> patch logits (B, 1, H', W').

    ``n_layers`` stride-2 convs (the last of them stride 1), width doubling up to 8 * ndf; with
    n_layers=3 each logit sees a 70x70 receptive field.
    """

    def __init__(
        self,
        in_channels: int = 3,
        ndf: int = 64,
        n_layers: int = 3,
        norm: Literal["batch", "group", "none"] = "batch",
    ):
        super().__init__()
        bias = norm == "none"  # a norm right after the conv makes a conv bias redundant
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=bias),
                _norm_layer(norm, out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # DCGAN init, as pix2pix/VQGAN: N(0, 0.02) convs, N(1, 0.02) norm scales.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 1, H', W')


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def vanilla_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """BCE with targets real=1, fake=0, written with softplus for stability."""
    return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    return -fake_logits.mean()


def ns_g_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss: -log sigmoid(D(fake))."""
    return F.softplus(-fake_logits).mean()


class LeCAM(Configurable, nn.Module):
    """LeCAM regulariser: ||D(real) - ema_fake||^2 + ||ema_real - D(fake)||^2 (hinged at 0).

    The EMAs are buffers, so they are checkpointed with the loss module. ``forward`` first folds
    the batch means into the EMAs (training mode only), then returns the regulariser.
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, real_logits: Tensor, fake_logits: Tensor) -> None:
        self.ema_real.lerp_(real_logits.detach().float().mean(), 1 - self.decay)
        self.ema_fake.lerp_(fake_logits.detach().float().mean(), 1 - self.decay)

    def forward(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        if self.training:
            self.update(real_logits, fake_logits)
        reg_real = F.relu(real_logits - self.ema_fake).pow(2).mean()
        reg_fake = F.relu(self.ema_real - fake_logits).pow(2).mean()
        return reg_real + reg_fake


def adaptive_weight(
    rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4
) -> Tensor:
    """||grad rec_loss|| / ||grad g_loss|| at ``last_layer``, clamped to [0, max_weight], detached.

    Both gradients are taken with ``torch.autograd.grad`` (graph retained), so no ``.grad`` is
    written and the caller's backward is unaffected.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
