"""gFID of generated images against real images of a shard set (default: the embedded val split).

Uses ``vistok.evaluation.fid.FID`` (TF-Inception pool3 features, 2048-d, TF-style resize, offline
weights); the reference statistics are cached on disk keyed by shard spec, resolution, image
count and weights. Reference images are centre crops at the generator's resolution. Papers
report gFID with 50,000 samples against the ADM ImageNet reference batch: numbers from other
sample counts or references are not comparable, hence the protocol written beside them.
Every rank must call these functions (FID all-reduces).
"""

from __future__ import annotations

import os
import tarfile
from typing import Any

import torch

from vistok.data.datamodule import ImageDataModule
from vistok.data.default_dataset import default_shards
from vistok.data.image_decode import IMAGE_KEYS
from vistok.data.stream import expand_shards
from vistok.evaluation.inception import fid_weights_path


def fid_unavailable() -> str | None:
    """Why gFID cannot be computed here, or None when it can."""
    try:
        from vistok.evaluation.fid import FID  # noqa: F401  (torchmetrics' FID needs torch-fidelity)

        fid_weights_path()
    except (ImportError, FileNotFoundError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def count_images(spec: str) -> int:
    """Samples with an image member in local tar shards (headers only, nothing decoded)."""
    keys = set()
    for url in expand_shards(spec):
        path = os.path.expanduser(url)
        if not os.path.isfile(path):
            raise ValueError(f"cannot count the images of {url!r}: pass --ref-count")
        with tarfile.open(path) as tar:
            for name in tar.getnames():
                key, _, suffix = name.partition(".")
                if suffix.lower() in IMAGE_KEYS:
                    keys.add((url, key))
    return len(keys)


def reference_spec(spec: str | None) -> str:
    if spec is not None:
        return spec
    return default_shards("val")


def make_fid(
    ref_shards: str | None,
    resolution: int,
    device: torch.device,
    count: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 32,
) -> tuple[Any, dict[str, Any]]:
    """An FID metric holding the reference statistics, and the reference's protocol."""
    from vistok.evaluation.fid import FID  # optional: checked by fid_unavailable

    spec = reference_spec(ref_shards)
    count = count if count is not None else count_images(spec)
    fid = FID().to(device)

    def real_batches():
        data = ImageDataModule(
            val_shards=spec, resolution=resolution, val_batch_size=batch_size, num_workers=0
        )
        for batch in data.val_dataloader(rank=rank, world_size=world_size):
            yield batch["image"].to(device)

    cached = fid.load_or_compute_real(spec, real_batches, resolution, count)
    protocol = {
        "reference_shards": spec,
        "reference_count": count,
        "resolution": resolution,
        "reference_stats": str(fid.stats_path(spec, resolution, count)),
        "reference_cached": cached,
        "feature": fid.feature_dim,
        "antialias": fid.antialias,
        "inception_sha256": fid.weights_hash,
    }
    return fid, protocol
