"""Reference batches in ADM's format: read them for gFID/sFID/precision/recall, write your own.

The format (guided-diffusion's ``evaluations/``, e.g. ``VIRTUAL_imagenet256_labeled.npz``) is an
``.npz`` with ``arr_0``: (N, H, W, 3) uint8 images, and optionally ``mu``/``sigma`` (2048-d pool
features' mean and covariance) and ``mu_s``/``sigma_s`` (2023-d spatial features, see
:mod:`vistok.evaluation.adm`). ADM's evaluator uses the stored statistics when ``mu`` is present
(the ImageNet batches store statistics of the whole training set, while ``arr_0`` holds 10,000
images used for precision/recall), and otherwise computes them from ``arr_0``; so does this module.

Write one from any image shards (centre crops at the chosen resolution, the project's validation
crop: shorter side resized to R with bicubic filtering, centre square)::

    python -m vistok.evaluation.ref_batch --shards '/data/imagenet/val-{000000..000063}.tar' \\
        --num-images 50000 --resolution 256 --out imagenet_val_256.npz

The file holds the images and, unless ``--no-stats``, their statistics (covariances with
``N - 1`` in the denominator, as ``np.cov`` in ADM's evaluator).
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from vistok.common.images import uint8_pixels
from vistok.common.summary import batch_progress, closing_summary
from vistok.data.datamodule import ImageDataModule
from vistok.evaluation.adm import SPATIAL_DIM, ADMMetrics
from vistok.evaluation.fid import FID, mean_cov


class RefBatchError(ValueError):
    """A reference batch that cannot be used, with what is wrong with it."""


class RefBatch(NamedTuple):
    path: str
    images: np.ndarray  # (N, H, W, 3) uint8
    stats: dict[str, np.ndarray]  # any of mu, sigma, mu_s, sigma_s

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.images.shape[1:3])


STAT_SHAPES = {
    "mu": (2048,),
    "sigma": (2048, 2048),
    "mu_s": (SPATIAL_DIM,),
    "sigma_s": (SPATIAL_DIM, SPATIAL_DIM),
}


def read_ref_batch(path: str | Path) -> RefBatch:
    """Read and check an ADM-format npz (no pickles are loaded)."""
    path = Path(path)
    if not path.is_file():
        raise RefBatchError(f"reference batch {path} not found")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise RefBatchError(f"reference batch {path} is not a readable .npz: {e}") from e
    with data:
        if "arr_0" not in data.files:
            raise RefBatchError(
                f"reference batch {path} has no 'arr_0' (keys: {sorted(data.files)}); ADM's "
                "format stores the images as arr_0, (N, H, W, 3) uint8"
            )
        images = data["arr_0"]
        stats = {k: data[k] for k in STAT_SHAPES if k in data.files}
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise RefBatchError(
            f"reference batch {path}: arr_0 is {images.dtype} {images.shape}, expected uint8 "
            "(N, H, W, 3) (NHWC, values 0-255)"
        )
    for key, shape in STAT_SHAPES.items():
        if key in stats and stats[key].shape != shape:
            raise RefBatchError(f"reference batch {path}: {key} is {stats[key].shape}, not {shape}")
    if stats and len(stats) != len(STAT_SHAPES):
        raise RefBatchError(
            f"reference batch {path} has {sorted(stats)} but not all of {list(STAT_SHAPES)}: "
            "store all four statistics or none (they are then computed from arr_0)"
        )
    return RefBatch(str(path), images, stats)


def check_resolution(ref: RefBatch, resolution: int | tuple[int, int]) -> None:
    want = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if ref.resolution != want:
        raise RefBatchError(
            f"reference batch {ref.path} holds {ref.resolution[0]}x{ref.resolution[1]} images, the "
            f"samples are {want[0]}x{want[1]}: use a reference batch at the samples' resolution "
            "(e.g. VIRTUAL_imagenet256_labeled.npz for 256 px)"
        )


def _shares(images: np.ndarray, rank: int, world: int, batch_size: int):
    """This rank's images (every world-th, starting at rank) as NCHW uint8 batches."""
    mine = images[rank::world]
    for start in range(0, len(mine), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(mine[start : start + batch_size])).permute(
            0, 3, 1, 2
        )


def fill_pool_reference(
    fid: FID,
    path: str | Path,
    resolution: int | tuple[int, int],
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Set ``fid``'s reference (2048-d pool statistics) from an ADM batch: its stored ``mu`` /
    ``sigma``, else its images. Call on every rank. Returns the protocol entry."""
    ref = read_ref_batch(path)
    check_resolution(ref, resolution)
    if fid.feature_dim != 2048:
        raise RefBatchError(
            f"reference batch {path}: ADM's statistics are 2048-d, not {fid.feature_dim}"
        )
    stored = "mu" in ref.stats
    if stored:
        mu, sigma = (torch.from_numpy(ref.stats[k]) for k in ("mu", "sigma"))
        fid.set_real_stats(mu, sigma, len(ref.images))
    else:
        fid.reset_real()
        device = fid.real_features_sum.device
        shares = _shares(ref.images, rank, world_size, 64)
        for batch in batch_progress(shares, "FID reference", len(ref.images) // world_size):
            fid.update(batch.to(device), real=True)
    return _protocol(path, ref, stored, fid)


def _protocol(path, ref: RefBatch, stored: bool, fid: FID) -> dict[str, Any]:
    return {
        "reference_batch": str(Path(path).resolve()),
        "reference_images": len(ref.images),
        "reference_statistics": "stored in the batch" if stored else "computed from arr_0",
        "resolution": list(ref.resolution),
        "inception_sha256": fid.weights_hash,
        "antialias": fid.antialias,
    }


def reference_metrics(
    path: str | Path,
    resolution: int | tuple[int, int],
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 64,
    precision_recall: bool = True,
) -> tuple[ADMMetrics, dict[str, Any]]:
    """An :class:`ADMMetrics` holding the reference of an ADM batch, and its protocol entry.

    Stored statistics are used as they are; missing ones are computed from ``arr_0``. The
    images always go through Inception when precision/recall are on (their features are the
    reference manifold). Call on every rank (each takes every ``world_size``-th image).
    """
    ref = read_ref_batch(path)
    check_resolution(ref, resolution)
    metrics = ADMMetrics(precision_recall=precision_recall).to(device)
    stored = "mu" in ref.stats
    n = len(ref.images)
    if not stored or precision_recall:
        shares = _shares(ref.images, rank, world_size, batch_size)
        for batch in batch_progress(shares, "reference features", n // world_size):
            metrics.update(batch.to(device), real=True, stats=not stored)
    if stored:
        mu, sigma, mu_s, sigma_s = (torch.from_numpy(ref.stats[k]) for k in STAT_SHAPES)
        metrics.set_real_stats(mu, sigma, n)
        metrics.set_real_spatial_stats(mu_s, sigma_s, n)
    protocol = _protocol(path, ref, stored, metrics)
    protocol["metrics"] = "ADM evaluator: FID, sFID, precision, recall (k=3); vistok.evaluation.adm"
    return metrics, protocol


# --------------------------------------------------------------------------- writing
def statistics(metrics: ADMMetrics) -> dict[str, np.ndarray]:
    """mu, sigma, mu_s, sigma_s of the reference side of ``metrics`` (float64)."""
    out = {}
    n = int(metrics.real_features_num_samples)
    for suffix, state in (("", "features"), ("_s", "spatial")):
        mean, cov = mean_cov(
            getattr(metrics, f"real_{state}_sum"), getattr(metrics, f"real_{state}_cov_sum"), n
        )
        out[f"mu{suffix}"], out[f"sigma{suffix}"] = mean.cpu().numpy(), cov.cpu().numpy()
    return out


def write_ref_batch(
    out: str | Path,
    shards: str,
    num_images: int,
    resolution: int,
    with_stats: bool = True,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Write ``num_images`` centre crops of ``shards`` (fewer if the shards hold fewer) as an
    ADM-format npz, with their statistics unless ``with_stats`` is False."""
    data = ImageDataModule(
        val_shards=shards, resolution=resolution, val_batch_size=batch_size, num_workers=0
    )
    metrics = ADMMetrics(precision_recall=False).to(device) if with_stats else None
    images, seen = [], 0
    for batch in batch_progress(data.val_dataloader(rank=0, world_size=1), "images", num_images):
        x = batch["image"][: num_images - seen]  # (B, 3, R, R) in [-1, 1]
        arr = uint8_pixels(x)  # (B, 3, R, R) uint8: the bytes written, and the ones measured
        if metrics is not None:
            metrics.update(arr.to(device), real=True)
        images.append(arr.permute(0, 2, 3, 1).numpy())
        seen += len(x)
        if seen >= num_images:
            break
    if seen < 2:
        raise ValueError(f"{shards} gave {seen} image(s); a reference batch needs at least 2")
    arrays = {"arr_0": np.concatenate(images)}  # (N, R, R, 3) uint8
    if metrics is not None:
        arrays.update(statistics(metrics))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    return {"path": str(out), "images": seen, "resolution": resolution, "statistics": with_stats}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description="Write an ADM-format reference batch from shards."
    )
    p.add_argument("--shards", required=True, help="image shard spec (brace pattern, path, ::)")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--num-images", type=int, default=50_000, help="at most this many images")
    p.add_argument("--resolution", type=int, default=256, help="side of the centre crops")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--stats",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="store mu/sigma/mu_s/sigma_s (Inception pass over the images)",
    )
    args = p.parse_args(argv)
    if args.num_images < 2 or args.resolution < 1:
        p.error("need --num-images >= 2 and --resolution >= 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = write_ref_batch(
        args.out, args.shards, args.num_images, args.resolution, args.stats, args.batch_size, device
    )
    stats = "with Inception statistics (FID, sFID)" if args.stats else "without statistics"
    done = f"reference batch: {info['images']} images at {args.resolution} px, {stats}"
    print(closing_summary(done, paths={"batch": args.out}))
    return info


if __name__ == "__main__":
    main()
