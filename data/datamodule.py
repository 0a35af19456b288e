"""``ImageDataModule``: images from WebDataset tar shards, as batches for tokenizer training.

Batches are dicts: ``image`` (B, 3, R, R) float in [-1, 1], ``label`` (B,) long (the sample's
``cls``, -1 when absent), ``key`` list[str]. ``batch_size`` is per device.

Knobs (all ``--data.<name>`` on the command line):
- ``train_shards`` / ``val_shards``: shard spec: a brace pattern
  (``/d/train-{000000..000099}.tar``), a single path, ``pipe:`` URLs
  (``pipe:aws s3 cp s3://b/train-000001.tar -``), or several of these joined with ``::``.
  None = the embedded default dataset (``vistok.data.default_dataset``).
- ``resolution``: side R of the square crops.
- ``batch_size`` / ``val_batch_size``: per-device batch sizes (validation defaults to training's).
- ``num_workers``: DataLoader worker processes per device, each reading its own shards.
- ``shuffle_buffer``: samples held per worker for shuffling (raw bytes, before decoding).
- ``batches_per_epoch``: training batches per epoch on every rank (the training stream is
  infinite; stop with ``max_steps``). Also the stream's reseeding period.
- ``random_crop`` / ``hflip``: training augmentation. The shorter side is resized to R and a square
  crop taken at a random position (centre if ``random_crop`` is false); validation always takes
  the centre and never flips.
- ``small_images``: images whose shorter side is below R are upscaled (``upscale``) or skipped and
  counted as ``too_small`` (``skip``).
- ``max_pixels``: images with more pixels than this (read from the header, before decoding) are
  skipped as ``too_large``: decompression-bomb guard.
- ``max_bad_fraction``: skipped / seen samples allowed before training stops with an error
  (checked once ``bad_fraction_min_samples`` samples have been seen).
- ``seed``: base seed; shard order, shuffle buffer, crops and flips derive from
  (seed, rank, worker, epoch).

Streams. Training: every (rank, worker) gets a disjoint subset of the shards when there are at
least ranks x workers of them (else disjoint per rank, else all), cycles over it forever in a
freshly shuffled order each pass, and the loader cuts ``batches_per_epoch`` batches per epoch, so
every rank steps the same number of times (uneven counts hang DDP). Validation: read once, in
order; each sample goes to exactly one rank (no padding, no duplicates), so ranks may differ by a
batch or more: avoid per-step collectives (``sync_dist=True``) in validation_step. With at least
as many validation shards as ranks, each rank opens only its own shards (rank r: shards r,
r + world_size, ...); with fewer, every rank reads every shard and decodes only its own samples.

Resume: ``--ckpt_path`` continues the training stream exactly where the checkpoint left it (the
same next batch, mid-epoch too, on every rank): the loader's position is saved in the checkpoint
(``StreamLoader.state_dict``) and the workers pass over the samples already used without
decoding them. It needs the same ``seed``, ``num_workers``, ``batches_per_epoch`` and number of
ranks; with others the epoch starts a fresh pass, with a warning.

Bad data never stops training: samples are skipped and counted by reason (``missing_image``,
``empty``, ``corrupt``, ``too_small``, ``too_large``; shards that cannot be read are named in a
warning and counted as ``unreadable_shard``). ``SkipCountLogger`` (added to the Trainer by
``setup``) logs the counts as ``data/skipped_<reason>`` (training, cumulative, rank 0's share) and
``data/val_skipped_<reason>`` (last validation pass, summed over ranks).
"""

from __future__ import annotations

import inspect
import os
from typing import Literal

import pytorch_lightning as pl
import torch

from vistok.data.default_dataset import default_shards
from vistok.data.image_decode import ImageDecoder
from vistok.data.stream import (
    SampleDecoder,
    ShardStream,
    SkipStats,
    StreamLoader,
    expand_shards,
)


def check_count(option: str, value, least: int) -> None:
    """Size and count options are integers of at least ``least``; the error names the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"--data.{option} must be an integer >= {least}, got {value!r}")


class StreamDataModule(pl.LightningDataModule):
    """What every vistok DataModule shares: a training stream cut into ``batches_per_epoch``
    batches per rank and a read-once validation stream, both ``ShardStream``s whose decoders the
    subclass supplies (``train_decoder`` / ``val_decoder``), skip accounting, and the rank.

    Subclasses set the decoders and implement ``train_urls`` / ``val_urls`` (None: no
    validation); a subclass whose own arguments come first forwards these as ``**stream``.

    Args:
        batch_size / val_batch_size: per device. ``batches_per_epoch``: per rank.
        num_workers: DataLoader workers per device; ``shuffle_buffer``: samples per worker.
        max_bad_fraction: unreadable samples allowed before training stops with an error
            (checked once ``bad_fraction_min_samples`` samples have been seen).
        seed: seeds the shard order, the shuffle buffer and each sample's augmentation.
    """

    train_decoder: SampleDecoder | ImageDecoder
    val_decoder: SampleDecoder | ImageDecoder

    def __init__(
        self,
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
        check_count("batch_size", batch_size, 1)
        if val_batch_size is not None:
            check_count("val_batch_size", val_batch_size, 1)
        check_count("num_workers", num_workers, 0)
        check_count("shuffle_buffer", shuffle_buffer, 0)
        check_count("batches_per_epoch", batches_per_epoch, 1)
        check_count("bad_fraction_min_samples", bad_fraction_min_samples, 0)
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(
                f"--data.max_bad_fraction must be in [0, 1] (a fraction), got {max_bad_fraction}"
            )
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.batches_per_epoch, self.seed = batches_per_epoch, seed
        self.max_bad_fraction = max_bad_fraction
        self.bad_fraction_min_samples = bad_fraction_min_samples
        self.train_stats, self.val_stats = SkipStats("train"), SkipStats("validation")

    @staticmethod
    def options(values: dict) -> dict:
        """The shared options out of a subclass constructor's arguments (its ``locals()``)."""
        names = inspect.signature(StreamDataModule.__init__).parameters
        return {name: values[name] for name in names if name != "self"}

    def train_urls(self) -> list[str]:
        raise NotImplementedError

    def val_urls(self) -> list[str] | None:
        raise NotImplementedError

    # -- Lightning hooks ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        if not any(isinstance(c, SkipCountLogger) for c in trainer.callbacks):
            trainer.callbacks.append(SkipCountLogger())

    def train_dataloader(self, rank: int | None = None, world_size: int | None = None):
        """``rank`` / ``world_size`` default to the Trainer's (or torch.distributed's)."""
        urls = self.train_urls()
        rank, world_size = self._dist(rank, world_size)
        stream = ShardStream(
            urls,
            self.train_decoder,
            self.batch_size,
            train=True,
            rank=rank,
            world_size=world_size,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
        )
        return self._loader(
            stream,
            self.train_stats,
            self.batches_per_epoch,
            epoch_source=self._trainer_epoch,
            consumed_source=self._trainer_batches,
        )

    def val_dataloader(self, rank: int | None = None, world_size: int | None = None):
        urls = self.val_urls()
        if urls is None:
            return []
        rank, world_size = self._dist(rank, world_size)
        stream = ShardStream(urls, self.val_decoder, self.val_batch_size, False, rank, world_size)
        return self._loader(stream, self.val_stats)

    # -- internals --------------------------------------------------------------------------
    def _loader(self, stream: ShardStream, stats: SkipStats, *args, **kwargs) -> StreamLoader:
        """A ``StreamLoader`` over ``stream`` with this module's worker and bad-sample options."""
        options = (self.num_workers, self.max_bad_fraction, self.bad_fraction_min_samples)
        return StreamLoader(stream, stats, *options, *args, **kwargs)

    def _trainer_epoch(self) -> int | None:
        return None if self.trainer is None else self.trainer.current_epoch

    def _trainer_batches(self) -> int | None:
        """Training batches the Trainer has used in this epoch (it fetches one ahead)."""
        if self.trainer is None:
            return None
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _dist(self, rank: int | None, world_size: int | None) -> tuple[int, int]:
        if rank is not None and world_size is not None:
            if not 0 <= rank < world_size:
                raise ValueError(f"rank {rank} outside world_size {world_size}")
            return rank, world_size
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1


class ImageDataModule(StreamDataModule):
    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        resolution: int = 256,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        batches_per_epoch: int = 1000,
        random_crop: bool = True,
        hflip: bool = True,
        small_images: Literal["upscale", "skip"] = "upscale",
        max_pixels: int = 89_478_485,
        max_bad_fraction: float = 0.05,
        bad_fraction_min_samples: int = 1000,
        seed: int = 0,
    ):
        """See the module docstring for what each argument does."""
        check_count("resolution", resolution, 1)
        check_count("max_pixels", max_pixels, 1)
        super().__init__(**StreamDataModule.options(locals()))
        self.save_hyperparameters()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.resolution = resolution
        decoder_args = dict(resolution=resolution, small_images=small_images, max_pixels=max_pixels)
        self.train_decoder = ImageDecoder(random_crop=random_crop, hflip=hflip, **decoder_args)
        self.val_decoder = ImageDecoder(random_crop=False, hflip=False, **decoder_args)

    def train_urls(self) -> list[str]:
        return self._urls(self.train_shards, "train")

    def val_urls(self) -> list[str]:
        return self._urls(self.val_shards, "val")

    def _urls(self, spec: str | None, split: str) -> list[str]:
        if spec is None:
            spec = default_shards(split)
        urls = expand_shards(spec)
        # Local paths may use ~; URLs (pipe:, http:, s3: ...) are left as written.
        return [u if ":" in u.split("/")[0] else os.path.expanduser(u) for u in urls]


class SkipCountLogger(pl.Callback):
    """Logs the DataModule's skip counts (``data/skipped_<reason>``, ``data/val_skipped_*``)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = getattr(trainer.datamodule, "train_stats", None)
        if stats is not None:
            counts = {f"data/skipped_{r}": float(n) for r, n in stats.as_dict().items()}
            pl_module.log_dict(counts, on_step=True, on_epoch=False)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        stats = getattr(trainer.datamodule, "val_stats", None)
        if stats is not None and not trainer.sanity_checking:
            counts = {f"data/val_skipped_{r}": float(n) for r, n in stats.as_dict().items()}
            # Ranks saw disjoint samples: the sum is the whole split's count.
            pl_module.log_dict(
                counts, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="sum"
            )
