"""The numbers ADM's evaluator reports (FID, sFID, precision, recall), offline and multi-process.

ADM's ``evaluations/evaluator.py`` (guided-diffusion, the script every ImageNet gFID in LlamaGen,
DiT, SiT, RAR, WeTok and RobusTok goes through) runs the TF inception-2015-12-05 graph on uint8
NHWC images (the graph resizes to 299 px bilinearly) and takes two tensors per image:

- ``pool_3:0``: the 2048-d pool features of FID; here torch-fidelity's ``'2048'`` output of the
  same network (offline weights, :mod:`vistok.evaluation.inception`);
- ``mixed_6/conv:0``, its first 7 channels, flattened: the spatial features of sFID
  (7 x 17 x 17 = 2023-d).

Which torch-fidelity layer is ``mixed_6/conv``. The TF graph names its eleven Inception blocks
``mixed, mixed_1, ..., mixed_10``; torch-fidelity names the same blocks ``Mixed_5b, 5c, 5d, 6a,
6b, 6c, 6d, 6e, 7a, 7b, 7c``, so ``mixed_6`` is ``Mixed_6d`` (not ``Mixed_6e``, which is
``mixed_7``). Inside a block, the TF op ``conv`` is the 1x1 branch, torch-fidelity's
``branch1x1``. Checked on the weights: the TorchScript copy of the TF graph that the offline
weights come from keeps the TF names, and its 51st conv (index 50), ``mixed_6.conv``, is the one
the in-order conversion puts at ``Mixed_6d.branch1x1``; its forward is conv -> batch norm (beta
only) -> ReLU, the same as torch-fidelity's ``BasicConv2d``, so the tensor taken is the ReLU output
(192 channels at 17 x 17 for a 299 px input). ADM slices the channels last (TF is NHWC) and
flattens (h, w, c); the same order is used here, so that ``mu_s``/``sigma_s`` stored in ADM's
reference batches line up entry by entry with ours. The features come from the same forward
pass as the pool features (a forward hook), so they share the 299 px resize FID uses.

Precision / recall (Kynkaanniemi et al. 2019, https://arxiv.org/abs/1904.06991) follow ADM's
``ManifoldEstimator`` with its defaults: k = 3 (the radius of a point is its squared Euclidean
distance to its 3rd nearest neighbour, not counting itself), no percentile clamping of the radii
(``clamp_to_percentile=None`` in ADM, so none here), a point is inside a manifold when its squared
distance to some point is ``<=`` that point's radius; precision = fraction of samples inside the
reference manifold, recall = fraction of reference images inside the sample manifold. Distances
come in row blocks (``row_batch`` rows against all columns) as ``|u|^2 - 2 u.v + |v|^2`` clamped
at 0 from matrix products, as in ADM. One difference: ADM computes the products in float16 and
falls back to float32 only when a block overflows; here they are float32 (``float64`` on
request), so points within float16 rounding of a radius can fall on the other side (a difference
of the order of 1e-3 in the fractions on 50k samples, not a bias).

Inception Score needs the network's 1008-way classifier, which the offline weights do not have:
it is reported as unavailable, never as a number.

Distributed use: FID and sFID keep sums (reduced across ranks like torchmetrics' FID); precision
and recall need the features themselves, which are gathered (``cat`` states, 8 KB per image).
Every rank calls ``update`` with its share and every rank calls ``compute``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vistok.common.images import uint8_pixels
from vistok.common.summary import batch_progress
from vistok.evaluation.fid import FID, _rank_world, frechet_distance_torch, mean_cov

SPATIAL_LAYER = "Mixed_6d.branch1x1"  # TF mixed_6/conv
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023 at the 299 px input
NEIGHBOURS = 3
INCEPTION_SCORE = "not computable offline: the converted Inception has no classifier layer"


# --------------------------------------------------------------------------- precision/recall
def pairwise_sq_distances(u: Tensor, v: Tensor) -> Tensor:
    """(N, D), (M, D) -> (N, M) squared Euclidean distances from matrix products, >= 0."""
    d = u.square().sum(1, keepdim=True) - 2 * u @ v.T + v.square().sum(1)[None]
    return d.clamp_min(0)


def manifold_radii(features: Tensor, k: int = NEIGHBOURS, row_batch: int = 10_000) -> Tensor:
    """(N, D) -> (N,) squared distance of each point to its k-th nearest other point."""
    if features.shape[0] <= k:
        raise ValueError(f"need more than k={k} points to estimate a manifold, got {len(features)}")
    out = []
    for block in batch_progress(features.split(row_batch), "k-NN radii", len(features)):
        d = pairwise_sq_distances(block, features)  # (b, N)
        # The smallest distance is the point to itself (0): the k-th neighbour is index k.
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


def inside(points: Tensor, centres: Tensor, radii: Tensor, row_batch: int = 10_000) -> Tensor:
    """(N,) bool: is each point within some centre's radius (squared distance <= radius)?"""
    out = []
    for block in batch_progress(points.split(row_batch), "manifold test", len(points)):
        out.append((pairwise_sq_distances(block, centres) <= radii[None]).any(1))
    return torch.cat(out)


def precision_recall(
    real: Tensor, fake: Tensor, k: int = NEIGHBOURS, row_batch: int = 10_000, dtype=torch.float32
) -> tuple[float, float]:
    """Improved precision and recall of ``fake`` against ``real`` features (N, D), (M, D)."""
    real, fake = real.to(dtype), fake.to(dtype)
    r_real, r_fake = manifold_radii(real, k, row_batch), manifold_radii(fake, k, row_batch)
    precision = inside(fake, real, r_real, row_batch).double().mean()
    recall = inside(real, fake, r_fake, row_batch).double().mean()
    return float(precision), float(recall)


def spatial_features(activation: Tensor) -> Tensor:
    """``Mixed_6d.branch1x1`` output (B, 192, 17, 17) -> (B, 2023) in ADM's (h, w, c) order."""
    return activation[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)


# --------------------------------------------------------------------------- the metric
class ADMMetrics(FID):
    """FID plus ADM's sFID and precision/recall, from one Inception pass per image.

    ``compute()`` returns the FID (so it drops in where :class:`FID` is used); ``results()``
    returns all of them. Reference ("real") statistics may be set from a reference batch
    (``set_real_stats`` / ``set_real_spatial_stats``); precision/recall then need the reference
    images too (``update(images, real=True, stats=False)`` adds their features only).

    Args:
        precision_recall: keep the pool features for precision/recall (8 KB per image).
        row_batch: rows per distance block in precision/recall (memory: row_batch x N floats).
        kwargs: :class:`FID` options; the feature size is fixed at 2048 (ADM's).
    """

    def __init__(self, precision_recall: bool = True, row_batch: int = 10_000, **kwargs) -> None:
        super().__init__(feature=2048, **kwargs)
        self.with_pr, self.row_batch = precision_recall, row_batch
        zeros = lambda *s: torch.zeros(*s, dtype=torch.float64)
        for side in ("real", "fake"):
            self.add_state(f"{side}_spatial_sum", zeros(SPATIAL_DIM), dist_reduce_fx="sum")
            cov = zeros(SPATIAL_DIM, SPATIAL_DIM)
            self.add_state(f"{side}_spatial_cov_sum", cov, dist_reduce_fx="sum")
            self.add_state(f"{side}_spatial_num_samples", torch.tensor(0), dist_reduce_fx="sum")
            self.add_state(f"{side}_pool", [], dist_reduce_fx="cat")
        self._activation: Tensor | None = None
        layer = self.inception.get_submodule(SPATIAL_LAYER)
        layer.register_forward_hook(lambda _m, _i, out: setattr(self, "_activation", out))

    def update(self, images: Tensor, real: bool, stats: bool = True) -> None:
        """Add a batch (B, 3, H, W) in [-1, 1] or uint8. ``stats=False``: features for
        precision/recall only (the reference's mean/covariance came from elsewhere)."""
        self._activation = None
        pool = self.inception(uint8_pixels(images)).double()  # (B, 2048)
        if self._activation is None or self._activation.shape[-2:] != (17, 17):
            raise RuntimeError(f"no 17x17 activation captured at {SPATIAL_LAYER}")
        spatial = spatial_features(self._activation).double()  # (B, 2023)
        side = "real" if real else "fake"
        if stats:
            for name, f in (("features", pool), ("spatial", spatial)):
                self._add(f"{side}_{name}_sum", f.sum(0))
                self._add(f"{side}_{name}_cov_sum", f.T @ f)
                self._add(f"{side}_{name}_num_samples", f.shape[0])
        if self.with_pr:
            getattr(self, f"{side}_pool").append(pool.float())

    def _add(self, state: str, value) -> None:
        setattr(self, state, getattr(self, state) + value)

    def set_real_spatial_stats(self, mean: Tensor, cov: Tensor, count: int) -> None:
        """The reference's spatial mean/covariance (e.g. ``mu_s``/``sigma_s`` of a batch)."""
        mean, cov = torch.as_tensor(mean).double(), torch.as_tensor(cov).double()
        if mean.shape != (SPATIAL_DIM,) or cov.shape != (SPATIAL_DIM, SPATIAL_DIM):
            raise ValueError(f"spatial statistics must be {SPATIAL_DIM}-d, got {tuple(mean.shape)}")
        if _rank_world(self.process_group)[0] != 0:  # the sum over ranks holds it once
            mean, cov, count = torch.zeros_like(mean), torch.zeros_like(cov), 0
            cov_sum = cov
        else:
            cov_sum = cov * (count - 1) + count * torch.outer(mean, mean)
        device = self.real_spatial_sum.device
        self.real_spatial_sum = (mean * count).to(device)
        self.real_spatial_cov_sum = cov_sum.to(device)
        self.real_spatial_num_samples = torch.tensor(count, device=device)
        self._computed = None

    def reset(self) -> None:
        # FID keeps the reference across reset(); the spatial sums and features follow it.
        keep = {}
        if not self.reset_real_features:
            keep = {n: getattr(self, n) for n in self._defaults if n.startswith("real_spatial")}
            keep["real_pool"] = list(self.real_pool)
        super().reset()
        for name, value in keep.items():
            setattr(self, name, value)

    def results(self) -> dict[str, Any]:
        """FID, sFID, precision, recall (every rank calls it), and why there is no IS."""
        fid = self.compute()  # syncs and unsyncs on its own
        with self.sync_context(process_group=self.process_group):
            out = self._spatial_and_manifold()
        out = {"fid": fid, **out}
        out["inception_score"] = None
        out["inception_score_skipped"] = INCEPTION_SCORE
        return out

    def _spatial_and_manifold(self) -> dict[str, Any]:
        n_real, n_fake = int(self.real_spatial_num_samples), int(self.fake_spatial_num_samples)
        if n_real < 2 or n_fake < 2:
            raise RuntimeError(f"sFID needs >= 2 real and fake images, got {n_real} and {n_fake}")
        mu_r, cov_r = mean_cov(self.real_spatial_sum, self.real_spatial_cov_sum, n_real)
        mu_f, cov_f = mean_cov(self.fake_spatial_sum, self.fake_spatial_cov_sum, n_fake)
        out: dict[str, Any] = {"sfid": frechet_distance_torch(mu_r, cov_r, mu_f, cov_f)[0]}
        out["precision"] = out["recall"] = None
        if self.with_pr:
            real, fake = (_features(getattr(self, f"{s}_pool")) for s in ("real", "fake"))
            if len(real) <= NEIGHBOURS or len(fake) <= NEIGHBOURS:
                raise RuntimeError(
                    f"precision/recall need > {NEIGHBOURS} reference and sample images with "
                    f"features, got {len(real)} and {len(fake)}"
                )
            out["precision"], out["recall"] = precision_recall(real, fake, row_batch=self.row_batch)
        return out


def _features(state: Tensor | list[Tensor]) -> Tensor:
    # torchmetrics gives a list before sync and a concatenated tensor after it
    if isinstance(state, Tensor):
        return state
    return torch.cat(state) if state else torch.zeros(0, 2048)
