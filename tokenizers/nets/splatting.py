"""Differentiable splatting of 2D Gaussians into a feature map, in plain PyTorch.

GPSToken (Gaussian-parameterised spatially adaptive tokens, 2025) renders each token i, a Gaussian
with geometry (sigma_x, sigma_y, rho, mu_x, mu_y) and features f_i, as

    F(p) = sum_i g_i(p) f_i,   g_i(p) = exp(-Q / (2 (1 - rho^2))),
    Q = dx^2 / sx^2 - 2 rho dx dy / (sx sy) + dy^2 / sy^2,   (dx, dy) = p - mu,

without normalisation, truncated at 3 sigma: g_i = 0 where the Mahalanobis distance
sqrt(Q / (1 - rho^2)) exceeds ``truncate``. The paper uses a custom CUDA kernel; these are two
autograd-friendly PyTorch versions that give the same values:

- ``render_dense`` evaluates every Gaussian at every pixel: memory B * N * H * W.
- ``render_tiled`` cuts the map into square tiles and evaluates, per tile, only the Gaussians
  whose 3-sigma box meets it (padded to the busiest tile): memory B * H * W * K_max. It wins
  when Gaussians are small compared with the map; K_max is read back to the host once per call.

Coordinates are [-1, 1] on both axes (x to the right, y down), pixel centres at
(2 j + 1) / W - 1, as in ``F.grid_sample(align_corners=False)``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor, nn

# sigma and 1 - rho^2 are kept above these so that Q stays finite (no inf - inf -> NaN).
_MIN_SIGMA = 1e-6
_MIN_DET = 1e-4


def _dtype(x: Tensor) -> torch.dtype:
    """Rendering runs in float32 at least (bf16 exponents are too coarse), float64 if given."""
    return torch.promote_types(x.dtype, torch.float32)


def pixel_centres(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """(H, W, 2) (x, y) centres of the pixels in [-1, 1] coordinates."""
    ys = (2 * torch.arange(height, device=device, dtype=dtype) + 1) / height - 1
    xs = (2 * torch.arange(width, device=device, dtype=dtype) + 1) / width - 1
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y], dim=-1)


def gaussian_weights(geometry: Tensor, points: Tensor, truncate: float = 3.0) -> Tensor:
    """g_i(p) for geometry (..., N, 5) and points (..., P, 2) -> (..., N, P), 0 beyond truncation.

    ``geometry`` is (sigma_x, sigma_y, rho, mu_x, mu_y); leading dims broadcast.
    """
    sx, sy, rho, mx, my = geometry.unbind(-1)  # each (..., N)
    sx, sy = sx.clamp_min(_MIN_SIGMA)[..., None], sy.clamp_min(_MIN_SIGMA)[..., None]
    rho = rho[..., None]
    u = (points[..., None, :, 0] - mx[..., None]) / sx  # (..., N, P)
    v = (points[..., None, :, 1] - my[..., None]) / sy
    det = (1 - rho.square()).clamp_min(_MIN_DET)
    mahalanobis2 = (u.square() - 2 * rho * u * v + v.square()) / det
    inside = mahalanobis2 <= truncate**2
    # Outside the truncation the exponent is replaced before exp, so no gradient comes from there.
    return torch.exp(-0.5 * torch.where(inside, mahalanobis2, torch.full_like(mahalanobis2, 1e4)))


def render_dense(
    geometry: Tensor, features: Tensor, size: tuple[int, int], truncate: float = 3.0
) -> Tensor:
    """Geometry (B, N, 5), features (B, N, C) -> feature map (B, C, H, W)."""
    h, w = size
    dt = _dtype(geometry)
    with torch.autocast(device_type=geometry.device.type, enabled=False):
        points = pixel_centres(h, w, geometry.device, dt).reshape(1, h * w, 2)  # (1, P, 2)
        g = gaussian_weights(geometry.to(dt), points, truncate)  # (B, N, P)
        out = torch.einsum("bnp,bnc->bcp", g, features.to(dt))  # (B, C, P)
    return rearrange(out, "b c (h w) -> b c h w", h=h).to(features.dtype)


def gaussian_boxes(geometry: Tensor, truncate: float = 3.0) -> Tensor:
    """(B, N, 4) (x0, y0, x1, y1) in [-1, 1] coordinates: the box of each truncated Gaussian.

    The ellipse at Mahalanobis distance t has the axis-aligned extent mu +- t * sigma whatever
    rho is (sigma_x is the marginal standard deviation along x).
    """
    sx, sy, _, mx, my = geometry.unbind(-1)
    sx, sy = sx.clamp_min(_MIN_SIGMA) * truncate, sy.clamp_min(_MIN_SIGMA) * truncate
    return torch.stack([mx - sx, my - sy, mx + sx, my + sy], dim=-1)


def render_tiled(
    geometry: Tensor,
    features: Tensor,
    size: tuple[int, int],
    truncate: float = 3.0,
    tile: int = 16,
) -> Tensor:
    """Same result as ``render_dense``, evaluating each tile only with the Gaussians that reach it.

    Geometry (B, N, 5), features (B, N, C) -> (B, C, H, W). H and W need not divide by ``tile``.
    """
    h, w = size
    b, n, c = features.shape
    th, tw = math.ceil(h / tile), math.ceil(w / tile)
    dt = _dtype(geometry)
    with torch.autocast(device_type=geometry.device.type, enabled=False):
        geometry, features = geometry.to(dt), features.to(dt)
        dev = geometry.device
        # Pixel centres of the padded map, grouped by tile: (T, tile*tile, 2), T = th * tw.
        pts = pixel_centres(th * tile, tw * tile, dev, dt)
        pts[..., 0] = (pts[..., 0] + 1) * (tw * tile) / w - 1  # same pixel pitch as the H x W map
        pts[..., 1] = (pts[..., 1] + 1) * (th * tile) / h - 1
        pts = rearrange(pts, "(ty py) (tx px) d -> (ty tx) (py px) d", py=tile, px=tile)
        # Tile extents in [-1, 1] coordinates, outer pixel edges: (T, 4) (x0, y0, x1, y1).
        half_x, half_y = 1.0 / w, 1.0 / h
        lo = pts.amin(dim=1) - torch.tensor([half_x, half_y], device=dev, dtype=dt)
        hi = pts.amax(dim=1) + torch.tensor([half_x, half_y], device=dev, dtype=dt)
        box = gaussian_boxes(geometry, truncate)  # (B, N, 4)
        hits = (
            (box[:, None, :, 0] <= hi[None, :, None, 0])
            & (box[:, None, :, 2] >= lo[None, :, None, 0])
            & (box[:, None, :, 1] <= hi[None, :, None, 1])
            & (box[:, None, :, 3] >= lo[None, :, None, 1])
        )  # (B, T, N)
        k = max(int(hits.sum(-1).max()), 1)  # the busiest tile
        order = torch.argsort(hits.to(torch.int8), dim=-1, descending=True, stable=True)
        idx = order[..., :k]  # (B, T, K): the Gaussians hitting each tile first
        valid = torch.gather(hits, 2, idx)  # (B, T, K)
        flat = rearrange(idx, "b t k -> b (t k)")
        geo = torch.gather(geometry, 1, flat[..., None].expand(-1, -1, 5))
        feat = torch.gather(features, 1, flat[..., None].expand(-1, -1, c))
        geo = rearrange(geo, "b (t k) g -> b t k g", k=k)  # (B, T, K, 5)
        feat = rearrange(feat, "b (t k) f -> b t k f", k=k)  # (B, T, K, C)
        g = gaussian_weights(geo, pts[None], truncate) * valid[..., None]  # (B, T, K, tile^2)
        out = torch.einsum("btkp,btkc->btcp", g, feat)  # (B, T, C, tile^2)
        out = rearrange(out, "b (ty tx) c (py px) -> b c (ty py) (tx px)", tx=tw, py=tile, px=tile)
    return out[:, :, :h, :w].to(features.dtype)


class SplatRenderer(nn.Module):
    """Tokens' geometry (B, N, 5) and features (B, N, C) -> feature map (B, C, H, W)."""

    def __init__(
        self, mode: Literal["dense", "tiled"] = "dense", truncate: float = 3.0, tile: int = 16
    ):
        super().__init__()
        if mode not in ("dense", "tiled"):
            raise ValueError(f"renderer mode must be 'dense' or 'tiled', got {mode!r}")
        self.mode, self.truncate, self.tile = mode, truncate, tile

    def extra_repr(self) -> str:
        return f"mode={self.mode}, truncate={self.truncate}, tile={self.tile}"

    def forward(self, geometry: Tensor, features: Tensor, size: tuple[int, int]) -> Tensor:
        if self.mode == "tiled":
            return render_tiled(geometry, features, size, self.truncate, self.tile)
        return render_dense(geometry, features, size, self.truncate)
