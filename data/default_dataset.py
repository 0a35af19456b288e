"""The embedded default dataset: random crops of the real photos that ship with scikit-image and
scikit-learn, so that training runs anywhere with no download.

Ten colour photos (label = index in ``SOURCES``), cropped at random scales (a quarter of the
shorter side, at least 96 px, up to all of it) and positions, randomly flipped, resized to
128 x 128 and stored as JPEG (quality 95). Crops are drawn from one seeded generator per split,
so the shards are byte-for-byte the same on every build. Built on first use into
``$VISTOK_CACHE`` (default ``~/.cache/vistok``) under a folder named after ``VERSION``;
concurrent builders (DDP ranks) each write a private temporary folder and rename it into place,
and the first rename wins.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from vistok.data.make_shards import shard_pattern, write_shards

VERSION = "v1"  # bump when anything below changes the bytes
SIZE = 128
JPEG_QUALITY = 95
# split -> (crops, crops per shard, seed); 8 train shards let 2 ranks x 4 workers read disjoint
# shards, and 4 validation shards give every worker of 2 ranks x 2 workers one.
SPLITS = {"train": (2000, 250, 0), "val": (256, 64, 1)}
SOURCES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
    "china",
    "flower",
)


def load_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 photo, from the files inside the installed wheels (no network)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    import skimage.data

    photo = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        photo = photo[0]  # (left, right, disparity): the left view
    return np.ascontiguousarray(photo[..., :3])


def cache_root() -> Path:
    return Path(os.environ.get("VISTOK_CACHE") or Path.home() / ".cache" / "vistok")


def dataset_dir() -> Path:
    return cache_root() / f"default_dataset-{VERSION}"


def _crops(photos: list[Image.Image], count: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = i % len(photos)  # balanced classes
        photo = photos[label]
        short = min(photo.size)
        side = int(round(short * np.exp(rng.uniform(np.log(0.25), 0.0))))
        side = min(max(side, 96), short)
        x0 = int(rng.integers(0, photo.width - side + 1))
        y0 = int(rng.integers(0, photo.height - side + 1))
        crop = photo.resize(
            (SIZE, SIZE), Image.Resampling.BICUBIC, box=(x0, y0, x0 + side, y0 + side)
        )
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=JPEG_QUALITY)
        yield {"__key__": f"{SOURCES[label]}_{i:05d}", "jpg": buf.getvalue(), "cls": label}


def build(target: Path) -> None:
    """Write both splits and a manifest into ``target`` (which must not exist yet)."""
    photos = [Image.fromarray(load_photo(name)) for name in SOURCES]
    manifest = {"version": VERSION, "classes": list(SOURCES), "splits": {}}
    for split, (count, per_shard, seed) in SPLITS.items():
        paths = write_shards(_crops(photos, count, seed), target, split, per_shard)
        manifest["splits"][split] = {"samples": count, "shards": [Path(p).name for p in paths]}
    (target / "classes.txt").write_text("".join(f"{c}\n" for c in SOURCES))
    # Written last: its presence marks a complete build.
    (target / "manifest.json").write_text(json.dumps(manifest, indent=1))


def ensure_built() -> Path:
    final = dataset_dir()
    if (final / "manifest.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its copy first (identical bytes): use that one.
            if not (final / "manifest.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def default_shards(split: str) -> str:
    """Brace pattern of the split's shards (``train`` or ``val``), building them if needed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    root = ensure_built()
    names = json.loads((root / "manifest.json").read_text())["splits"][split]["shards"]
    return shard_pattern([str(root / n) for n in names])


def num_samples(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return SPLITS[split][0]


def num_classes() -> int:
    return len(SOURCES)
