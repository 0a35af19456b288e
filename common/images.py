"""Images in [-1, 1] as uint8 pixels and labelled PNG grids (also sent to TensorBoard)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw, ImageFont
from pytorch_lightning.loggers import TensorBoardLogger
from torchvision.utils import make_grid

LABEL_MARGIN = 4  # pixels either side of a row title


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


def label_band(labels: list[str], row_height: int, pad: int) -> Image.Image:
    """A white column holding one title per grid row, vertically centred on its row."""
    font = ImageFont.load_default(size=max(10, row_height // 6))
    width = max(int(font.getlength(t)) for t in labels) + 2 * LABEL_MARGIN
    band = Image.new("RGB", (width, pad + len(labels) * row_height), "white")
    draw = ImageDraw.Draw(band)
    for i, text in enumerate(labels):
        centre = pad + i * row_height + (row_height - pad) / 2
        draw.text((LABEL_MARGIN, centre), text, fill="black", font=font, anchor="lm")
    return band


def grid_image(
    rows: list[torch.Tensor], labels: list[str] | None = None, pad: int = 2
) -> Image.Image:
    """Each tensor (B, 3, H, W) in [-1, 1] becomes one row of the grid; ``labels`` (one per row)
    are drawn as row titles in a band left of the images."""
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"{len(labels)} row labels for {len(rows)} grid rows")
    n = max(r.shape[0] for r in rows)
    tiles = []
    for r in rows:
        r = r.detach().float().cpu()
        if r.shape[0] < n:  # pad short rows with grey
            r = torch.cat([r, r.new_zeros(n - r.shape[0], *r.shape[1:])])
        tiles.append(r)
    grid = make_grid(torch.cat(tiles), nrow=n, padding=pad, value_range=(-1, 1), normalize=True)
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(array)  # (pad + rows * (H + pad), pad + n * (W + pad))
    if not labels:
        return image
    band = label_band(labels, rows[0].shape[-2] + pad, pad)
    labelled = Image.new("RGB", (band.width + image.width, image.height), "white")
    labelled.paste(band, (0, 0))
    labelled.paste(image, (band.width, 0))
    return labelled


def save_grid(
    rows: list[torch.Tensor], path: str | Path, labels: list[str] | None = None, pad: int = 2
) -> Path:
    """Writes :func:`grid_image` as a PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(rows, labels, pad).save(path)
    return path


def publish_grid(
    trainer: pl.Trainer, name: str, rows: list[torch.Tensor], labels: list[str] | None = None
) -> Path:
    """A training run's grid: ``<run>/images/<name>_<step>.png``, and the same picture as image
    ``<name>`` in every TensorBoard log of the run. Call on global rank 0."""
    step = trainer.global_step
    image = grid_image(rows, labels)
    path = Path(trainer.default_root_dir) / "images" / f"{name}_{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(name, np.asarray(image), step, dataformats="HWC")
    return path
