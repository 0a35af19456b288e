"""Per-patch target features for mask modeling (MAETok, https://arxiv.org/abs/2502.03444).

Every target maps images (B, 3, H, W) in [-1, 1] to features on a patch grid, (B, N, F) with the
patches in row-major order, computed without gradient:

- :class:`HOGTarget`: histograms of oriented gradients in plain PyTorch (no weights). The cell
  histograms are those of scikit-image's ``skimage.feature.hog`` (Dalal-Triggs as implemented
  there): central-difference gradients (zero on the image border), at each pixel the channel with
  the largest gradient magnitude, unsigned orientation in [0, 180) degrees, hard binning into
  ``orientations`` equal bins, magnitudes summed per cell and divided by the cell's area. Each
  cell's histogram is then L2-normalised on its own, ``h / sqrt(|h|^2 + eps^2)``, which is
  ``hog(..., cells_per_block=(1, 1), block_norm="L2")``; MaskFeat (Wei et al. 2022) also
  normalises per cell. A patch's feature is the concatenation of its cells' histograms.
- :class:`TeacherTarget`: the patch-token features of a frozen timm ViT (DINOv2, CLIP, SigLIP ...),
  read from a local weight file the user gives (safetensors, or a plain state dict read with
  ``torch.load(weights_only=True)``); resized to the tokenizer's patch grid. Without a file the
  teacher is randomly initialised (a warning says so): that only exercises the code path.

Teachers are held outside the module tree (like LPIPS's VGG), so they are never in a checkpoint.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vistok.common.configurable import Configurable
from vistok.losses.perceptual import FrozenNet


def image_gradients(images: Tensor) -> tuple[Tensor, Tensor]:
    """Central differences (B, C, H, W) -> (d/drow, d/dcol), each (B, C, H, W), zero on the
    border rows (resp. columns) as in scikit-image's HOG."""
    g_row, g_col = torch.zeros_like(images), torch.zeros_like(images)
    g_row[..., 1:-1, :] = images[..., 2:, :] - images[..., :-2, :]
    g_col[..., :, 1:-1] = images[..., :, 2:] - images[..., :, :-2]
    return g_row, g_col


def hog_cells(images: Tensor, cell: int, orientations: int) -> Tensor:
    """Unnormalised cell histograms (B, H / cell, W / cell, orientations) of images (B, C, H, W).

    Per pixel the channel with the largest gradient magnitude is used (the first on ties), its
    unsigned orientation falls in bin floor(angle / (180 / orientations)), and each cell sums its
    pixels' magnitudes per bin, divided by cell * cell.
    """
    b, _, h, w = images.shape
    if h % cell or w % cell:
        raise ValueError(f"HOG cell {cell} does not divide the image size {h}x{w}")
    g_row, g_col = image_gradients(images)
    magnitude = torch.hypot(g_row, g_col)  # (B, C, H, W)
    best = magnitude.argmax(dim=1, keepdim=True)  # (B, 1, H, W)
    g_row, g_col = g_row.gather(1, best)[:, 0], g_col.gather(1, best)[:, 0]  # (B, H, W)
    magnitude = magnitude.gather(1, best)[:, 0]
    angle = torch.rad2deg(torch.atan2(g_row, g_col)) % 180.0  # (B, H, W) in [0, 180)
    bins = (angle / (180.0 / orientations)).floor().long().clamp_(0, orientations - 1)
    votes = F.one_hot(bins, orientations).to(magnitude.dtype) * magnitude[..., None]
    votes = rearrange(votes, "b (y p) (x q) o -> b y x (p q) o", p=cell, q=cell)
    return votes.sum(dim=3) / (cell * cell)  # (B, H/cell, W/cell, O)


def hog_features(images: Tensor, cell: int = 8, orientations: int = 9, eps: float = 1e-5) -> Tensor:
    """Per-cell L2-normalised HOG (B, H / cell, W / cell, orientations); see the module doc."""
    hist = hog_cells(images, cell, orientations)
    return hist / torch.sqrt(hist.pow(2).sum(-1, keepdim=True) + eps**2)


def cells_to_patches(cells: Tensor, patch_size: int, cell: int) -> Tensor:
    """(B, H/cell, W/cell, F) cell features -> (B, N, (patch/cell)^2 * F) per patch, row-major."""
    r = patch_size // cell
    return rearrange(cells, "b (y p) (x q) f -> b (y x) (p q f)", p=r, q=r)


class FeatureTarget(Configurable, nn.Module):
    """Base: ``forward(images) -> (B, N, dim)`` on the tokenizer's patch grid, no gradient."""

    dim: int


class HOGTarget(FeatureTarget):
    """HOG of each patch: (patch / cell)^2 cells x ``orientations`` bins."""

    def __init__(
        self, patch_size: int = 16, cell_size: int = 8, orientations: int = 9, eps: float = 1e-5
    ):
        super().__init__()
        if patch_size % cell_size:
            raise ValueError(f"HOG cell_size {cell_size} must divide the patch size {patch_size}")
        self.patch_size, self.cell_size = patch_size, cell_size
        self.orientations, self.eps = orientations, eps
        self.dim = (patch_size // cell_size) ** 2 * orientations

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        cells = hog_features(images.float(), self.cell_size, self.orientations, self.eps)
        return cells_to_patches(cells, self.patch_size, self.cell_size)  # (B, N, dim)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A weight file as a state dict: safetensors, or torch.load with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights {str(path)!r} do not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):  # common wrappers of released checkpoints
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


class TeacherTarget(FeatureTarget, FrozenNet):
    """Patch features of a frozen timm vision transformer, on the tokenizer's patch grid.

    ``model`` is a timm model name (e.g. ``vit_base_patch14_dinov2.lvd142m``,
    ``vit_base_patch16_clip_224.openai``); ``weights`` a local file with that model's timm state
    dict. Images are mapped from [-1, 1] to the teacher's normalisation and resized to its input
    size; its patch tokens (prefix tokens dropped) are resized bilinearly to ``grid`` x ``grid``.
    """

    def __init__(
        self,
        model: str,
        weights: str | None = None,
        grid: int = 16,
        img_size: int | None = None,
        **model_args,
    ):
        super().__init__()
        import timm

        extra = dict(model_args)
        if img_size is not None:
            extra["img_size"] = img_size
        net = timm.create_model(model, pretrained=False, num_classes=0, **extra)
        if weights is None:
            warnings.warn(
                f"teacher {model!r} has no weights file: it is randomly initialised, which only "
                "exercises the code path; give the released weights as `weights`",
                stacklevel=2,
            )
        else:
            missing, unexpected = net.load_state_dict(read_state_dict(weights), strict=False)
            missing = [k for k in missing if not k.startswith("head")]
            if missing or unexpected:
                raise ValueError(
                    f"{weights} does not fit timm model {model!r}: missing {missing[:10]}, "
                    f"unexpected {unexpected[:10]}"
                )
        self.hold(net)  # a plain attribute: never in a state_dict or checkpoint
        cfg = net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.input_size = tuple(net.patch_embed.img_size)
        self.grid = grid
        self.dim = net.num_features

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = (images.float() + 1) / 2
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False)
        tokens = self.net.forward_features((x - self.mean) / self.std)  # (B, P + n, D)
        tokens = tokens[:, self.net.num_prefix_tokens :]
        side = math.isqrt(tokens.shape[1])
        maps = rearrange(tokens, "b (h w) d -> b d h w", h=side)
        if side != self.grid:
            maps = F.interpolate(maps, size=(self.grid, self.grid), mode="bilinear")
        return rearrange(maps, "b d h w -> b (h w) d")  # (B, N, D)
