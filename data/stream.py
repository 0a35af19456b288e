"""Worker-side sample streams over WebDataset shards, and the loader that accounts for skips.

Each DataLoader worker runs one ``ShardStream``: shards -> tar members (webdataset's
``url_opener`` / ``tar_file_expander`` / ``group_by_keys``, with a handler that warns about and
skips unreadable shards) -> [train: ``webdataset.shuffle`` buffer] -> a ``SampleDecoder`` ->
batches. The decoder is the only part that knows what a sample holds: ``ImageSamples`` (here)
for image shards, ``CodeSamples`` (``data/codes.py``) for extracted codes, ``PairSamples``
(``data/pairs.py``) for post-training pairs.

Skip counts travel inside the batches (``batch["skipped"]``) because workers are separate
processes; a worker that meets many bad samples and no good ones sends count-only batches (no
images) so that the main process still hears about it. ``StreamLoader`` (main process) removes the
counts from every batch, adds them to a ``SkipStats``, drops count-only batches, raises
``DataQualityError`` when the bad fraction exceeds the limit, and hands each kept batch to the
decoder's ``finish`` (images travel as uint8 between processes, a quarter of float's bytes, and
become float in [-1, 1] there).
"""

from __future__ import annotations

import copy
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import islice

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from vistok.common.resume import gather_ranks
from vistok.data.image_decode import SHARD_REASON, SKIP_REASONS, ImageDecoder, parse_label


class DataQualityError(RuntimeError):
    """Too many samples had to be skipped."""


def expand_shards(spec: str) -> list[str]:
    """Brace patterns (``a-{000..009}.tar``), ``::``-joined lists, local paths, ``pipe:`` URLs."""
    urls = wds.shardlists.expand_urls(spec)
    if not urls:
        raise ValueError(f"shard spec {spec!r} expands to no shards")
    return urls


def partition_shards(
    urls: list[str], rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """The training shards one (rank, worker) reads.

    Disjoint across every (rank, worker) when there are enough shards; otherwise disjoint across
    ranks only; with fewer shards than ranks everybody reads all of them (with different seeds),
    so no worker is ever left without data.
    """
    consumers = world_size * num_workers
    if len(urls) >= consumers:
        return urls[rank * num_workers + worker :: consumers]
    if len(urls) >= world_size:
        return urls[rank::world_size]
    return list(urls)


def _seeded_rng(*parts) -> random.Random:
    # A str seed goes through SHA-512 in CPython: stable across runs and processes.
    return random.Random(":".join(str(p) for p in parts))


class _Pending:
    """Skips seen by one worker and not yet shipped in a batch."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.good = 0
        self.failures = 0  # unreadable shards, never reset by ``take``

    def take(self) -> dict[str, int]:
        counts, self.counts = dict(self.counts), Counter()
        return counts


# Compressed tar streams (gzip, bzip2, xz, zstd) end in their own trailer, not in zero blocks.
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


class _EndCheck:
    """A shard's byte stream, watched for an archive that stops between two members.

    tarfile reads such a truncated archive as if it had ended there; a complete one ends in
    zero blocks (and tarfile stops reading at the first), so reaching the end of the data with
    anything but zeros just before it means the rest of the shard is missing."""

    def __init__(self, stream, on_truncated: Callable[[], None]):
        self.stream, self.on_truncated = stream, on_truncated
        self.tail, self.check = b"", None

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if self.check is None and data:
            self.check = not data.startswith(_COMPRESSED)
        if data:
            self.tail = (self.tail + data)[-512:]
        elif n != 0 and self.check and self.tail.strip(b"\0"):
            self.check = False  # report once
            self.on_truncated()
        return data

    def __getattr__(self, name):
        return getattr(self.stream, name)


class _ShardHandler:
    """webdataset exception handler: warn with the shard's name, count it once, keep going.

    ``opening`` and ``watch`` wrap the stages before and after ``url_opener`` so that the
    handler knows which shard is being read: webdataset reports a broken archive from two
    levels (and the inner report does not name the shard), and a shard cut between members
    raises nothing at all."""

    def __init__(self, pending: _Pending):
        self.pending = pending
        self.url: str | None = None  # the shard being opened or read
        self.counted = False  # whether that shard has been counted (once per opening)

    def opening(self, shards):
        for shard in shards:
            self.url, self.counted = shard["url"], False
            yield shard

    def watch(self, streams):
        for source in streams:
            source["stream"] = _EndCheck(source["stream"], self._truncated)
            yield source

    def _truncated(self) -> None:
        self.report(
            self.url,
            "the archive stops between two members (truncated): the samples after the break "
            "are lost and, tar shards carrying no count, how many is unknown",
        )

    def __call__(self, exn: Exception) -> bool:
        # webdataset appends the url (and the open stream) to the exception's args.
        url = next((a for a in reversed(exn.args[1:]) if isinstance(a, str)), None)
        cause = exn.args[0] if exn.args else ""
        self.report(url or self.url, f"{type(exn).__name__}: {cause}")
        return True

    def report(self, url: str | None, why: str) -> None:
        if self.counted:
            return
        self.counted = True
        where = f"shard {url}" if url else "shard data"
        warnings.warn(f"skipping unreadable {where}: {why}", stacklevel=3)
        self.pending.counts[SHARD_REASON] += 1
        self.pending.failures += 1


class SampleDecoder:
    """What a ``ShardStream`` does with each raw sample: the pluggable part of the stream.

    ``__call__`` (in the worker) turns one WebDataset sample (a dict of raw bytes) into its
    fields, a dict of numpy arrays, or returns a skip reason (one of ``SKIP_REASONS``); ``rng`` is
    the sample's own generator in training (seeded by the stream and the sample's position in
    it) and None in validation. ``collate`` (in the worker)
    stacks a batch's fields into tensors and must accept empty lists (count-only batches);
    ``finish`` (in the main process) turns a kept batch into what the model receives.
    """

    fields: tuple[str, ...] = ()
    shards = "training"  # what the shards are called in "none of these ... shards" errors
    rng_name = "vistok"  # first part of the per-(seed, rank, worker, epoch) rng's seed
    pin_memory = False

    def __call__(self, sample: dict, rng: random.Random | None) -> dict[str, np.ndarray] | str:
        raise NotImplementedError

    def collate(self, fields: dict[str, list]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def finish(self, batch: dict) -> dict:
        return batch


def stack_images(images: list[np.ndarray], resolution: int) -> torch.Tensor:
    """(R, R, 3) uint8 crops -> (B, R, R, 3) uint8, in shared memory when inside a worker."""
    shape = (len(images), resolution, resolution, 3)
    if get_worker_info() is not None and images:
        # Stack straight into shared memory: the batch then crosses to the main process
        # without another copy (what torch's default_collate does for its workers).
        storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
        image = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    else:
        image = torch.empty(shape, dtype=torch.uint8)
    if images:
        np.stack(images, out=image.numpy())  # (B, R, R, 3) uint8: a quarter of float's bytes
    return image


class ImageSamples(SampleDecoder):
    """Images decoded and cropped by an ``ImageDecoder``: ``image`` (B, 3, R, R) in [-1, 1]."""

    fields = ("image",)

    def __init__(self, decoder: ImageDecoder):
        self.decoder = decoder

    def __call__(self, sample, rng):
        out = self.decoder(sample, rng)
        return out if isinstance(out, str) else {"image": out}

    def collate(self, fields):
        return {"image": stack_images(fields["image"], self.decoder.resolution)}

    def finish(self, batch):
        batch["image"] = to_unit_range(batch["image"])
        return batch


class ShardStream(IterableDataset):
    """Batches of decoded samples from a list of shards, for one rank.

    Shards -> tar members (webdataset's ``url_opener`` / ``tar_file_expander`` /
    ``group_by_keys``) -> [train: ``webdataset.shuffle`` buffer] -> ``decoder`` -> batches
    ``{**decoder fields, "label", "key", "skipped"}``.

    train=True: infinite; each (rank, worker) cycles over its ``partition_shards`` in a fresh
    seeded order every pass (resampling without replacement), through a shuffle buffer.
    train=False: one pass in order, each sample read by exactly one rank. With at least as many
    shards as ranks, rank r reads shards r, r + world_size, ... and opens no other (its I/O is
    its share; loads differ by up to one shard's samples); with fewer, every rank reads every
    shard and ranks split the samples: sample j of shard s belongs to rank (s + j) % world_size.
    Workers of a rank take whole shards of the rank's list.
    """

    def __init__(
        self,
        urls: list[str],
        decoder: SampleDecoder | ImageDecoder,
        batch_size: int,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
    ):
        super().__init__()
        if isinstance(decoder, ImageDecoder):
            decoder = ImageSamples(decoder)
        self.urls, self.decoder, self.batch_size, self.train = urls, decoder, batch_size, train
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        # Set by StreamLoader before each pass (workers get a fresh copy): the epoch, and for the
        # first pass after a resume where each worker's stream continues (see ``StreamLoader``).
        self.epoch = 0
        self.resume: dict | None = None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        skip = 0
        if self.resume is not None:
            # DataLoader asks its workers for batches round-robin from worker 0: rotating the
            # streams makes worker 0 play the stream whose batch comes next.
            worker = (worker + self.resume["rotation"]) % num_workers
            skip = self.resume["positions"][worker]
        name = self.decoder.rng_name
        # Two generators, both functions of (seed, rank, worker, epoch) only: ``rng`` orders the
        # shards and drives the shuffle buffer, ``decode_seed`` seeds each sample's own generator
        # (crops, flips, views). Neither depends on what a sample holds, so a resumed stream can
        # pass over the samples already used without decoding them and land on the same state.
        rng = _seeded_rng(name, self.seed, self.rank, worker, self.epoch)
        decode_seed = _seeded_rng(name, "decode", self.seed, self.rank, worker, self.epoch)
        decode_seed = decode_seed.getrandbits(62) if self.train else None
        pending = _Pending()
        handler = _ShardHandler(pending)
        if self.train:
            mine = partition_shards(self.urls, self.rank, self.world_size, worker, num_workers)
            shards = self._cycle(mine, rng, pending)
        else:
            shards = ({"url": u} for u in self._val_shards()[worker::num_workers])
        streams = url_opener(handler.opening(shards), handler=handler)
        files = tar_file_expander(handler.watch(streams), handler=handler)
        samples = group_by_keys(files, handler=handler)
        if not self.train:
            if not self.split_by_shard:
                samples = self._this_rank(samples)
        elif self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, 100, rng=rng)(samples)
        yield from self._batches(samples, pending, decode_seed, skip)

    def _cycle(self, urls: list[str], rng: random.Random, pending: _Pending):
        while True:
            before = (pending.good, pending.failures)
            order = list(urls)
            rng.shuffle(order)
            for url in order:
                yield {"url": url}
            # A whole pass of unreadable shards would otherwise spin forever.
            if pending.good == before[0] and pending.failures - before[1] >= len(urls):
                raise RuntimeError(
                    f"none of these {self.decoder.shards} shards could be read: {urls}"
                )

    @property
    def split_by_shard(self) -> bool:
        """Validation: whole shards per rank when every rank gets at least one."""
        return len(self.urls) >= self.world_size

    def _val_shards(self) -> list[str]:
        return self.urls[self.rank :: self.world_size] if self.split_by_shard else self.urls

    def _this_rank(self, samples):
        index = {url: i for i, url in enumerate(self.urls)}
        current, j = None, 0
        for sample in samples:
            url = sample.get("__url__")
            if url != current:
                current, j = url, 0
            if (index.get(url, 0) + j) % self.world_size == self.rank:
                yield sample
            j += 1

    def _batches(self, samples, pending: _Pending, decode_seed: int | None, skip: int = 0):
        """``skip``: samples (of the shuffled stream) that earlier batches used, passed over
        without decoding. Every batch carries ``position``, the samples used up to it."""
        fields = {name: [] for name in self.decoder.fields}
        labels, keys = [], []
        for position, sample in enumerate(samples, 1):
            if position <= skip:
                pending.good += 1  # it was read: the shards are not all unreadable
                if position == skip:
                    pending.take()  # already counted by the batches before the resume
                continue
            rng = None if decode_seed is None else random.Random(decode_seed + position)
            out = self.decoder(sample, rng)
            if isinstance(out, str):
                pending.counts[out] += 1
                # No good sample for a whole batch's worth of skips: report them anyway.
                if sum(pending.counts[r] for r in SKIP_REASONS) >= self.batch_size and not keys:
                    empty = {n: [] for n in fields}
                    yield self._collate(empty, [], [], pending.take(), position)
                continue
            pending.good += 1
            for name, value in out.items():
                fields[name].append(value)
            labels.append(parse_label(sample))
            keys.append(sample["__key__"])
            if len(keys) == self.batch_size:
                yield self._collate(fields, labels, keys, pending.take(), position)
                fields = {name: [] for name in self.decoder.fields}
                labels, keys = [], []
        # Finite (validation) streams: the last partial batch, and any skips after it.
        if keys or pending.counts:
            yield self._collate(fields, labels, keys, pending.take(), -1)

    def _collate(self, fields, labels, keys, skipped, position: int) -> dict:
        return {
            **self.decoder.collate(fields),
            "label": torch.tensor(labels, dtype=torch.long),
            "key": keys,
            "skipped": skipped,
            "position": position,
        }


def to_unit_range(image: torch.Tensor) -> torch.Tensor:
    """(B, R, R, 3) uint8 [0, 255] -> (B, 3, R, R) float32 [-1, 1], in one strided pass."""
    b, h, w, c = image.shape
    out = torch.empty(b, c, h, w)
    # Divide, then subtract: exact at both ends (a fused multiply-add overshoots 1 by an ulp).
    return torch.div(image.permute(0, 3, 1, 2), 127.5, out=out).sub_(1.0)


class SkipStats:
    """Cumulative counts in the main process: good samples and skips by reason."""

    def __init__(self, name: str):
        self.name = name
        self.reset()

    def reset(self):
        self.good = 0
        self.skipped: Counter[str] = Counter()

    @property
    def bad(self) -> int:
        return sum(self.skipped[r] for r in SKIP_REASONS)

    @property
    def bad_fraction(self) -> float:
        seen = self.good + self.bad
        return self.bad / seen if seen else 0.0

    def as_dict(self) -> dict[str, int]:
        return {r: self.skipped[r] for r in (*SKIP_REASONS, SHARD_REASON)}


class StreamLoader(wds.WebLoader):
    """WebLoader over a ``ShardStream`` (batching happens in the workers).

    The epoch that seeds a pass is read when the pass actually starts (Lightning creates
    iterators it never consumes, and prefetches before announcing the epoch): from
    ``epoch_source`` (the DataModule passes the Trainer's ``current_epoch``, right after a resume
    too), else the number of passes started so far.

    Exact resume (``state_dict`` / ``load_state_dict``, which Lightning calls for a training
    loader that has them, saving the result in the checkpoint's loop state): each worker's stream
    is a function of (seed, rank, worker, epoch), so where training stands is the epoch, the
    batches used in it, which worker's batch comes next, and how many samples of its stream
    each worker has used (every batch carries that count). ``consumed_source`` tells how many
    batches of this pass training has used (Lightning fetches one ahead). The first pass after
    ``load_state_dict`` continues that epoch: its workers pass over their used samples without
    decoding them and it ends after the epoch's remaining batches. The skip counts are restored
    too. Under DDP every rank's position is gathered into the state (all ranks save together).
    """

    def __init__(
        self,
        stream: ShardStream,
        stats: SkipStats,
        num_workers: int,
        max_bad_fraction: float,
        min_samples: int,
        batches_per_epoch: int | None = None,
        epoch_source: Callable[[], int | None] | None = None,
        consumed_source: Callable[[], int | None] | None = None,
    ):
        super().__init__(
            stream,
            batch_size=None,
            num_workers=num_workers,
            # Images are not pinned: the uint8 -> float conversion in ``finish`` would leave the
            # pinned copy unused.
            pin_memory=stream.decoder.pin_memory,
            persistent_workers=False,
            # DataLoader draws a seed for its workers at every pass: from its own generator,
            # so that starting a pass (or resuming) leaves torch's global RNG alone. The
            # streams seed themselves.
            generator=torch.Generator(),
        )
        # ``dataset`` tells Lightning this is an iterable-style loader (no sampler to replace).
        self.stream = self.dataset = stream
        self.stats = stats
        self.max_bad_fraction, self.min_samples = max_bad_fraction, min_samples
        self.batches_per_epoch = batches_per_epoch
        self.epoch_source, self.consumed_source = epoch_source, consumed_source
        self.num_workers = num_workers
        self._passes = 0
        self._resume: dict | None = None  # loaded, applied by the next pass
        self._pass: dict | None = None  # where the current pass stands
        self._snapshots: dict[int, dict] = {}  # batches used in this pass -> position after them
        self.append(self._account)

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a read-once validation stream has no length")
        return self.batches_per_epoch

    def __iter__(self):
        # A generator: nothing below runs until the first batch is requested.
        epoch = self.epoch_source() if self.epoch_source is not None else None
        epoch = self._passes if epoch is None else epoch
        self._passes += 1
        if not self.stream.train:
            self.stats.reset()  # one validation pass = one count
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] != epoch:
            resume = None  # the checkpoint was taken at the end of its epoch: start the next
        workers = max(self.num_workers, 1)
        self.stream.epoch = epoch
        self.stream.resume = resume
        self._pass = {
            "epoch": epoch,
            "batches": resume["batches"] if resume else 0,
            "rotation": resume["rotation"] if resume else 0,
            "positions": list(resume["positions"]) if resume else [0] * workers,
        }
        self._snapshots = {self._pass["batches"]: self._snapshot()}
        batches = super().__iter__()
        if self.batches_per_epoch is not None:
            # Counted here, after count-only batches are gone: every rank then yields exactly
            # this many batches per epoch, whatever its workers' shard counts.
            batches = islice(batches, max(self.batches_per_epoch - self._pass["batches"], 0))
        yield from batches

    def _account(self, batches):
        workers = max(self.num_workers, 1)
        for batch in batches:
            state = self._pass
            # Workers deliver round-robin: this batch came from the stream ``rotation`` names.
            state["positions"][state["rotation"]] = batch.pop("position")
            state["rotation"] = (state["rotation"] + 1) % workers
            for reason, n in batch.pop("skipped").items():
                self.stats.skipped[reason] += n
            self.stats.good += len(batch["key"])
            self._check()
            if batch["key"]:
                state["batches"] += 1
                self._snapshots[state["batches"]] = self._snapshot()
                self._snapshots.pop(state["batches"] - 4, None)  # training is never that far
                yield self.stream.decoder.finish(batch)

    def _snapshot(self) -> dict:
        return {
            **copy.deepcopy(self._pass),
            "good": self.stats.good,
            "skipped": dict(self.stats.skipped),
        }

    # -- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where this rank's (and, under DDP, every rank's) stream stands after the batches
        training has used; see the class docstring."""
        mine = None
        if self._pass is not None:
            used = self.consumed_source() if self.consumed_source is not None else None
            used = max(self._snapshots) if used is None else used
            mine = self._snapshots.get(used)
            if mine is None and used != 0 and self._snapshots:
                # After a resume the loop's count includes the batches before it; the newest
                # position is the one the loop has consumed up to (the fetcher reads one ahead
                # at most, and that batch is replayed rather than lost).
                warnings.warn(
                    f"training has used {used} batches of this pass; saving the stream position "
                    f"after batch {max(self._snapshots)} of this process",
                    stacklevel=2,
                )
                mine = self._snapshots[max(self._snapshots)]
        stream = self.stream
        return {
            "format": "vistok-stream-v1",
            "seed": stream.seed,
            "world_size": stream.world_size,
            "num_workers": self.num_workers,
            "batches_per_epoch": self.batches_per_epoch,
            "ranks": gather_ranks(mine, stream.rank, stream.world_size),
        }

    def load_state_dict(self, state: dict) -> None:
        stream = self.stream
        here = {
            "seed": stream.seed,
            "world_size": stream.world_size,
            "num_workers": self.num_workers,
            "batches_per_epoch": self.batches_per_epoch,
        }
        changed = [f"{k} {state.get(k)} -> {v}" for k, v in here.items() if state.get(k) != v]
        if state.get("format") != "vistok-stream-v1" or changed:
            warnings.warn(
                f"the training stream cannot continue exactly where the checkpoint left it "
                f"({', '.join(changed) or 'unknown stream state'}): it starts a fresh pass of "
                "the current epoch",
                stacklevel=2,
            )
            return
        mine = state["ranks"][stream.rank]
        if mine is None:
            return
        self._resume = mine
        self.stats.good = mine["good"]
        self.stats.skipped = Counter(mine["skipped"])

    def _check(self):
        stats = self.stats
        if stats.good + stats.bad < self.min_samples or stats.bad_fraction <= self.max_bad_fraction:
            return
        counts = ", ".join(f"{r}={n}" for r, n in stats.as_dict().items() if n)
        raise DataQualityError(
            f"{stats.bad_fraction:.1%} of {stats.name} samples were skipped ({stats.bad} of "
            f"{stats.good + stats.bad}: {counts}), above max_bad_fraction={self.max_bad_fraction}. "
            "Fix or re-shard the data, or raise the limit (--data.max_bad_fraction)."
        )
