"""PSNR/SSIM on [-1, 1] images and codebook statistics against independent computations.

The DDP reduction of ``CodebookUsage`` / ``BitBalance`` is checked in
``test_fid.py::test_distributed_matches_single_process`` (it shares the 2-process run).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from vistok.evaluation.metrics import PSNR, SSIM, BitBalance, CodebookUsage


def _photo_crops(n: int = 3, size: int = 48) -> torch.Tensor:
    import skimage.data

    photo = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float() / 127.5 - 1
    return torch.stack([photo[:, 60 * i : 60 * i + size, 150 : 150 + size] for i in range(n)])


def test_psnr_known_values_per_image_mean_and_clamp():
    target = torch.zeros(2, 3, 8, 8)
    pred = target.clone()
    pred[0] += 0.1  # MSE 0.01 on a range of 2: 10 log10(4 / 0.01) = 26.0206 dB
    pred[1] += 0.2  # MSE 0.04: 20.0000 dB
    psnr = PSNR()
    psnr.update(pred[:1], target[:1])
    psnr.update(pred[1:], target[1:])
    expected = (10 * math.log10(4 / 0.01) + 10 * math.log10(4 / 0.04)) / 2
    assert float(psnr.compute()) == pytest.approx(expected, abs=1e-4)  # mean of per-image dB

    clamped = PSNR()  # 1.3 is clamped to 1.0, 0.1 away from 0.9
    clamped.update(torch.full((1, 3, 4, 4), 1.3), torch.full((1, 3, 4, 4), 0.9))
    assert float(clamped.compute()) == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-3)


def test_psnr_matches_numpy_on_photos():
    x = _photo_crops()
    y = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    psnr = PSNR()
    psnr.update(y, x)
    a, b = (x.double().numpy() + 1) / 2, (y.double().numpy() + 1) / 2  # [0, 1], range 1
    per_image = [10 * np.log10(1 / np.mean((a[i] - b[i]) ** 2)) for i in range(len(a))]
    assert float(psnr.compute()) == pytest.approx(np.mean(per_image), abs=1e-4)


def _ssim_reference(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """SSIM (Wang et al. 2004) with an 11-tap Gaussian (sigma 1.5), mirrored borders, full map."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for a, b in zip(x, y):  # (C, H, W) each
        f = lambda z: np.stack(
            [ndimage.gaussian_filter(c, 1.5, truncate=3.5, mode="mirror") for c in z]
        )
        mu_a, mu_b = f(a), f(b)
        var_a = np.maximum(f(a * a) - mu_a**2, 0)
        var_b = np.maximum(f(b * b) - mu_b**2, 0)
        cov = f(a * b) - mu_a * mu_b
        ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
            (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
        )
        values.append(ssim.mean())
    return float(np.mean(values))


def test_ssim_identical_is_one_and_matches_reference():
    x = _photo_crops()
    same = SSIM()
    same.update(x, x)
    assert float(same.compute()) == pytest.approx(1.0, abs=1e-6)

    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    ssim = SSIM()
    ssim.update(y, x)
    value = float(ssim.compute())
    # The reference convention: images in [0, 1] with data range 1.
    ref = _ssim_reference((y.double().numpy() + 1) / 2, (x.double().numpy() + 1) / 2, 1.0)
    assert 0.2 < value < 0.95
    assert value == pytest.approx(ref, abs=1e-4)
    # Values outside [-1, 1] are clamped first.
    clamped = SSIM()
    clamped.update(y * 1.5, x)
    ref_x = (x.double().numpy() + 1) / 2
    over = _ssim_reference(((y * 1.5).clamp(-1, 1).double().numpy() + 1) / 2, ref_x, 1.0)
    assert float(clamped.compute()) == pytest.approx(over, abs=1e-4)


def _brute_force(codes: np.ndarray, vocab: int) -> tuple[float, float]:
    counts = np.array([np.sum(codes == k) for k in range(vocab)], dtype=np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(np.mean(counts > 0)), float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("groups", [1, 4])
def test_codebook_usage_matches_brute_force(groups):
    g = torch.Generator().manual_seed(groups)
    vocab = 32
    # Skewed use over 24 of 32 codes (per group a different skew), accumulated in 3 updates.
    shape = (3, 6, 5, 5, groups) if groups > 1 else (3, 6, 5, 5)
    probs = torch.rand(24, generator=g) ** 3
    codes = torch.multinomial(probs, int(np.prod(shape)), replacement=True, generator=g)
    codes = codes.reshape(shape)
    if groups > 1:
        codes = (codes + torch.arange(groups) * 3) % vocab  # group g uses a shifted block
    metric = CodebookUsage(vocab_size=vocab, groups=groups)
    for batch in codes:
        metric.update(batch)
    out = metric.compute()

    flat = codes.numpy().reshape(-1, groups)
    per_group = [_brute_force(flat[:, k], vocab) for k in range(groups)]
    assert float(out["usage"]) == pytest.approx(np.mean([u for u, _ in per_group]))
    assert float(out["perplexity"]) == pytest.approx(np.mean([p for _, p in per_group]))
    assert int(metric.counts.sum()) == flat.size


def test_codebook_usage_uniform_and_invalid_input():
    metric = CodebookUsage(vocab_size=8)
    metric.update(torch.arange(8).repeat(5))
    out = metric.compute()
    assert float(out["usage"]) == 1.0 and float(out["perplexity"]) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="outside"):
        metric.update(torch.tensor([8]))
    with pytest.raises(TypeError):
        metric.update(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="groups=2"):
        CodebookUsage(vocab_size=8, groups=2).update(torch.zeros(4, 3, dtype=torch.long))


@pytest.mark.parametrize("signed", [False, True])
def test_bit_balance_matches_brute_force(signed):
    g = torch.Generator().manual_seed(3)
    p_true = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.0])
    bits = (torch.rand(4, 50, 5, generator=g) < p_true).long()  # (B, N, bits)
    values = bits * 2 - 1 if signed else bits  # LFQ signs or {0, 1}
    metric = BitBalance(bits=5)
    for batch in values:
        metric.update(batch)
    out = metric.compute()
    p = bits.reshape(-1, 5).double().mean(0).numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    h = np.nan_to_num(h)  # a constant bit has entropy 0
    np.testing.assert_allclose(out["ones_fraction"].numpy(), p, atol=1e-12)
    assert float(out["entropy"]) == pytest.approx(h.mean())
    assert float(out["max_imbalance"]) == pytest.approx(np.abs(p - 0.5).max())
