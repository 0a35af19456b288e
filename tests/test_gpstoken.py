"""GPSToken: token layout and bounds, zero-initialised refinement, layout/texture split, PNG."""

import pytest
import torch
from PIL import Image

from vistok.tokenizers.gps_overlay import ellipse_polygon, main, overlay_png
from vistok.tokenizers.gpstoken import (
    GPSTOKEN_PRESETS,
    GPSToken,
    geometry_to_logits,
    join_tokens,
    logits_to_geometry,
    split_tokens,
)
from vistok.tokenizers.nets.partition import boxes_to_geometry, entropy_partition

SMALL = dict(
    resolution=32, num_tokens=24, channels=16, num_res_blocks=1, num_mid_blocks=1, width=32, depth=1
)


def _tok(**kw):
    torch.manual_seed(0)
    return GPSToken("gps_m128", **{**SMALL, **kw})


def _images(n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=gen) * 2 - 1


def test_tokens_are_21_bounded_floats_declared_as_continuous_codes():
    tok = _tok().eval()
    assert tok.token_shape == (24,)
    assert tok.code_space.kind == "continuous" and tok.code_space.channels == 21
    assert tok.token_channels[:5] == ["sigma_x", "sigma_y", "rho", "mu_x", "mu_y"]
    codes = tok.encode(_images())  # (B, 21, N)
    assert codes.shape == (2, 21, 24)
    layout, texture = split_tokens(codes)
    assert layout.shape == (2, 5, 24) and texture.shape == (2, 16, 24)
    assert torch.equal(join_tokens(layout, texture), codes)
    assert ((layout[:, :2] > 0) & (layout[:, :2] < 1)).all()
    assert (layout[:, 2:].abs() < 1).all()
    with torch.no_grad():
        recon, _ = tok(_images())
    torch.testing.assert_close(tok.detokenize(codes), recon)


def test_refinement_starts_at_the_entropy_layout_and_learns_away_from_it():
    tok = _tok()
    images = _images()
    boxes = entropy_partition(images, 24)
    expected = logits_to_geometry(geometry_to_logits(boxes_to_geometry(boxes, 32, 32)))
    layout, _ = split_tokens(tok.pre_quant(images))
    torch.testing.assert_close(layout.transpose(1, 2), expected)
    # Geometry gets gradient through the renderer: one step moves it.
    opt = torch.optim.SGD(tok.parameters(), lr=1.0)
    recon, _ = tok(images)
    (recon - images).abs().mean().backward()
    assert all(p.grad is not None for p in tok.parameters() if p.requires_grad)
    assert tok.encoder.geometry_head.weight.grad.abs().sum() > 0
    opt.step()
    moved, _ = split_tokens(tok.pre_quant(images))
    assert not torch.allclose(moved, layout)


def test_layout_computed_in_dataloader_workers_gives_the_same_tokens():
    tok = _tok().eval()
    images = _images(3)
    boxes = torch.stack([entropy_partition(img, 24) for img in images])  # per image, on CPU
    with torch.no_grad():
        torch.testing.assert_close(tok.pre_quant(images, boxes), tok.pre_quant(images))


def test_dense_and_tiled_renderers_decode_identically():
    dense, tiled = _tok().eval(), _tok(renderer="tiled", tile=4).eval()
    tiled.load_state_dict(dense.state_dict())
    codes = dense.encode(_images())
    torch.testing.assert_close(tiled.detokenize(codes), dense.detokenize(codes))


@pytest.mark.parametrize("preset", sorted(GPSTOKEN_PRESETS))
def test_presets_build_and_map_to_a_quarter_resolution_feature_map(preset):
    tok = GPSToken(preset, resolution=64, channels=8, num_res_blocks=1, width=32, depth=1)
    assert tok.decoder.map_size == (16, 16)
    assert tok.token_shape == (GPSTOKEN_PRESETS[preset]["num_tokens"],)


def test_ellipses_follow_sigma_and_rho():
    # An axis-aligned Gaussian: the 1-sigma contour spans mu +- sigma in each axis.
    geometry = torch.tensor([[0.25, 0.5, 0.0, 0.0, 0.0]])
    (poly,) = ellipse_polygon(geometry, 100, 100, sigmas=1.0, points=4)
    xs, ys = zip(*poly)
    assert min(xs) == pytest.approx(37.5) and max(xs) == pytest.approx(62.5)
    assert min(ys) == pytest.approx(25.0) and max(ys) == pytest.approx(75.0)
    # rho > 0 tilts the ellipse along the x = y diagonal (y grows with x).
    (poly,) = ellipse_polygon(torch.tensor([[0.3, 0.3, 0.9, 0.0, 0.0]]), 100, 100, points=64)
    far = max(poly, key=lambda p: (p[0] - 50) ** 2 + (p[1] - 50) ** 2)
    assert (far[0] - 50) * (far[1] - 50) > 0


def test_overlay_png_and_its_cli(tmp_path):
    tok = _tok()
    path = overlay_png(tok, _images(2), tmp_path / "g.png")
    img = Image.open(path)
    assert img.size == (3 * 256, 2 * 256)  # 3 panels per row, 32 px enlarged 8x
    from vistok.common.hub import save_pretrained

    folder = save_pretrained(tok, tmp_path / "tok", "tokenizer", {"info": tok.describe()})
    Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(tmp_path / "a.png")
    out = main(
        [
            "--tokenizer",
            str(folder),
            "--images",
            str(tmp_path / "a.png"),
            "--out",
            str(tmp_path / "o.png"),
        ]
    )
    assert Image.open(out).size == (3 * 256, 256)


def test_out_of_range_generated_tokens_decode_to_finite_images():
    tok = _tok().eval()
    wild = torch.randn(2, 21, 24, generator=torch.Generator().manual_seed(0)) * 3
    wild[:, 2] = torch.tensor([1.0, -1.0]).repeat(12)  # rho exactly +-1: a degenerate Gaussian
    assert torch.isfinite(tok.detokenize(wild)).all()
