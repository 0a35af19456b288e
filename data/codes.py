"""Pre-extracted tokenizer codes: the shard format and their DataModule.

A code folder (written by ``python -m vistok.data.extract_codes``) holds WebDataset shards
``{split}-000000.tar`` ... (``{split}-r003-000000.tar`` ...: written by process 3 of a
multi-process extraction) and ``meta.json``. Each sample is ``codes.npy`` (int16 or int32 codes
of shape ``(A, *token_shape[, F])``, or float32 / float16 latents ``(A, channels, *token_shape)``
for continuous tokenizers; A = 1 view, or 2 with ``--flip``: the image and its mirror, as in
LlamaGen's extraction) and ``cls`` (the label, -1 when unlabelled). ``meta.json`` names the
tokenizer that made the codes (path, SHA-256, whether EMA weights were used), its code space and
token shape, and per split the shard names, sample count and number of classes, so that a
generator can refuse codes from another tokenizer; for continuous latents also the per-channel
``latent_stats`` (mean, std over every view and position) that diffusion generators normalise by.

``CodeDataModule`` batches are dicts: ``codes`` (B, *token_shape[, F]) int64 or, for latents,
(B, channels, *token_shape) float32 (a random view per sample in training, the first in
validation), ``label`` (B,) int64, ``key`` list[str]. The stream is ``vistok.data.stream``'s
with the ``CodeSamples`` decoder: training cycles forever over each (rank, worker)'s shard subset
through a shuffle buffer and the loader cuts ``batches_per_epoch`` batches per epoch on every
rank; validation reads each sample once on exactly one rank.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vistok.data.datamodule import StreamDataModule
from vistok.data.stream import SampleDecoder, ShardStream

FORMAT = "vistok-codes-v1"
META = "meta.json"

# ---------------------------------------------------------------------------------------------
# Per-channel statistics of continuous latents (meta.json)


class LatentStats:
    """Per-channel mean and std of latents (B, C, *S), accumulated in float64."""

    def __init__(self):
        self.total = self.squares = None
        self.count = 0

    def update(self, latents: np.ndarray) -> None:
        x = np.moveaxis(np.asarray(latents, np.float64), 1, 0).reshape(latents.shape[1], -1)
        total, squares = x.sum(1), np.square(x).sum(1)  # (C,)
        if self.total is None:
            self.total, self.squares = total, squares
        else:
            self.total, self.squares = self.total + total, self.squares + squares
        self.count += x.shape[1]

    def add(self, other: LatentStats) -> None:
        """Adds the sums of another, disjoint set of latents (another process's share)."""
        if other.total is None:
            return
        if self.total is None:
            self.total, self.squares = other.total.copy(), other.squares.copy()
        else:
            self.total, self.squares = self.total + other.total, self.squares + other.squares
        self.count += other.count

    def as_dict(self) -> dict[str, Any]:
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.squares / self.count - np.square(mean), 0.0))
        # A channel the encoder never uses must not divide by zero.
        return {"mean": mean.tolist(), "std": np.maximum(std, 1e-6).tolist(), "count": self.count}


# ---------------------------------------------------------------------------------------------
# meta.json


def code_dtype(code_space: dict, float16: bool = False) -> np.dtype:
    """int16 when every code value fits, else int32; latents float32 (or float16)."""
    if code_space["kind"] == "continuous":
        return np.dtype(np.float16 if float16 else np.float32)
    top = 1 if code_space["kind"] == "bits" else code_space["vocab_size"] - 1
    return np.dtype(np.int16 if top <= np.iinfo(np.int16).max else np.int32)


def encode_codes(codes: np.ndarray, dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.save(buf, codes.astype(dtype), allow_pickle=False)
    return buf.getvalue()


def decode_codes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_meta(
    root: str | os.PathLike, fmt: str = FORMAT, maker: str = "vistok.data.extract_codes"
) -> dict[str, Any]:
    """A folder's ``meta.json``, checked to be of format ``fmt`` (written by ``maker``)."""
    path = Path(root) / META
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: make it first (python -m {maker})")
    meta = json.loads(path.read_text())
    if meta.get("format") != fmt:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {fmt!r}")
    return meta


def split_urls(root: str | os.PathLike, meta: dict, split: str) -> list[str]:
    splits = meta.get("splits", {})
    if split not in splits:
        raise ValueError(
            f"{root} has no {split!r} codes (has {sorted(splits)}); extract them with "
            f"--split {split}, or choose another split"
        )
    return [str(Path(root) / name) for name in splits[split]["shards"]]


# ---------------------------------------------------------------------------------------------
# Streams


class CodeSamples(SampleDecoder):
    """``codes.npy`` samples: ``codes`` (B, *token_shape[, F]) int64, or float32 latents; a
    random view per sample in training (rng given), the first in validation."""

    fields = ("codes",)
    shards = "code"
    rng_name = "vistok-codes"
    pin_memory = torch.cuda.is_available()

    def __call__(self, sample, rng):
        try:
            views = decode_codes(sample["codes.npy"])  # (A, *token_shape[, F])
        except Exception:
            return "corrupt"
        return {"codes": views[rng.randrange(len(views)) if rng is not None else 0]}

    def collate(self, fields):
        codes = fields["codes"]
        stacked = torch.from_numpy(np.stack(codes)) if codes else torch.empty(0)
        return {"codes": stacked.float() if stacked.is_floating_point() else stacked.long()}


class CodeStream(ShardStream):
    """A ``ShardStream`` of extracted codes (``kwargs``: rank, world_size, shuffle_buffer, seed)."""

    def __init__(self, urls: list[str], batch_size: int, train: bool, **kwargs):
        super().__init__(urls, CodeSamples(), batch_size, train, **kwargs)


class CodeDataModule(StreamDataModule):
    """Batches of pre-extracted codes for generator training.

    Args:
        root: the code folder (``meta.json`` + shards) written by ``extract_codes``.
        train_split / val_split: split names in ``meta.json``; ``val_split=None`` skips validation.
        stream: batch size, workers, bad-sample budget, seed (see ``StreamDataModule``).
    """

    def __init__(
        self,
        root: str,
        train_split: str = "train",
        val_split: str | None = "val",
        **stream,
    ):
        super().__init__(**stream)
        self.save_hyperparameters()
        self.root = root
        self.meta = read_meta(root)
        self._train_urls = split_urls(root, self.meta, train_split)
        self._val_urls = split_urls(root, self.meta, val_split) if val_split else None
        self.train_decoder = self.val_decoder = CodeSamples()

    def train_urls(self) -> list[str]:
        return self._train_urls

    def val_urls(self) -> list[str] | None:
        return self._val_urls

    @property
    def val_shards(self) -> str | None:
        """Recorded by results.json next to the validation numbers."""
        return None if self._val_urls is None else "::".join(self._val_urls)

    @property
    def tokenizer(self) -> dict[str, Any]:
        return self.meta["tokenizer"]

    def num_classes(self) -> int:
        return max(s.get("num_classes", 0) for s in self.meta["splits"].values())
