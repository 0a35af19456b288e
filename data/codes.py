"""Pre-extracted tokenizer codes: the frozen tokenizer, the shard format, and their DataModule.

A code folder (written by ``python -m vistok.data.extract_codes``) holds WebDataset shards
``{split}-000000.tar`` ... and ``meta.json``. Each sample is ``codes.npy`` (int16 or int32 codes
of shape ``(A, *token_shape[, F])``, or float32 / float16 latents ``(A, channels, *token_shape)``
for continuous tokenizers; A = 1 view, or 2 with ``--flip``: the image and its mirror, as in
LlamaGen's extraction) and ``cls`` (the label, -1 when unlabelled). ``meta.json`` names the
tokenizer that made the codes (path, SHA-256, whether EMA weights were used), its code space and
token shape, and per split the shard names, sample count and number of classes, so that a
generator can refuse codes from another tokenizer; for continuous latents also the per-channel
``latent_stats`` (mean, std over every view and position) that diffusion generators normalise by.

``CodeDataModule`` batches are dicts: ``codes`` (B, *token_shape[, F]) int64 or, for latents,
(B, channels, *token_shape) float32 (a random view per sample in training, the first in
validation), ``label`` (B,) int64, ``key`` list[str]. Streams
work as in ``vistok.data.stream``: training cycles forever over each (rank, worker)'s shard subset
through a shuffle buffer and the loader cuts ``batches_per_epoch`` batches per epoch on every
rank; validation reads each sample once on exactly one rank.
"""

from __future__ import annotations

import io
import json
import os
import random
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from vistok.common.checkpoints import (
    file_sha256,
    load_strict,
    read_checkpoint,
    submodule_state,
)
from vistok.common.configurable import instantiate
from vistok.common.ema import load_averages
from vistok.data.image_decode import SHARD_REASON, parse_label
from vistok.data.stream import DataQualityError, SkipStats, partition_shards

FORMAT = "vistok-codes-v1"
META = "meta.json"

# ---------------------------------------------------------------------------------------------
# The frozen tokenizer


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

    def as_dict(self) -> dict[str, Any]:
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.squares / self.count - np.square(mean), 0.0))
        # A channel the encoder never uses must not divide by zero.
        return {"mean": mean.tolist(), "std": np.maximum(std, 1e-6).tolist(), "count": self.count}


class TokenizerCheckpoint(NamedTuple):
    tokenizer: Any  # vistok.tokenizers.tokenizer.Tokenizer, eval mode, frozen
    identity: dict[str, Any]  # path, sha256, class_path, ema


def read_tokenizer(
    path: str | os.PathLike, ema: bool = True, device: str | torch.device = "cpu"
) -> TokenizerCheckpoint:
    """Rebuild a tokenizer from a ``TokenizerModule`` checkpoint: its config from
    ``hyper_parameters["tokenizer"]``, its weights (``tokenizer.*``) loaded strictly, then the EMA
    averages (``ema.<parameter name>``) copied in when ``ema`` is set and the checkpoint has them.

    An exported folder (or Hub id) is read as exported; its identity is the checkpoint it was
    exported from, so codes and generators stay paired across export."""
    if not str(path).endswith(".ckpt"):
        from vistok.common.hub import load_pretrained

        tokenizer, config = load_pretrained(path, kind="tokenizer", device=device)
        identity = {
            "path": str(path),
            "sha256": config.get("source_sha256"),
            "class_path": config["model"]["class_path"],
            "ema": config.get("weights") == "ema",
        }
        return TokenizerCheckpoint(tokenizer, identity)
    ckpt = read_checkpoint(path)
    hparams = ckpt.get("hyper_parameters") or {}
    config = hparams.get("tokenizer")
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"{path} is not a tokenizer checkpoint (no hyper_parameters.tokenizer)")
    tokenizer = instantiate(config)
    state = ckpt["state_dict"]
    load_strict(tokenizer, submodule_state(state, "tokenizer"), str(path))
    used_ema = ema and load_averages(tokenizer, state, str(path))
    tokenizer.requires_grad_(False).eval().to(device)
    identity = {
        "path": str(Path(path).resolve()),
        "sha256": file_sha256(path),
        "class_path": config["class_path"],
        "ema": used_ema,
    }
    return TokenizerCheckpoint(tokenizer, identity)


def load_tokenizer_from_checkpoint(path: str | os.PathLike, ema: bool = True, device="cpu"):
    """The frozen tokenizer (eval mode, EMA weights when asked for and present)."""
    return read_tokenizer(path, ema, device).tokenizer


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


class _Handler:
    """webdataset exception handler: warn, count the shard, keep going."""

    def __init__(self, counts: Counter):
        self.counts, self.failures = counts, 0

    def __call__(self, exn: Exception) -> bool:
        warnings.warn(f"skipping unreadable code shard: {exn}", stacklevel=2)
        self.counts[SHARD_REASON] += 1
        self.failures += 1
        return True


class CodeStream(IterableDataset):
    """Batches of codes for one rank (see the module docstring)."""

    def __init__(
        self,
        urls: list[str],
        batch_size: int,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
    ):
        super().__init__()
        self.urls, self.batch_size, self.train = urls, batch_size, train
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.epoch = 0  # set by CodeLoader before each pass

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(f"vistok-codes:{self.seed}:{self.rank}:{worker}:{self.epoch}")
        counts: Counter = Counter()
        handler, good = _Handler(counts), [0]
        if self.train:
            mine = partition_shards(self.urls, self.rank, self.world_size, worker, num_workers)
            shards = self._cycle(mine, rng, handler, good)
        else:
            shards = ({"url": u} for u in self.urls[worker::num_workers])
        files = tar_file_expander(url_opener(shards, handler=handler), handler=handler)
        samples = group_by_keys(files, handler=handler)
        if self.train and self.shuffle_buffer > 1:
            samples = wds.filters._shuffle(samples, self.shuffle_buffer, 100, rng=rng)
        elif not self.train:
            samples = self._this_rank(samples)
        codes, labels, keys = [], [], []
        for sample in samples:
            try:
                views = decode_codes(sample["codes.npy"])  # (A, *token_shape[, F])
            except Exception:
                counts["corrupt"] += 1
                continue
            good[0] += 1
            codes.append(views[rng.randrange(len(views)) if self.train else 0])
            labels.append(parse_label(sample))
            keys.append(sample["__key__"])
            if len(keys) == self.batch_size:
                yield self._collate(codes, labels, keys, counts)
                codes, labels, keys = [], [], []
        if keys or counts:
            yield self._collate(codes, labels, keys, counts)

    def _cycle(self, urls: list[str], rng: random.Random, handler: _Handler, good: list[int]):
        while True:
            before = (good[0], handler.failures)
            order = list(urls)
            rng.shuffle(order)
            yield from ({"url": u} for u in order)
            # A whole pass of unreadable shards would otherwise spin forever.
            if good[0] == before[0] and handler.failures - before[1] >= len(urls):
                raise RuntimeError(f"none of these code shards could be read: {urls}")

    def _this_rank(self, samples):
        # Sample j of shard s goes to rank (s + j) % world_size: each sample read exactly once.
        index = {url: i for i, url in enumerate(self.urls)}
        current, j = None, 0
        for sample in samples:
            url = sample.get("__url__")
            if url != current:
                current, j = url, 0
            if (index.get(url, 0) + j) % self.world_size == self.rank:
                yield sample
            j += 1

    @staticmethod
    def _collate(codes, labels, keys, counts: Counter) -> dict:
        skipped = dict(counts)
        counts.clear()
        stacked = torch.from_numpy(np.stack(codes)) if codes else torch.empty(0)
        stacked = stacked.float() if stacked.is_floating_point() else stacked.long()
        return {
            "codes": stacked,
            "label": torch.tensor(labels, dtype=torch.long),
            "key": keys,
            "skipped": skipped,
        }


class CodeLoader(wds.WebLoader):
    """Loader over a ``CodeStream`` (batching happens in the workers): moves skip counts into
    ``stats``, drops count-only batches, and cuts ``batches_per_epoch`` batches per pass so that
    every rank steps equally often. The epoch seeding a pass is read when the pass starts."""

    def __init__(
        self,
        stream: CodeStream,
        stats: SkipStats,
        num_workers: int,
        max_bad_fraction: float,
        batches_per_epoch: int | None = None,
        epoch_source=None,
        min_samples: int = 1000,
    ):
        super().__init__(
            stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available()
        )
        self.stream = self.dataset = stream  # ``dataset``: Lightning sees an iterable loader
        self.stats, self.max_bad_fraction, self.min_samples = stats, max_bad_fraction, min_samples
        self.batches_per_epoch, self.epoch_source, self._passes = batches_per_epoch, epoch_source, 0
        self.append(self._account)
        if batches_per_epoch is not None:
            self.with_epoch(batches_per_epoch)

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a read-once validation stream has no length")
        return self.batches_per_epoch

    def __iter__(self):
        epoch = self.epoch_source() if self.epoch_source is not None else None
        self.stream.epoch = self._passes if epoch is None else epoch
        self._passes += 1
        if not self.stream.train:
            self.stats.reset()
        yield from super().__iter__()

    def _account(self, batches):
        for batch in batches:
            for reason, n in batch.pop("skipped").items():
                self.stats.skipped[reason] += n
            self.stats.good += len(batch["key"])
            s = self.stats
            if s.good + s.bad >= self.min_samples and s.bad_fraction > self.max_bad_fraction:
                raise DataQualityError(
                    f"{s.bad_fraction:.1%} of {s.name} code samples were unreadable "
                    f"({s.as_dict()}), above max_bad_fraction={self.max_bad_fraction}"
                )
            if batch["key"]:
                yield batch


class CodeDataModule(pl.LightningDataModule):
    """Batches of pre-extracted codes for generator training.

    Args:
        root: the code folder (``meta.json`` + shards) written by ``extract_codes``.
        train_split / val_split: split names in ``meta.json``; ``val_split=None`` skips validation.
        batch_size / val_batch_size: per device. ``batches_per_epoch``: per rank.
        num_workers: DataLoader workers per device; ``shuffle_buffer``: samples per worker.
        max_bad_fraction: unreadable samples allowed before training stops with an error.
    """

    def __init__(
        self,
        root: str,
        train_split: str = "train",
        val_split: str | None = "val",
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        batches_per_epoch: int = 1000,
        max_bad_fraction: float = 0.01,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.root = root
        self.meta = read_meta(root)
        self.train_urls = split_urls(root, self.meta, train_split)
        self.val_urls = split_urls(root, self.meta, val_split) if val_split else None
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.batches_per_epoch, self.seed = batches_per_epoch, seed
        self.max_bad_fraction = max_bad_fraction
        self.train_stats, self.val_stats = SkipStats("train"), SkipStats("validation")

    @property
    def val_shards(self) -> str | None:
        """Recorded by results.json next to the validation numbers."""
        return None if self.val_urls is None else "::".join(self.val_urls)

    @property
    def tokenizer(self) -> dict[str, Any]:
        return self.meta["tokenizer"]

    def num_classes(self) -> int:
        return max(s.get("num_classes", 0) for s in self.meta["splits"].values())

    def train_dataloader(self, rank: int | None = None, world_size: int | None = None):
        rank, world_size = self._dist(rank, world_size)
        stream = CodeStream(
            self.train_urls, self.batch_size, True, rank, world_size, self.shuffle_buffer, self.seed
        )
        return CodeLoader(
            stream,
            self.train_stats,
            self.num_workers,
            self.max_bad_fraction,
            self.batches_per_epoch,
            epoch_source=self._epoch,
        )

    def val_dataloader(self, rank: int | None = None, world_size: int | None = None):
        if self.val_urls is None:
            return []
        rank, world_size = self._dist(rank, world_size)
        stream = CodeStream(self.val_urls, self.val_batch_size, False, rank, world_size)
        return CodeLoader(stream, self.val_stats, self.num_workers, self.max_bad_fraction)

    def _epoch(self) -> int | None:
        return None if self.trainer is None else self.trainer.current_epoch

    def _dist(self, rank: int | None, world_size: int | None) -> tuple[int, int]:
        if rank is not None and world_size is not None:
            return rank, world_size
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
