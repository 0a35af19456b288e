"""Turn one WebDataset sample (a dict of raw bytes) into a square RGB uint8 crop, or a skip reason.

Decoding never raises on bad data: every failure maps to one of ``SKIP_REASONS`` so the stream can
count it and go on. Colour handling:
- ``L``, ``1``, ``P`` (opaque), ``CMYK``, ``YCbCr`` ... go through PIL's ``convert("RGB")``
  (ICC profiles are ignored).
- Anything with alpha (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent index) is composited on
  a white background, so transparent regions become white rather than whatever colour the encoder
  left under alpha = 0.
- 16/32-bit grey (``I;16*``, ``I``) is scaled from [0, 65535] to [0, 255] (``I`` is clipped to
  that range first), not truncated, so 16-bit PNGs keep their tonal range.
- The EXIF orientation tag is applied (``ImageOps.exif_transpose``) before cropping, so a phone
  photo stored sideways with "rotate 90" in its EXIF is trained upright.
"""

from __future__ import annotations

import io
import random
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

# Per-sample reasons; each counts toward ``max_bad_fraction``.
SKIP_REASONS = ("missing_image", "empty", "corrupt", "too_small", "too_large")
# Per-shard reason (a shard that cannot be opened or read); logged, not part of the fraction.
SHARD_REASON = "unreadable_shard"

# Suffixes (as WebDataset lowercases them) that hold an encoded image; first match wins.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "image")

_WHITE = (255, 255, 255, 255)


def find_image_key(sample: dict) -> str | None:
    for key in IMAGE_KEYS:
        if key in sample:
            return key
    return None


def parse_label(sample: dict) -> int:
    """Class index from the ``cls`` entry; -1 when absent or not an integer."""
    raw = sample.get("cls")
    if raw is None:
        return -1
    try:
        return int(raw.decode("ascii").strip() if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError):
        return -1


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.int64)
        arr = np.clip(arr, 0, 65535)
        # round(v * 255 / 65535): 0 -> 0, 65535 -> 255
        grey = ((arr * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def crop_box(width: int, height: int, rng: random.Random | None) -> tuple[int, int, int, int]:
    """Largest centred (rng None) or randomly placed square: the crop of a shorter-side resize."""
    side = min(width, height)
    if rng is None:
        x0, y0 = (width - side) // 2, (height - side) // 2
    else:
        x0, y0 = rng.randint(0, width - side), rng.randint(0, height - side)
    return x0, y0, x0 + side, y0 + side


@dataclass
class ImageDecoder:
    """Bytes -> (R, R, 3) uint8 crop. ``random_crop``/``hflip`` only act when a rng is passed."""

    resolution: int = 256
    random_crop: bool = True
    hflip: bool = True
    small_images: Literal["upscale", "skip"] = "upscale"
    max_pixels: int = 89_478_485
    # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale when the shorter side stays >= the
    # target; large photos then decode several times faster, at no visible cost after resizing.
    jpeg_draft: bool = True

    def __post_init__(self):
        if self.small_images not in ("upscale", "skip"):
            raise ValueError(f"small_images must be 'upscale' or 'skip', got {self.small_images!r}")
        # PIL refuses images above 2 * MAX_IMAGE_PIXELS on its own; lift that limit (never lower
        # it) so that ``max_pixels`` is the only gate.
        if Image.MAX_IMAGE_PIXELS is not None and self.max_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = self.max_pixels

    def __call__(self, sample: dict, rng: random.Random | None) -> np.ndarray | str:
        """Returns the crop, or the skip reason as a string."""
        key = find_image_key(sample)
        if key is None:
            return "missing_image"
        data = sample[key]
        if not data:
            return "empty"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            return "too_large"
        except Exception:
            return "corrupt"
        width, height = img.size
        # Header only so far: refuse bombs before any pixel is decoded.
        if width * height > self.max_pixels:
            return "too_large"
        res = self.resolution
        if min(width, height) < res and self.small_images == "skip":
            return "too_small"
        try:
            if self.jpeg_draft and img.format == "JPEG":
                img.draft(img.mode, (res, res))
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            img = to_rgb(img)
            crop_rng = rng if (rng is not None and self.random_crop) else None
            box = crop_box(img.width, img.height, crop_rng)
            if box[2] - box[0] == res:
                img = img.crop(box)
            else:
                img = img.resize((res, res), Image.Resampling.BICUBIC, box=box)
            arr = np.asarray(img)  # (R, R, 3) uint8
        except Exception:
            # Truncated streams, bad chunks, broken palettes: all surface here, during decode.
            return "corrupt"
        if rng is not None and self.hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return arr
