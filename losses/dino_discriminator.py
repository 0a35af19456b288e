"""A discriminator on frozen DINO ViT features (RobusTok's post-training discriminator).

RobusTok ("Image Tokenizer Needs Post-Training", arXiv 2509.12474) trains its decoder against a
discriminator built on a pretrained, frozen DINO ViT (as VAR and StyleGAN-T's projected
discriminators do): features are taken after several transformer blocks and small trainable
heads turn every token of each into a logit. The heads here are two 1x1 convolutions over the
tokens with a LeakyReLU between them; the public code's exact head layers are not reproduced.

The backbone needs pretrained weights to mean anything, and nothing is downloaded at run time:
``weights`` names a local file of timm's ``arch`` state dict (safetensors, or a PyTorch file read
with ``weights_only=True``), e.g. timm's ``vit_small_patch16_224.dino``. Without it the backbone
is random (useful only to exercise the code path in tests), which is logged loudly; configs keep
the PatchGAN unless a weight file is given.
"""

from __future__ import annotations

import logging

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from vistok.common.checkpoints import load_strict
from vistok.common.configurable import Configurable

log = logging.getLogger(__name__)

# ImageNet normalisation, which DINO was trained with.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def read_weights(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state))


class DINODiscriminator(Configurable, nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> logits (B, 1, len(layers) * tokens)."""

    def __init__(
        self,
        arch: str = "vit_small_patch16_224",
        weights: str | None = None,
        layers: list[int] = [2, 5, 8, 11],  # noqa: B006 - recorded in the config as is
        img_size: int = 224,
        head_width: int = 256,
    ):
        super().__init__()
        self.backbone = timm.create_model(
            arch, pretrained=False, num_classes=0, img_size=img_size, dynamic_img_size=False
        )
        if weights is not None:
            state = {k: v for k, v in read_weights(weights).items() if not k.startswith("head.")}
            load_strict(self.backbone, state, weights)
        else:
            log.warning(
                "DINODiscriminator: no weights file given, the DINO backbone is RANDOM; "
                "give a local DINO weight file (weights=...) or use the PatchGAN"
            )
        self.backbone.requires_grad_(False).eval()
        self.layers = list(layers)
        self.img_size = img_size
        dim = self.backbone.embed_dim
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Conv1d(dim, head_width, 1), nn.LeakyReLU(0.2), nn.Conv1d(head_width, 1, 1)
            )
            for _ in self.layers
        )
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: never in training mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True)
        x = ((x + 1) / 2 - self.mean) / self.std  # [-1, 1] -> ImageNet-normalised
        feats = self.backbone.forward_intermediates(
            x, indices=self.layers, output_fmt="NLC", intermediates_only=True
        )  # len(layers) x (B, tokens, dim)
        logits = [head(f.transpose(1, 2)) for head, f in zip(self.heads, feats)]  # (B, 1, N)
        return torch.cat(logits, dim=-1)  # (B, 1, len(layers) * N)
