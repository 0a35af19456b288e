"""Images in [-1, 1] as uint8 pixels and PNG grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid


def uint8_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 in [0, 255] (any shape), rounded like an image file.

    uint8 input passes through; the rounding is the one the ADM evaluator expects.
    """
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"expected float images in [-1, 1] or uint8, got {images.dtype}")
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 numpy, for PNG/npz writers."""
    return uint8_pixels(images).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(rows: list[torch.Tensor], path: str | Path, pad: int = 2) -> Path:
    """Each tensor (B, 3, H, W) in [-1, 1] becomes one row of the grid."""
    n = max(r.shape[0] for r in rows)
    tiles = []
    for r in rows:
        r = r.detach().float().cpu()
        if r.shape[0] < n:  # pad short rows with grey
            r = torch.cat([r, r.new_zeros(n - r.shape[0], *r.shape[1:])])
        tiles.append(r)
    grid = make_grid(torch.cat(tiles), nrow=n, padding=pad, value_range=(-1, 1), normalize=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)
    return path
