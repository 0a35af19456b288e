"""Entropy-driven initial partition of an image into N rectangles (GPSToken's initial layout).

A region's complexity is (entropy of the histogram of its Sobel gradient magnitudes)^2.5 times
its area; the most complex region is split in half along its longer side until there are N
regions, so detailed areas get many small regions and flat areas few large ones.

Vectorised over the batch with integral histograms: one cumulative sum per histogram bin makes the
histogram of any rectangle four lookups, so each of the N - 1 splits costs O(B * bins). Plain
torch on whatever device the images are on: CPU tensors in dataloader workers, or the GPU batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_magnitude(images: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H, W) gradient magnitude of the channel mean (replicate padding)."""
    grey = images.float().mean(1, keepdim=True)  # (B, 1, H, W)
    kx = _SOBEL.to(grey.device)
    kernels = torch.stack([kx, kx.t()])[:, None]  # (2, 1, 3, 3)
    grad = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)  # (B, 2, H, W)
    return grad.square().sum(1).sqrt()


def integral_histograms(magnitude: Tensor, bins: int) -> Tensor:
    """(B, H, W) -> (B, bins, (H+1) * (W+1)) integral images of each bin's indicator.

    Bins split [0, per-image max] evenly, so the measure does not depend on contrast.
    """
    b, h, w = magnitude.shape
    top = magnitude.flatten(1).amax(1).clamp_min(1e-8)[:, None, None]
    index = (magnitude / top * bins).long().clamp_(max=bins - 1)  # (B, H, W)
    onehot = F.one_hot(index, bins).permute(0, 3, 1, 2).to(torch.int32)  # (B, bins, H, W)
    integral = F.pad(onehot.cumsum(2).cumsum(3), (1, 0, 1, 0))  # (B, bins, H+1, W+1)
    return integral.flatten(2)


def box_histograms(integral: Tensor, boxes: Tensor, width: int) -> Tensor:
    """Histograms (B, R, bins) of boxes (B, R, 4) = (y0, x0, y1, x1), end-exclusive pixels."""
    y0, x0, y1, x1 = boxes.unbind(-1)
    stride = width + 1

    def at(y: Tensor, x: Tensor) -> Tensor:  # (B, R) -> (B, bins, R)
        idx = (y * stride + x)[:, None].expand(-1, integral.shape[1], -1)
        return torch.gather(integral, 2, idx)

    hist = at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)  # (B, bins, R)
    return hist.transpose(1, 2).float()


def complexity(hist: Tensor, boxes: Tensor, exponent: float = 2.5) -> Tensor:
    """(entropy in bits)^exponent * area, (B, R); regions of one pixel cannot split: -inf.

    A small floor on the entropy term makes flat regions split largest-first instead of in
    index order.
    """
    p = hist / hist.sum(-1, keepdim=True).clamp_min(1)
    entropy = torch.special.entr(p).sum(-1) / math.log(2)
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).float()
    score = (entropy.pow(exponent) + 1e-3) * area
    return torch.where(area > 1, score, torch.full_like(score, -torch.inf))


def halves(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Split boxes (..., 4) in two along their longer side (rows on ties)."""
    y0, x0, y1, x1 = boxes.unbind(-1)
    along_y = (y1 - y0) >= (x1 - x0)
    ym, xm = (y0 + y1) // 2, (x0 + x1) // 2
    first = torch.stack(
        [y0, x0, torch.where(along_y, ym, y1), torch.where(along_y, x1, xm)], dim=-1
    )
    second = torch.stack(
        [torch.where(along_y, ym, y0), torch.where(along_y, x0, xm), y1, x1], dim=-1
    )
    return first, second


@torch.no_grad()
def entropy_partition(
    images: Tensor, num_regions: int, bins: int = 32, exponent: float = 2.5
) -> Tensor:
    """Images (B, C, H, W) or (C, H, W) -> boxes (B, N, 4) or (N, 4), int64 (y0, x0, y1, x1).

    The N end-exclusive pixel boxes tile the image exactly (every pixel in exactly one box).
    """
    single = images.dim() == 3
    if single:
        images = images[None]
    b, _, h, w = images.shape
    if not 1 <= num_regions <= h * w:
        raise ValueError(
            f"num_regions must be in [1, {h * w}] for {h}x{w} images, got {num_regions}"
        )
    integral = integral_histograms(sobel_magnitude(images), bins)
    dev, rows = images.device, torch.arange(b, device=images.device)
    boxes = torch.zeros(b, num_regions, 4, dtype=torch.long, device=dev)
    boxes[:, 0] = torch.tensor([0, 0, h, w], device=dev)
    score = torch.full((b, num_regions), -torch.inf, device=dev)
    score[:, :1] = complexity(box_histograms(integral, boxes[:, :1], w), boxes[:, :1], exponent)
    for i in range(1, num_regions):
        j = score.argmax(1)  # (B,) the most complex region of each image
        first, second = halves(boxes[rows, j])  # (B, 4) each
        pair = torch.stack([first, second], dim=1)  # (B, 2, 4)
        pair_score = complexity(box_histograms(integral, pair, w), pair, exponent)  # (B, 2)
        boxes[rows, j], boxes[:, i] = first, second
        score[rows, j], score[:, i] = pair_score[:, 0], pair_score[:, 1]
    return boxes[0] if single else boxes


def boxes_to_geometry(boxes: Tensor, height: int, width: int, sigma_scale: float = 2 / 3) -> Tensor:
    """Pixel boxes (..., 4) -> Gaussians (..., 5) = (sigma_x, sigma_y, rho, mu_x, mu_y).

    Each Gaussian sits at its box centre with rho = 0 and sigma = ``sigma_scale`` times the box
    size, all in [-1, 1] image coordinates (where the image is 2 wide).
    """
    y0, x0, y1, x1 = boxes.float().unbind(-1)
    mu_x, mu_y = (x0 + x1) / width - 1, (y0 + y1) / height - 1
    sigma_x = sigma_scale * 2 * (x1 - x0) / width
    sigma_y = sigma_scale * 2 * (y1 - y0) / height
    return torch.stack([sigma_x, sigma_y, torch.zeros_like(mu_x), mu_x, mu_y], dim=-1)
