"""The loss every tokenizer trains with: reconstruction + LPIPS + GAN (+ the quantizer's own loss).

Defaults follow WeTok (https://arxiv.org/abs/2508.05599): L1 and LPIPS-VGG at weight 1, hinge loss
for the discriminator, non-saturating generator loss at a fixed weight 0.1. LeCAM (0.05 in WeTok)
and VQGAN's adaptive GAN weight are options.

Two optimisers (generator and discriminator) step once per training step; ``step`` is the number
of GENERATOR steps taken so far, so ``disc_start`` does not silently halve when a trainer counts
both.

How the discriminator is kept out of the generator update: ``generator_loss`` runs the
discriminator through ``torch.func.functional_call`` with its parameters detached. Gradients
flow to the reconstruction through the discriminator's input, but no ``.grad`` is ever written on
the discriminator, and no ``requires_grad`` flag is toggled (nothing to restore if a step fails).
``discriminator_loss`` detaches the reconstruction, so it only trains the discriminator. The two
losses can therefore be summed and back-propagated once, each net getting its own gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vistok.common.configurable import Configurable
from vistok.losses.adversarial import (
    LeCAM,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    ns_g_loss,
    vanilla_d_loss,
)
from vistok.losses.perceptual import LPIPS

_D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
_G_LOSSES = {"hinge": hinge_g_loss, "non_saturating": ns_g_loss}


class TokenizerLoss(Configurable, nn.Module):
    """Composes the tokenizer training losses.

    ``discriminator`` is any module mapping images to logits (``PatchDiscriminator`` by default
    in configs); None trains without a GAN. LPIPS is built only when ``perceptual_weight > 0``
    (its frozen VGG is not part of this module's state_dict).
    """

    def __init__(
        self,
        reconstruction: Literal["l1", "l2"] = "l1",
        reconstruction_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        gan_weight: float = 0.1,
        adaptive_gan_weight: bool = False,
        disc_start: int = 0,
        disc_loss: Literal["hinge", "vanilla"] = "hinge",
        gen_loss: Literal["hinge", "non_saturating"] = "non_saturating",
        lecam_weight: float = 0.0,
        lecam_decay: float = 0.999,
        discriminator: nn.Module | None = None,
    ):
        super().__init__()
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be 'l1' or 'l2', got {reconstruction!r}")
        if disc_loss not in _D_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(_D_LOSSES)}, got {disc_loss!r}")
        if gen_loss not in _G_LOSSES:
            raise ValueError(f"gen_loss must be one of {sorted(_G_LOSSES)}, got {gen_loss!r}")
        self.reconstruction = reconstruction
        self.reconstruction_weight = reconstruction_weight
        self.perceptual_weight = perceptual_weight
        self.gan_weight = gan_weight
        self.adaptive_gan_weight = adaptive_gan_weight
        self.disc_start = disc_start
        self.lecam_weight = lecam_weight
        self._d_loss = _D_LOSSES[disc_loss]
        self._g_loss = _G_LOSSES[gen_loss]
        self.perceptual = LPIPS() if perceptual_weight > 0 else None
        self.discriminator = discriminator
        self.lecam = LeCAM(lecam_decay) if lecam_weight > 0 and discriminator is not None else None

    @property
    def has_discriminator(self) -> bool:
        return self.discriminator is not None

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms are on at generator step ``step``."""
        return self.has_discriminator and step >= self.disc_start

    def _frozen_logits(self, images: Tensor) -> Tensor:
        params = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return torch.func.functional_call(self.discriminator, params, (images,), strict=False)

    def generator_loss(
        self,
        images: Tensor,
        recon: Tensor,
        quant_loss: Tensor | float,
        step: int,
        last_layer: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total generator-side loss and a dict of unweighted terms and weights (detached).

        ``images`` and ``recon`` are (B, C, H, W) in [-1, 1]. ``last_layer`` is the decoder's
        final weight, needed only with ``adaptive_gan_weight``. Without autograd (validation)
        the adaptive weight cannot be measured and the fixed ``gan_weight`` is reported instead.
        """
        if self.reconstruction == "l1":
            rec = F.l1_loss(recon, images)
        else:
            rec = F.mse_loss(recon, images)
        zero = rec.new_zeros(())
        perc = self.perceptual(images, recon).mean() if self.perceptual is not None else zero
        nll = self.reconstruction_weight * rec + self.perceptual_weight * perc

        g_loss, weight = zero, zero
        if self.gan_active(step):
            g_loss = self._g_loss(self._frozen_logits(recon))
            weight = torch.as_tensor(self.gan_weight, device=rec.device, dtype=rec.dtype)
            if self.adaptive_gan_weight:
                if last_layer is None:
                    raise ValueError("adaptive_gan_weight needs the decoder's last_layer")
                if torch.is_grad_enabled() and nll.requires_grad and g_loss.requires_grad:
                    weight = weight * adaptive_weight(nll, g_loss, last_layer)

        quant_loss = torch.as_tensor(quant_loss, device=rec.device, dtype=rec.dtype)
        total = nll + weight * g_loss + quant_loss
        logs = {
            "rec_loss": rec,
            "perceptual_loss": perc,
            "quant_loss": quant_loss,
            "g_loss": g_loss,
            "gan_weight": weight,
            "loss": total,
        }
        return total, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(
        self, images: Tensor, recon: Tensor, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Discriminator loss (+ LeCAM). ``recon`` is detached here.

        Before ``disc_start`` it is zero, yet connected to every trainable discriminator
        parameter, so that a backward through it gives each a (zero) gradient: DDP without
        ``find_unused_parameters`` needs that. The discriminator does not run then (its buffers,
        e.g. BatchNorm statistics, are untouched).
        """
        if not self.has_discriminator:
            raise RuntimeError("discriminator_loss called on a TokenizerLoss without discriminator")
        zero = images.new_zeros(())
        if not self.gan_active(step):
            trained = [p.sum() for p in self.discriminator.parameters() if p.requires_grad]
            total = 0.0 * sum(trained, zero)
            logs = {"d_loss": zero, "lecam_loss": zero, "logits_real": zero, "logits_fake": zero}
            return total, {**logs, "d_total": zero}
        real_logits = self.discriminator(images.detach())  # (B, 1, H', W')
        fake_logits = self.discriminator(recon.detach())
        d_loss = self._d_loss(real_logits, fake_logits)
        lecam = self.lecam(real_logits, fake_logits) if self.lecam is not None else zero
        total = d_loss + self.lecam_weight * lecam
        logs = {
            "d_loss": d_loss,
            "lecam_loss": lecam,
            "logits_real": real_logits.mean(),
            "logits_fake": fake_logits.mean(),
            "d_total": total,
        }
        return total, {k: v.detach() for k, v in logs.items()}
