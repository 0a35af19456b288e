"""Gaussian splatting renderer and the entropy partition: values, gradients, invariants."""

import math

import pytest
import torch
from helpers import photo_crops
from PIL import Image

from vistok.tokenizers.nets.partition import boxes_to_geometry, entropy_partition
from vistok.tokenizers.nets.splatting import (
    gaussian_boxes,
    pixel_centres,
    render_dense,
    render_tiled,
)

RENDERERS = {
    "dense": render_dense,
    "tiled": lambda g, f, size: render_tiled(g, f, size, tile=4),
}


def _random_geometry(b, n, gen, dtype=torch.float32, sigma=(0.05, 0.4)):
    lo, hi = sigma
    s = lo + (hi - lo) * torch.rand(b, n, 2, generator=gen, dtype=dtype)
    rho = 1.6 * torch.rand(b, n, 1, generator=gen, dtype=dtype) - 0.8
    mu = 2.2 * torch.rand(b, n, 2, generator=gen, dtype=dtype) - 1.1  # some centres off-image
    return torch.cat([s, rho, mu], dim=-1)


@pytest.mark.parametrize("mode", sorted(RENDERERS))
def test_single_gaussian_matches_the_closed_form(mode):
    sx, sy, rho, mx, my = 0.3, 0.15, 0.5, 0.1, -0.2
    geometry = torch.tensor([[[sx, sy, rho, mx, my]]], dtype=torch.float64)
    features = torch.tensor([[[2.0, -1.0]]], dtype=torch.float64)  # (B, N, C)
    out = RENDERERS[mode](geometry, features, (12, 10))  # (1, 2, 12, 10)
    pts = pixel_centres(12, 10, dtype=torch.float64)
    for i, j in [(5, 5), (0, 0), (3, 7), (11, 9), (7, 2)]:
        x, y = pts[i, j].tolist()
        dx, dy = x - mx, y - my
        q = dx**2 / sx**2 - 2 * rho * dx * dy / (sx * sy) + dy**2 / sy**2
        g = math.exp(-q / (2 * (1 - rho**2))) if q / (1 - rho**2) <= 9 else 0.0
        assert out[0, 0, i, j].item() == pytest.approx(2.0 * g, abs=1e-12)
        assert out[0, 1, i, j].item() == pytest.approx(-1.0 * g, abs=1e-12)


def test_tiled_equals_dense_on_random_tokens_and_odd_sizes():
    gen = torch.Generator().manual_seed(0)
    geometry = _random_geometry(2, 40, gen)
    features = torch.randn(2, 40, 3, generator=gen)
    for size in [(16, 16), (13, 22)]:
        dense = render_dense(geometry, features, size)
        for tile in (4, 5, 16):
            tiled = render_tiled(geometry, features, size, tile=tile)
            torch.testing.assert_close(tiled, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", sorted(RENDERERS))
def test_gradients_match_finite_differences(mode):
    gen = torch.Generator().manual_seed(1)
    geometry = _random_geometry(1, 3, gen, torch.float64, sigma=(0.2, 0.5))
    features = torch.randn(1, 3, 2, generator=gen, dtype=torch.float64)
    weights = torch.randn(1, 2, 6, 6, generator=gen, dtype=torch.float64)

    def f(g, t):  # a random linear read-out of the 6 x 6 map
        return (RENDERERS[mode](g, t, (6, 6)) * weights).sum()

    # The truncation makes the map piecewise smooth; gradcheck's steps (1e-6) stay inside a piece.
    assert torch.autograd.gradcheck(
        f, (geometry.requires_grad_(), features.requires_grad_()), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("mode", sorted(RENDERERS))
def test_vanishing_sigma_contributes_nothing_outside_its_truncation_box(mode):
    gen = torch.Generator().manual_seed(2)
    geometry = _random_geometry(1, 6, gen)
    geometry[0, :, :2] = torch.tensor([1e-9, 1e-4, 1e-3, 1e-2, 1e-9, 1e-3]).reshape(6, 1)
    pts = pixel_centres(16, 16)
    geometry[0, 2, 3:] = pts[5, 7]  # a needle exactly on a pixel centre: g = 1 there
    features = torch.randn(1, 6, 4, generator=gen)
    out = RENDERERS[mode](geometry, features, (16, 16))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :, 5, 7], features[0, 2])
    box = gaussian_boxes(geometry)[0]  # (N, 4)
    # Each token alone: zero everywhere outside its own box.
    for i in range(6):
        single = RENDERERS[mode](geometry[:, i : i + 1], features[:, i : i + 1], (16, 16))
        x0, y0, x1, y1 = box[i].tolist()
        inside = (pts[..., 0] >= x0) & (pts[..., 0] <= x1)
        inside &= (pts[..., 1] >= y0) & (pts[..., 1] <= y1)
        assert (single[0][:, ~inside] == 0).all()
        if i in (0, 4):  # sigma 1e-9: a box far narrower than a pixel, nothing lands anywhere
            assert (single == 0).all()


def test_entropy_partition_tiles_the_image_with_exactly_n_regions(tmp_path):
    paths = photo_crops(tmp_path, 3, size=40)
    images = torch.stack(
        [torch.tensor(list(Image.open(p).getdata()), dtype=torch.float32) for p in paths]
    )
    images = images.reshape(3, 40, 40, 3).permute(0, 3, 1, 2) / 127.5 - 1
    flat = torch.zeros(1, 3, 40, 40)  # no texture at all: splits by size
    cases = [(images, 1), (images, 37), (images, 128), (flat, 50), (images[:1, :, :6, :5], 30)]
    for batch, n in cases:
        boxes = entropy_partition(batch, n)
        assert boxes.shape == (batch.shape[0], n, 4)
        h, w = batch.shape[-2:]
        for b in range(batch.shape[0]):
            cover = torch.zeros(h, w, dtype=torch.long)
            for y0, x0, y1, x1 in boxes[b].tolist():
                assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
                cover[y0:y1, x0:x1] += 1
            assert (cover == 1).all()  # every pixel in exactly one region
    # One image alone gives the same boxes as in a batch; a CPU (C, H, W) tensor works too.
    assert torch.equal(entropy_partition(images[1], 37), entropy_partition(images, 37)[1])
    with pytest.raises(ValueError, match="num_regions"):
        entropy_partition(images[:, :, :4, :4], 17)


def test_detailed_regions_get_smaller_boxes():
    # Left half noise, right half flat: the noisy half must get (almost) all the splits.
    gen = torch.Generator().manual_seed(0)
    image = torch.zeros(1, 3, 32, 32)
    image[..., :16] = torch.rand(1, 3, 32, 16, generator=gen) * 2 - 1
    boxes = entropy_partition(image, 16)[0]
    left = (boxes[:, 3] <= 16).sum().item()
    assert left >= 14, boxes
    geometry = boxes_to_geometry(boxes, 32, 32)
    assert (geometry[:, 0] > 0).all() and (geometry[:, 3].abs() < 1).all()
