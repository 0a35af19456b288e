"""Post-training pairs (real image, generated code map): the folder format and its DataModule.

A pairs folder (written by ``python -m vistok.data.make_posttrain_pairs``) holds WebDataset shards
``{split}-{i:06d}.tar``, one per input image shard i, and ``meta.json``. Each sample is:

- ``png``: the real image exactly as the tokenizer encoded it (the centre crop at the tokenizer's
  resolution, uint8, lossless), the decoder's target;
- ``codes.npy``: the code map the generator regenerated from it by teacher forcing, in the
  tokenizer's layout ``(*token_shape[, F])`` (int16 or int32): code ids, never decoded to pixels
  and re-encoded;
- ``real.npy``: the tokenizer's own codes of the image (the ground truth teacher forcing starts
  from), ``kept.npy``: which positions kept their ground-truth code (bool, ``token_shape``);
- ``cls``: the class label when the image has one.

``meta.json`` names the generator and the tokenizer (path, SHA-256, EMA or not), ``code_source``
(the tokenizer whose codes these are: the tokenizer itself, or the one it was post-trained from),
the code space, token shape and resolution, the sampling protocol (preservation ratio, CFG,
temperature, top-k/p, seed and the per-sample seed rule) and per split the shards, sample count,
measured kept and changed fractions and whether the split is complete.

``PairDataModule`` batches are dicts: ``image`` (B, 3, R, R) float in [-1, 1] (never cropped or
flipped: the codes belong to these exact pixels), ``codes`` (B, *token_shape[, F]) int64,
``label`` (B,) int64, ``key`` list[str]. Streams behave as in ``vistok.data.stream``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from vistok.data.codes import decode_codes, read_meta
from vistok.data.datamodule import SkipCountLogger
from vistok.data.image_decode import SKIP_REASONS, ImageDecoder, parse_label
from vistok.data.stream import ShardStream, SkipStats, StreamLoader

FORMAT = "vistok-pairs-v1"
META = "meta.json"


def sample_seed(seed: int, key: str) -> int:
    """The seed of one sample's teacher forcing: sha256(``seed|key``), independent of the batch,
    the shard order and the number of processes."""
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative int64


def read_pairs_meta(root: str | os.PathLike) -> dict[str, Any]:
    return read_meta(root, FORMAT, "vistok.data.make_posttrain_pairs")


def split_urls(root: str | os.PathLike, meta: dict, split: str) -> list[str]:
    splits = meta.get("splits", {})
    if split not in splits:
        raise ValueError(f"{root} has no {split!r} pairs (has {sorted(splits)})")
    info = splits[split]
    if not info.get("complete"):
        raise ValueError(
            f"the {split!r} pairs in {root} are unfinished ({len(info.get('shards', []))} of "
            f"{info.get('num_input_shards')} shards): rerun make_posttrain_pairs with the same "
            "arguments, it resumes"
        )
    return [str(Path(root) / name) for name in info["shards"]]


class PairStream(ShardStream):
    """A ``ShardStream`` whose samples also carry their generated code map."""

    def _batches(self, samples, pending, rng):
        images, labels, keys, codes = [], [], [], []
        for sample in samples:
            out = self.decoder(sample, None)  # no random crop or flip, ever
            if isinstance(out, str) or "codes.npy" not in sample:
                pending.counts[out if isinstance(out, str) else "corrupt"] += 1
                if sum(pending.counts[r] for r in SKIP_REASONS) >= self.batch_size and not images:
                    yield self._with_codes([], [], [], [], pending.take())
                continue
            try:
                code_map = decode_codes(sample["codes.npy"])
            except Exception:
                pending.counts["corrupt"] += 1
                continue
            pending.good += 1
            images.append(out)
            codes.append(code_map)
            labels.append(parse_label(sample))
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                yield self._with_codes(images, codes, labels, keys, pending.take())
                images, labels, keys, codes = [], [], [], []
        if images or pending.counts:
            yield self._with_codes(images, codes, labels, keys, pending.take())

    def _with_codes(self, images, codes, labels, keys, skipped) -> dict:
        batch = self._collate(images, labels, keys, skipped)
        stacked = torch.from_numpy(np.stack(codes)) if codes else torch.empty(0, dtype=torch.long)
        # Code ids become int64; continuous latents stay float.
        batch["codes"] = stacked if stacked.is_floating_point() else stacked.long()
        return batch


class PairDataModule(pl.LightningDataModule):
    """Batches of (real image, generated code map) pairs for decoder post-training.

    Args:
        pairs: the pairs folder (``meta.json`` + shards) written by ``make_posttrain_pairs``.
        train_split: split name in ``meta.json``.
        val_split: held-out pairs for validation; None validates on the training split read once
            (capped by ``trainer.limit_val_batches``).
        batch_size / val_batch_size: per device. ``batches_per_epoch``: per rank.
        num_workers: DataLoader workers per device; ``shuffle_buffer``: samples per worker.
        max_bad_fraction: unreadable samples allowed (after ``bad_fraction_min_samples``).
    """

    def __init__(
        self,
        pairs: str,
        train_split: str = "train",
        val_split: str | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        batches_per_epoch: int = 1000,
        max_bad_fraction: float = 0.01,
        bad_fraction_min_samples: int = 1000,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.meta = read_pairs_meta(pairs)
        self.train_urls = split_urls(pairs, self.meta, train_split)
        self.val_urls = split_urls(pairs, self.meta, val_split) if val_split else self.train_urls
        self.resolution = int(self.meta["resolution"])
        self.decoder = ImageDecoder(resolution=self.resolution, random_crop=False, hflip=False)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.batches_per_epoch = batches_per_epoch
        self.max_bad_fraction, self.min_samples = max_bad_fraction, bad_fraction_min_samples
        self.train_stats, self.val_stats = SkipStats("train"), SkipStats("validation")

    @property
    def tokenizer_identity(self) -> dict[str, Any]:
        """The tokenizer whose codes the pairs hold (what post-training must start from)."""
        return self.meta["code_source"]

    @property
    def val_shards(self) -> str:
        """Recorded by results.json next to the validation numbers."""
        return "::".join(self.val_urls)

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None and not any(
            isinstance(c, SkipCountLogger) for c in self.trainer.callbacks
        ):
            self.trainer.callbacks.append(SkipCountLogger())

    def train_dataloader(self, rank: int | None = None, world_size: int | None = None):
        rank, world_size = self._dist(rank, world_size)
        stream = PairStream(
            self.train_urls,
            self.decoder,
            self.batch_size,
            True,
            rank,
            world_size,
            self.shuffle_buffer,
            self.seed,
        )
        return StreamLoader(
            stream,
            self.train_stats,
            self.num_workers,
            self.max_bad_fraction,
            self.min_samples,
            self.batches_per_epoch,
            epoch_source=lambda: None if self.trainer is None else self.trainer.current_epoch,
        )

    def val_dataloader(self, rank: int | None = None, world_size: int | None = None):
        rank, world_size = self._dist(rank, world_size)
        stream = PairStream(
            self.val_urls, self.decoder, self.val_batch_size, False, rank, world_size
        )
        return StreamLoader(
            stream, self.val_stats, self.num_workers, self.max_bad_fraction, self.min_samples
        )

    def _dist(self, rank: int | None, world_size: int | None) -> tuple[int, int]:
        if rank is not None and world_size is not None:
            return rank, world_size
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
