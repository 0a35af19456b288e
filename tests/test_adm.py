"""ADM's evaluator numbers: sFID layer and features, precision/recall, reference batches.

Independent references: the TorchScript copy of the TF Inception graph (its layers keep the TF
names, so ``mixed_6.conv`` is taken by name there), numpy/scipy statistics and brute-force
nearest neighbours with ``scipy.spatial.distance.cdist``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run
from scipy.spatial.distance import cdist
from test_fid import crops, noisy
from test_pfid import _write_split

from vistok.common.images import uint8_pixels as to_uint8
from vistok.evaluation import inception
from vistok.evaluation.adm import (
    SPATIAL_DIM,
    ADMMetrics,
    manifold_radii,
    precision_recall,
)
from vistok.evaluation.fid import FID, frechet_distance_torch, mean_cov
from vistok.evaluation.ref_batch import (
    RefBatchError,
    fill_pool_reference,
    read_ref_batch,
    reference_metrics,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _scripted_features(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(pool 2048, ADM spatial 2023) from the TF graph's TorchScript copy, by TF layer names;
    x: uint8 (B, 3, 299, 299)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        net = torch.jit.load(str(inception._source_path()), map_location="cpu").eval()
    layers = net.net.layers
    h = (x.float() - 128) / 128
    with torch.no_grad():
        pool = net(h)
        for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1"]:
            h = getattr(layers, name)(h)
        for i in ["", "_1", "_2", "_3", "_4", "_5"]:
            h = getattr(layers, f"mixed{i}")(h)
        conv = layers.mixed_6.conv(h)  # TF "mixed_6/conv:0": (B, 192, 17, 17)
    nhwc = conv.permute(0, 2, 3, 1)[..., :7]  # ADM: spatial[..., :7] on NHWC, then flatten
    return pool.double().numpy(), nhwc.reshape(len(x), -1).double().numpy()


def _stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return f.mean(0), np.cov(f, rowvar=False)


def _brute_pr(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    def radii(f):
        return np.sort(cdist(f, f, "sqeuclidean"), axis=1)[:, k]  # column 0 is the point itself

    d = cdist(fake, real, "sqeuclidean")  # (M, N)
    precision = np.mean((d <= radii(real)[None]).any(1))
    recall = np.mean((d.T <= radii(fake)[None]).any(1))
    return float(precision), float(recall)


def test_precision_recall_equal_brute_force_nearest_neighbours():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 12))
    fake = np.concatenate([rng.normal(size=(30, 12)), rng.normal(2.0, 0.5, size=(25, 12))])
    expected = _brute_pr(real, fake)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # neither trivial
    for row_batch in (7, 1000):  # blocks of rows give the same answer as one block
        got = precision_recall(
            torch.from_numpy(real), torch.from_numpy(fake), row_batch=row_batch, dtype=torch.float64
        )
        assert got == pytest.approx(expected, abs=1e-12)
    radii = manifold_radii(torch.from_numpy(real), row_batch=5).numpy()
    np.testing.assert_allclose(radii, np.sort(cdist(real, real, "sqeuclidean"), 1)[:, 3], rtol=1e-9)
    with pytest.raises(ValueError, match="more than k=3"):
        manifold_radii(torch.zeros(3, 4))


def test_fid_sfid_precision_recall_equal_numpy_on_tf_graph_features(tmp_path):
    # 299 px inputs: torch-fidelity's resize is then the identity and both paths see the same
    # pixels; the reference path takes mixed_6/conv by its TF name.
    up = lambda x: to_uint8(F.interpolate(x, size=(299, 299), mode="bilinear"))
    real, fake = up(crops(8, size=64, seed=0)), up(noisy(crops(8, size=64, seed=4), 0.1))
    metrics = ADMMetrics(stats_dir=tmp_path)
    metrics.update(real, real=True)
    metrics.update(fake[:5], real=False)
    metrics.update(fake[5:], real=False)  # batches add up
    got = metrics.results()

    pool_r, spat_r = _scripted_features(real)
    pool_f, spat_f = _scripted_features(fake)
    assert spat_r.shape == (8, SPATIAL_DIM) == (8, 2023)
    np.testing.assert_allclose(torch.cat(metrics.real_pool).numpy(), pool_r, atol=1e-4)
    # The statistics are numpy's on the TF graph's features; the distance between them is the
    # one test_fid checks against scipy's sqrtm (not repeated here: 2048-d sqrtm is slow).
    n = torch.tensor(8)
    for side, feats in (("real", spat_r), ("fake", spat_f)):
        mean, cov = mean_cov(
            getattr(metrics, f"{side}_spatial_sum"), getattr(metrics, f"{side}_spatial_cov_sum"), n
        )
        np.testing.assert_allclose(mean.numpy(), feats.mean(0), atol=1e-4)
        np.testing.assert_allclose(cov.numpy(), np.cov(feats, rowvar=False), atol=1e-3)
    as_t = lambda f: tuple(torch.from_numpy(a) for a in _stats(f))
    fid = frechet_distance_torch(*as_t(pool_r), *as_t(pool_f))[0]
    sfid = frechet_distance_torch(*as_t(spat_r), *as_t(spat_f))[0]
    assert got["fid"] == pytest.approx(fid, rel=1e-3)
    assert got["sfid"] == pytest.approx(sfid, rel=1e-3)
    assert got["sfid"] > 1 and abs(got["sfid"] - got["fid"]) > 1  # a different feature
    assert (got["precision"], got["recall"]) == pytest.approx(_brute_pr(pool_r, pool_f), abs=1e-9)
    assert got["inception_score"] is None and "classifier" in got["inception_score_skipped"]


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_reference_batch_round_trip_and_stored_statistics(tmp_path):
    shards = _write_split(tmp_path / "shards", 10)
    with_stats, images_only = tmp_path / "ref.npz", tmp_path / "ref_images.npz"
    module = ["-m", "vistok.evaluation.ref_batch", "--shards", shards, "--resolution", "32"]
    run([*module, "--num-images", "9", "--out", str(with_stats)])
    run([*module, "--num-images", "9", "--out", str(images_only), "--no-stats"])

    ref = read_ref_batch(with_stats)
    assert ref.images.shape == (9, 32, 32, 3) and ref.images.dtype == np.uint8
    assert sorted(ref.stats) == ["mu", "mu_s", "sigma", "sigma_s"]
    assert read_ref_batch(images_only).stats == {}
    np.testing.assert_array_equal(read_ref_batch(images_only).images, ref.images)
    # The images are the validation crops the data module gives, as bytes.
    from vistok.data.datamodule import ImageDataModule

    data = ImageDataModule(val_shards=shards, resolution=32, val_batch_size=9, num_workers=0)
    batch = next(iter(data.val_dataloader(rank=0, world_size=1)))["image"][:9]
    np.testing.assert_array_equal(to_uint8(batch).permute(0, 2, 3, 1).numpy(), ref.images)

    fake = noisy(crops(6, size=32, seed=2), 0.1)
    numbers = {}
    for name, path in (("stored", with_stats), ("computed", images_only)):
        metrics, protocol = reference_metrics(path, 32)
        metrics.update(fake, real=False)
        numbers[name] = metrics.results()
        assert protocol["reference_images"] == 9
    stored, computed = numbers["stored"], numbers["computed"]
    for key in ("fid", "sfid"):
        assert stored[key] == pytest.approx(computed[key], rel=1e-3)
    assert (stored["precision"], stored["recall"]) == (computed["precision"], computed["recall"])
    # The pool-only reference that ReconstructionEval(ref_batch=...) uses: the same FID.
    for path in (with_stats, images_only):
        fid = FID(stats_dir=tmp_path)
        fill_pool_reference(fid, path, 32)
        fid.update(fake, real=False)
        assert fid.compute() == pytest.approx(stored["fid"], rel=1e-3)


def test_bad_reference_batches_name_the_file(tmp_path):
    img = np.zeros((4, 16, 16, 3), np.uint8)
    cases = {
        "noarr.npz": ({"images": img}, "no 'arr_0'"),
        "float.npz": ({"arr_0": img.astype(np.float32)}, "expected uint8"),
        "nchw.npz": ({"arr_0": img.transpose(0, 3, 1, 2)}, r"\(N, H, W, 3\)"),
        "half.npz": ({"arr_0": img, "mu": np.zeros(2048), "sigma": np.eye(2048)}, "all four"),
    }
    for name, (arrays, message) in cases.items():
        path = _npz(tmp_path / name, **arrays)
        with pytest.raises(RefBatchError, match=message) as e:
            read_ref_batch(path)
        assert str(path) in str(e.value)
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(RefBatchError, match="text.npz is not a readable"):
        read_ref_batch(tmp_path / "text.npz")
    path = _npz(tmp_path / "ok16.npz", arr_0=img)
    with pytest.raises(RefBatchError, match=r"ok16.npz holds 16x16 images, the samples are 32x32"):
        reference_metrics(path, 32)
