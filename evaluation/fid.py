"""Frechet Inception Distance for images in [-1, 1], with cached reference statistics.

``FID`` is torchmetrics' ``FrechetInceptionDistance`` with the choices this project needs:

- inputs are float images in [-1, 1] (NCHW, any size), converted to uint8 by rounding
  ``(x + 1) * 127.5`` after clamping: the same bytes a PNG of the image would hold, which is what
  the reference evaluators read; uint8 tensors pass through unchanged;
- resizing to 299 px uses torch-fidelity's TF1-compatible bilinear resize (``antialias=False``) by
  default, as in the TF reference; torchmetrics >= 1.8 defaults to an antialiased resize, which
  shifts FID for images smaller than 299 px;
- Inception weights come from :func:`vistok.evaluation.inception.fid_weights_path` (offline);
- the reference ("real") statistics are kept across ``reset_fake()`` and cached on disk as
  safetensors, so later evaluations only run the generated images;
- ``compute()`` checks the matrix square root and reports (warns or raises, with the numbers)
  when its eigenvalues leave the real non-negative axis by more than a tolerance.

Distributed use: every rank calls ``update`` with its share and every rank calls ``compute()``
(it all-reduces the sums; calling it on rank 0 only deadlocks). ``load_or_compute_real`` must
also be called on every rank: a cached reference is read by rank 0 alone and the other ranks hold
zeros, so the sum across ranks is the reference exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torchmetrics.image.fid import FrechetInceptionDistance

from vistok.common.checkpoints import file_sha256
from vistok.common.images import uint8_pixels
from vistok.common.summary import batch_progress
from vistok.evaluation.inception import cache_dir, fid_weights_path

STATS_FORMAT = "vistok-fid-stats-v1"


def mean_cov(
    feat_sum: torch.Tensor, cov_sum: torch.Tensor, n: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance from the running sums torchmetrics keeps (float64)."""
    n = int(n)
    mean = feat_sum.double() / n  # (D,)
    cov = (cov_sum.double() - n * torch.outer(mean, mean)) / (n - 1)  # (D, D)
    return mean, cov


def frechet_distance_torch(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> tuple[float, float]:
    """FID with symmetric eigendecompositions, plus a bound on its square-root error.

    torchmetrics 1.9 takes tr sqrt(S1 S2) as the sum of the real parts of the roots of
    ``eigvals(S1 @ S2)``, a non-symmetric problem: slower than a symmetric one, and its near-zero
    eigenvalues come out negative or complex, whose dropped imaginary parts go unreported. For
    PSD S1, S1 S2 has the same eigenvalues as the symmetric M = S1^1/2 S2 S1^1/2 (or L' S2 L
    with S1 = L L'), so symmetric ``eigh`` calls give the same trace, with real eigenvalues.

    In exact arithmetic all eigenvalues of S1 and M are >= 0; negative ones are rounding noise
    (or a broken covariance) and are clipped to 0. As tr sqrt(.) is subadditive on PSD matrices,
    an eigenvalue -a of M moves the trace by at most sqrt(a), and one of S1 (eigenvector v) by at
    most sqrt(a v'S2v) <= sqrt(a tr S2). Returns ``(distance, 2 * sum of those bounds)``.
    """
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    with _one_cpu_thread(sigma1.device):
        return _frechet_distance_torch(mu1, sigma1, mu2, sigma2)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    # MKL's threaded eigh spins when the cores are shared: on a busy 2-core machine a 2048-d
    # eigh took 34 s with 2 threads and 2.8 s with 1. Single-threaded it is ~1 s at worst.
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _frechet_distance_torch(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> tuple[float, float]:
    for name, t in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not torch.isfinite(t).all():
            raise FloatingPointError(
                f"FID: {name} has {int((~torch.isfinite(t)).sum())} non-finite entries"
            )
    sym = lambda m: (m + m.T) / 2  # the running-sum covariance is symmetric up to rounding
    chol, info = torch.linalg.cholesky_ex(sym(sigma1))
    if info == 0:
        # S1 = L L' is positive definite: eig(S1 S2) = eig(L' S2 L), one decomposition.
        lam_m = torch.linalg.eigvalsh(sym(chol.T @ sigma2 @ chol))  # (D,)
        err1 = lam_m.new_zeros(())
    else:
        # Singular S1 (fewer images than dimensions): go through its eigendecomposition.
        lam1, vec1 = torch.linalg.eigh(sym(sigma1))  # (D,), (D, D)
        root1 = (vec1 * lam1.clamp_min(0).sqrt()) @ vec1.T  # S1^1/2
        lam_m = torch.linalg.eigvalsh(sym(root1 @ sigma2 @ root1))  # (D,)
        # tr S2 bounds max eig S2 and costs no third decomposition.
        err1 = ((-lam1).clamp_min(0) * sigma2.diagonal().clamp_min(0).sum()).sqrt().sum()
    trace_sqrt = lam_m.clamp_min(0).sqrt().sum()
    err = (-lam_m).clamp_min(0).sqrt().sum() + err1
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return float(distance), float(2 * err)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # scipy warns on singular input even when its result is fine; finiteness is checked below.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(a)


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
    imag_atol: float = 1e-3,
) -> float:
    """Independent reference: FID with scipy's ``sqrtm`` (the TF/pytorch-fid formulation).

    Non-finite inputs raise ``ValueError``. A non-finite square root (singular product) is
    retried once with ``eps`` added to both diagonals, with a warning giving the count; if it
    stays non-finite it raises ``FloatingPointError``. An imaginary part larger than
    ``imag_atol`` on the root's diagonal raises ``ValueError`` with its size.
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}"
        )
    for name, arr in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} has {int((~np.isfinite(arr)).sum())} non-finite entries")
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        bad = int((~np.isfinite(covmean)).sum())
        warnings.warn(
            f"FID: sqrtm(sigma1 @ sigma2) has {bad} non-finite entries (singular product); "
            f"retrying with {eps:g} added to the covariance diagonals",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            bad = int((~np.isfinite(covmean)).sum())
            raise FloatingPointError(
                f"FID: sqrtm still has {bad} non-finite entries after eps={eps:g}"
            )
    if np.iscomplexobj(covmean):
        imag = float(np.abs(np.diagonal(covmean).imag).max())
        if imag > imag_atol:
            raise ValueError(f"FID: sqrtm has an imaginary component {imag:.4g} > {imag_atol:g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _rank_world(group=None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


class FID(FrechetInceptionDistance):
    """FID on [-1, 1] images; reference statistics cached on disk and kept across resets.

    Args:
        feature: Inception feature size (64, 192, 768 or 2048; 2048 is the standard FID).
        antialias: antialiased resize to 299 px (torchmetrics' default) instead of the TF one.
        weights_path: Inception weights; default :func:`fid_weights_path`.
        stats_dir: where reference statistics are cached; default ``<cache>/fid_stats``.
        sqrt_check: "warn" or "raise" when the square-root error bound exceeds
            ``sqrt_atol + sqrt_rtol * |FID|``; the last bound is kept in ``self.sqrt_error``.
        kwargs: torchmetrics ``Metric`` options (``process_group``, ``compute_on_cpu``...).
    """

    def __init__(
        self,
        feature: int = 2048,
        antialias: bool = False,
        weights_path: str | None = None,
        stats_dir: str | os.PathLike | None = None,
        sqrt_check: str = "warn",
        sqrt_atol: float = 1e-2,
        sqrt_rtol: float = 1e-3,
        **kwargs,
    ) -> None:
        if sqrt_check not in ("warn", "raise"):
            raise ValueError(f"sqrt_check must be 'warn' or 'raise', got {sqrt_check!r}")
        path = fid_weights_path(weights_path)
        super().__init__(
            feature=feature,
            reset_real_features=False,
            normalize=False,
            feature_extractor_weights_path=path,
            antialias=antialias,
            **kwargs,
        )
        self.feature_dim = feature
        self.antialias = antialias
        self.weights_hash = file_sha256(path)
        self.stats_dir = Path(stats_dir) if stats_dir else cache_dir() / "fid_stats"
        self.sqrt_check, self.sqrt_atol, self.sqrt_rtol = sqrt_check, sqrt_atol, sqrt_rtol
        self.sqrt_error = 0.0

    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add a batch: float images in [-1, 1] (or uint8), (B, 3, H, W)."""
        super().update(uint8_pixels(images), real=real)

    def compute(self) -> float:
        """FID as a float. In DDP call it on every rank: it all-reduces the sums first."""
        n_real, n_fake = int(self.real_features_num_samples), int(self.fake_features_num_samples)
        if n_real < 2 or n_fake < 2:
            raise RuntimeError(f"FID needs >= 2 real and fake images, got {n_real} and {n_fake}")
        mu_r, cov_r = mean_cov(self.real_features_sum, self.real_features_cov_sum, n_real)
        mu_f, cov_f = mean_cov(self.fake_features_sum, self.fake_features_cov_sum, n_fake)
        value, err = frechet_distance_torch(mu_r, cov_r, mu_f, cov_f)
        self.sqrt_error = err
        if err > self.sqrt_atol + self.sqrt_rtol * abs(value):
            msg = (
                f"FID {value:.4f} is uncertain by up to {err:.4g}: negative eigenvalues in the "
                f"covariance square root (real {n_real}, fake {n_fake} images, "
                f"{self.feature_dim}-d features; covariances of fewer images than dimensions "
                "are singular, a corrupted reference can be indefinite)"
            )
            if self.sqrt_check == "raise":
                raise FloatingPointError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return value

    def reset_fake(self) -> None:
        """Clear the generated-image statistics, keep the reference."""
        self.reset()

    def reset_real(self) -> None:
        """Clear everything, reference included."""
        self.reset_real_features = True
        try:
            self.reset()
        finally:
            self.reset_real_features = False

    # ----------------------------------------------------------------- reference statistics
    def stats_key(self, dataset_id: str, resolution: int | tuple[int, int], count: int) -> str:
        """File stem naming a reference: dataset, resolution, count, weights, feature, resize."""
        res = f"{resolution}" if isinstance(resolution, int) else "x".join(map(str, resolution))
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", dataset_id).strip("-")
        resize = "aa" if self.antialias else "tf"
        return f"{safe}_{res}px_n{count}_f{self.feature_dim}_{resize}_w{self.weights_hash[:12]}"

    def stats_path(self, dataset_id: str, resolution: int | tuple[int, int], count: int) -> Path:
        return self.stats_dir / f"{self.stats_key(dataset_id, resolution, count)}.safetensors"

    def load_or_compute_real(
        self,
        dataset_id: str,
        images: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]],
        resolution: int | tuple[int, int],
        count: int,
    ) -> bool:
        """Fill the reference statistics from the cache, or from ``images`` and cache them.

        ``images`` yields this rank's batches of [-1, 1] images (a zero-argument callable is
        only called when the cache misses, so a loader need not even be built); ``count`` is
        the total over all ranks and must match. Call on every rank. Returns True on a hit.
        """
        path = self.stats_path(dataset_id, resolution, count)
        group = self.process_group
        rank, world = _rank_world(group)
        hit = path.is_file() if rank == 0 else False
        if world > 1:
            flag = torch.tensor([int(hit)], device=self.real_features_sum.device)
            src = dist.get_global_rank(group, 0) if group is not None else 0
            dist.broadcast(flag, src=src, group=group)
            hit = bool(flag.item())
        if hit:
            self.load_real_stats(path)
            return True
        self._clear_real()
        want = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        batches = images() if callable(images) else images
        for batch in batch_progress(batches, "FID reference", total=-(-count // world)):
            if tuple(batch.shape[-2:]) != want:
                raise ValueError(f"reference images are {tuple(batch.shape[-2:])}, key says {want}")
            self.update(batch, real=True)
        with self.sync_context(process_group=group):
            total = int(self.real_features_num_samples)
            if rank == 0 and total == count:
                meta = {"dataset_id": dataset_id, "resolution": json.dumps(want), "count": count}
                self.save_real_stats(path, meta)
        if total != count:
            raise ValueError(f"reference has {total} images over all ranks, key says {count}")
        return False

    def save_real_stats(self, path: str | os.PathLike, metadata: dict | None = None) -> None:
        """Write the current reference sums, mean and covariance (float64 safetensors)."""
        n = int(self.real_features_num_samples)
        if n < 2:
            raise RuntimeError(f"need >= 2 reference images to save statistics, have {n}")
        mean, cov = mean_cov(self.real_features_sum, self.real_features_cov_sum, n)
        tensors = {
            "sum": self.real_features_sum.double().cpu(),
            "cov_sum": self.real_features_cov_sum.double().cpu(),
            "count": torch.tensor([n], dtype=torch.int64),
            "mean": mean.cpu(),
            "cov": cov.cpu(),
        }
        meta = {
            "format": STATS_FORMAT,
            "feature": str(self.feature_dim),
            "antialias": str(self.antialias),
            "weights_sha256": self.weights_hash,
            **{k: str(v) for k, v in (metadata or {}).items()},
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load_real_stats(self, path: str | os.PathLike) -> None:
        """Load statistics written by :meth:`save_real_stats` (call on every rank).

        Only rank 0 reads the file; other ranks hold zeros, so the all-reduce in ``compute()``
        counts the reference once.
        """
        if _rank_world(self.process_group)[0] != 0:
            self._clear_real()
            return
        tensors = load_file(str(path))
        dim = tensors["sum"].shape[0]
        if dim != self.feature_dim:
            raise ValueError(f"{path}: {dim}-d statistics, this metric uses {self.feature_dim}-d")
        self._set_real_sums(tensors["sum"], tensors["cov_sum"], int(tensors["count"][0]))

    def set_real_stats(self, mean: torch.Tensor, cov: torch.Tensor, count: int) -> None:
        """Use an external reference given as mean/covariance (e.g. the ADM reference batch).

        Call on every rank; as with :meth:`load_real_stats`, only rank 0 keeps the values.
        """
        if _rank_world(self.process_group)[0] != 0:
            self._clear_real()
            return
        mean, cov = torch.as_tensor(mean).double(), torch.as_tensor(cov).double()
        cov_sum = cov * (count - 1) + count * torch.outer(mean, mean)  # inverse of mean_cov
        self._set_real_sums(mean * count, cov_sum, count)

    def _clear_real(self) -> None:
        zero = torch.zeros_like
        self._set_real_sums(zero(self.real_features_sum), zero(self.real_features_cov_sum), 0)

    def _set_real_sums(self, feat_sum: torch.Tensor, cov_sum: torch.Tensor, n: int) -> None:
        device = self.real_features_sum.device
        self.real_features_sum = feat_sum.to(device, torch.float64).clone()
        self.real_features_cov_sum = cov_sum.to(device, torch.float64).clone()
        self.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=device)
        self._computed = None  # torchmetrics caches the last compute() until the next update
