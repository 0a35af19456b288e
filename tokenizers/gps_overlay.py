"""Draw GPSToken's Gaussians over the image, beside its reconstruction, as a PNG.

    python -m vistok.tokenizers.gps_overlay --tokenizer runs/gpstoken/checkpoints/last.ckpt \\
        --images a.jpg b.png --out gaussians.png [--sigmas 1.0] [--raw]

Each row: the image with one ellipse per token (the ``--sigmas`` contour of the Gaussian at mu,
shaped by sigma_x, sigma_y and rho), the initial entropy layout's boxes, and the reconstruction.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from vistok.common.images import to_uint8
from vistok.tokenizers.checkpoint import read_tokenizer


def ellipse_polygon(
    geometry: Tensor, height: int, width: int, sigmas: float = 1.0, points: int = 32
) -> list[list[tuple[float, float]]]:
    """Geometry (N, 5) -> per Gaussian, the pixel polygon of its ``sigmas`` contour.

    The contour is mu + sigmas * L [cos t, sin t] with L the Cholesky factor of the covariance
    [[sx^2, rho sx sy], [rho sx sy, sy^2]], mapped from [-1, 1] coordinates to pixels.
    """
    t = torch.linspace(0, 2 * math.pi, points + 1, dtype=torch.float64)[:-1]
    circle = torch.stack([t.cos(), t.sin()])  # (2, P)
    polygons = []
    for sx, sy, rho, mx, my in geometry.double().tolist():
        chol = torch.tensor(
            [[sx, 0.0], [rho * sy, sy * math.sqrt(max(1 - rho * rho, 0.0))]], dtype=torch.float64
        )
        xy = sigmas * chol @ circle + torch.tensor([[mx], [my]], dtype=torch.float64)
        px = (xy[0] + 1) * width / 2
        py = (xy[1] + 1) * height / 2
        polygons.append(list(zip(px.tolist(), py.tolist())))
    return polygons


def draw_gaussians(
    image: Tensor, geometry: Tensor, sigmas: float = 1.0, scale: int = 1
) -> Image.Image:
    """Image (3, H, W) in [-1, 1] and geometry (N, 5) -> the image with one ellipse per token."""
    h, w = image.shape[-2:]
    pil = Image.fromarray(to_uint8(image[None])[0]).resize((w * scale, h * scale), Image.NEAREST)
    draw = ImageDraw.Draw(pil)
    colours = _colours(geometry.shape[0])
    for poly, colour in zip(ellipse_polygon(geometry, h * scale, w * scale, sigmas), colours):
        draw.polygon(poly, outline=colour)
        cx, cy = np.mean(poly, axis=0)
        draw.point((cx, cy), fill=colour)
    return pil


def draw_boxes(image: Tensor, boxes: Tensor, scale: int = 1) -> Image.Image:
    """Image (3, H, W) and pixel boxes (N, 4) (y0, x0, y1, x1) -> the partition drawn on it."""
    h, w = image.shape[-2:]
    pil = Image.fromarray(to_uint8(image[None])[0]).resize((w * scale, h * scale), Image.NEAREST)
    draw = ImageDraw.Draw(pil)
    for (y0, x0, y1, x1), colour in zip(boxes.tolist(), _colours(boxes.shape[0])):
        draw.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=colour)
    return pil


def _colours(n: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(0)
    return [tuple(int(c) for c in rng.integers(64, 256, 3)) for _ in range(n)]


@torch.no_grad()
def overlay_png(tokenizer, images: Tensor, path: str | Path, sigmas: float = 1.0) -> Path:
    """One row per image: Gaussians over the image | initial partition | reconstruction."""
    tokenizer.eval()
    boxes = tokenizer.encoder.initial_layout(images)
    tokens = tokenizer.pre_quant(images, boxes)  # (B, 21, N)
    recon = tokenizer.decode(tokens).clamp(-1, 1)
    layout, _ = tokenizer.split_tokens(tokens)
    h, w = images.shape[-2:]
    scale = max(1, 256 // max(h, w))  # small images are enlarged so the ellipses stay legible
    rows = []
    for i in range(images.shape[0]):
        geometry = layout[i].t().cpu()  # (N, 5)
        panels = [
            draw_gaussians(images[i].cpu(), geometry, sigmas, scale),
            draw_boxes(images[i].cpu(), boxes[i].cpu(), scale),
            Image.fromarray(to_uint8(recon[i : i + 1])[0]).resize(
                (w * scale, h * scale), Image.NEAREST
            ),
        ]
        rows.append(np.concatenate([np.asarray(p) for p in panels], axis=1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path


def _load_images(paths: list[str], resolution: int) -> Tensor:
    out = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        side = min(img.size)  # centre crop, then resize
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution))
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--tokenizer", required=True, help="GPSToken checkpoint or exported folder")
    p.add_argument("--images", nargs="+", required=True, help="image files")
    p.add_argument("--out", default="gaussians.png")
    p.add_argument(
        "--sigmas", type=float, default=1.0, help="contour drawn, in standard deviations"
    )
    p.add_argument("--raw", action="store_true", help="a checkpoint's raw weights, not its EMA")
    a = p.parse_args(argv)
    tok = read_tokenizer(a.tokenizer, ema=not a.raw).tokenizer
    if not hasattr(tok, "split_tokens"):
        raise SystemExit(f"error: {a.tokenizer} holds a {type(tok).__name__}, not a GPSToken")
    images = _load_images(a.images, tok.resolution)
    path = overlay_png(tok, images, a.out, a.sigmas)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
