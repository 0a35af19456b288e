"""MAETok's auxiliary decoders: the training-only half of mask modeling.

MAETok (Chen et al. 2025, https://arxiv.org/abs/2502.03444) masks 40-60% of the encoder's patch
tokens (``ViTEncoder(mask_ratio=...)``) and, besides the pixel decoder that reconstructs the whole
image, trains shallow decoders that predict target features (HOG, DINOv2, CLIP ...) of the MASKED
patches from the latent tokens alone. That pressure to infer hidden content from the latents is
what makes the latent space discriminative, with few modes.

The auxiliary decoders are parts of training, not of the tokenizer: :class:`MaskModeling` is held
by ``TokenizerModule`` (as its ``mask_modeling``, next to the loss and its discriminator), so its
weights sit under ``mask_modeling.*`` in training checkpoints and never under ``tokenizer.*``:
the EMA, ``read_tokenizer``, extraction and export all leave them out, and the tokenizer used at
inference is exactly the encoder, identity bottleneck and pixel decoder.

Each decoder is the 1D family's ViT decoder (``ViTDecoder``: mask tokens on the patch grid plus
the K latents) with a per-patch feature head. The loss per target is the mean squared error over
the masked patches only; teacher features are layer-normalised per patch first (their scale is
arbitrary), HOG is already normalised per cell.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vistok.common.configurable import Configurable
from vistok.losses.feature_targets import FeatureTarget, HOGTarget, TeacherTarget
from vistok.tokenizers.nets.vit import ViTDecoder


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the masked patches: pred/target (B, N, F), mask (B, N) bool."""
    err = (pred.float() - target.float()).pow(2).mean(-1)  # (B, N)
    weight = mask.float()
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


class MaskModeling(Configurable, nn.Module):
    """Auxiliary feature decoders for the masked patches, with their loss weights.

    ``hog_weight`` > 0 adds the HOG target (``hog_cell`` px cells, ``hog_orientations`` bins);
    ``teachers`` adds one target per entry, a dict with ``model`` (timm name), ``weights`` (local
    file; None = random init, for tests only), ``weight`` (loss weight, default 1), optionally
    ``img_size`` and other timm model arguments. The decoders are built by :meth:`bind` for the
    tokenizer they serve (its patch grid, K and latent width): ``width`` defaults to the
    tokenizer's decoder width, ``depth`` blocks each.
    """

    def __init__(
        self,
        hog_weight: float = 1.0,
        hog_cell: int = 8,
        hog_orientations: int = 9,
        teachers: list[dict[str, Any]] | None = None,
        width: int | None = None,
        depth: int = 3,
        num_heads: int | None = None,
    ):
        super().__init__()
        if hog_weight <= 0 and not teachers:
            raise ValueError("mask modeling needs a target: set hog_weight > 0 or give teachers")
        for t in teachers or []:
            if "model" not in t:
                raise ValueError(f"each teacher needs a timm 'model' name, got {t}")
        self.hog_weight, self.hog_cell, self.hog_orientations = (
            hog_weight,
            hog_cell,
            hog_orientations,
        )
        self.teacher_specs = [dict(t) for t in teachers or []]
        self.width, self.depth, self.num_heads = width, depth, num_heads
        self.names: list[str] = []
        self.weights: list[float] = []
        self.targets: list[FeatureTarget] = []  # kept out of the module tree (frozen, no state)
        self.decoders = nn.ModuleList()

    def bind(self, tokenizer: nn.Module) -> MaskModeling:
        """Build the targets and decoders for ``tokenizer`` (a 1D tokenizer whose encoder masks)."""
        encoder, decoder = getattr(tokenizer, "encoder", None), getattr(tokenizer, "decoder", None)
        if getattr(encoder, "mask_ratio", None) is None or not isinstance(decoder, ViTDecoder):
            raise ValueError(
                "mask modeling needs a 1D ViT tokenizer built with mask_ratio (e.g. "
                "vistok.tokenizers.titok.Tokenizer1D with preset maetok_b128)"
            )
        if self.decoders:
            raise RuntimeError("MaskModeling is already bound to a tokenizer")
        patch, grid = encoder.patch_size, encoder.image_size // encoder.patch_size
        targets: list[tuple[str, float, FeatureTarget]] = []
        if self.hog_weight > 0:
            hog = HOGTarget(patch, self.hog_cell, self.hog_orientations)
            targets.append(("hog", self.hog_weight, hog))
        for i, spec in enumerate(self.teacher_specs):
            args = {k: v for k, v in spec.items() if k != "weight"}
            name = f"teacher{i}_{spec['model'].split('.')[0]}"
            targets.append((name, float(spec.get("weight", 1.0)), TeacherTarget(grid=grid, **args)))
        width = self.width or decoder.embed.out_features
        heads = self.num_heads or max(1, width // 64)
        for name, weight, target in targets:
            self.names.append(name)
            self.weights.append(weight)
            self.targets.append(target)
            aux = ViTDecoder(
                image_size=encoder.image_size,
                patch_size=patch,
                width=width,
                depth=self.depth,
                num_heads=heads,
                num_latents=encoder.num_latents,
                z_channels=tokenizer.code_space.channels,
                feature_dim=target.dim,
            )
            # It always sees every latent: the token for dropped ones would never get a gradient
            # (frozen, so that every trainable parameter gets one in each step under DDP).
            aux.dropped_token.requires_grad_(False)
            self.decoders.append(aux)
        return self

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for target in self.targets:
            target._apply(fn, recurse)
        return self

    def forward(self, images: Tensor, latents: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
        """Weighted sum of the per-target losses and the unweighted terms (detached).

        images (B, 3, H, W) in [-1, 1]; latents (B, C, K) as the pixel decoder sees them;
        mask (B, N) bool, True = the patch was masked in the encoder (the only patches scored).
        """
        if not self.decoders:
            raise RuntimeError("MaskModeling.bind(tokenizer) was not called")
        total = latents.new_zeros((), dtype=torch.float32)
        logs = {"mask_ratio": mask.float().mean()}
        for name, weight, target, decoder in zip(
            self.names, self.weights, self.targets, self.decoders
        ):
            goal = target(images)  # (B, N, F), no gradient
            if isinstance(target, TeacherTarget):
                goal = F.layer_norm(goal, goal.shape[-1:])
            loss = masked_mse(decoder.features(latents), goal, mask)
            total = total + weight * loss
            logs[f"{name}_loss"] = loss.detach()
        return total, logs
