"""Data streams: validation split by shard across ranks, and exact resume of a training stream
from its ``state_dict`` (mid-epoch, with workers, with bad samples), passing over the samples
already used without decoding them."""

from __future__ import annotations

import itertools
import shlex
import warnings

import pytest
import torch
from test_data import RES, bad_shard_samples, grid_shards

from vistok.data.datamodule import ImageDataModule
from vistok.data.image_decode import ImageDecoder
from vistok.data.make_shards import write_shards


def logged_shards(spec: str, log) -> str:
    """The same shards as ``pipe:`` URLs that append their name to ``log`` when opened."""
    urls = spec.split("::")
    return "::".join(f"pipe:echo {u} >> {log}; cat {shlex.quote(u)}" for u in urls)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("sizes", [[7, 7, 5], [7], [4, 6, 3, 5, 2]])
def test_validation_covers_each_sample_once_and_ranks_open_only_their_shards(
    tmp_path, workers, sizes
):
    spec = grid_shards(tmp_path, sizes)
    world = 2
    per_rank, opened = [], []
    for rank in range(world):
        log = tmp_path / f"opened{rank}.txt"
        log.touch()
        dm = ImageDataModule(
            val_shards=logged_shards(spec, log),
            resolution=16,
            val_batch_size=2,
            num_workers=workers,
        )
        per_rank.append(
            [k for b in dm.val_dataloader(rank=rank, world_size=world) for k in b["key"]]
        )
        opened.append(log.read_text().split())
    everything = per_rank[0] + per_rank[1]
    assert sorted(everything) == sorted(f"s{s}_{j}" for s, n in enumerate(sizes) for j in range(n))
    urls = spec.split("::")
    if len(urls) >= world:  # whole shards: each rank opens exactly its share, once
        for rank in range(world):
            assert sorted(opened[rank]) == sorted(urls[rank::world])
            assert {k.split("_")[0] for k in per_rank[rank]} == {
                f"s{s}" for s in range(rank, len(urls), world)
            }
    else:  # fewer shards than ranks: everybody reads everything, samples split
        assert all(sorted(o) == sorted(urls) for o in opened)
        assert abs(len(per_rank[0]) - len(per_rank[1])) <= len(urls)


class CountingDecoder(ImageDecoder):
    calls = 0

    def __call__(self, sample, rng):
        type(self).calls += 1
        return super().__call__(sample, rng)


def resumable(spec: str, workers: int, **kw) -> ImageDataModule:
    dm = ImageDataModule(
        train_shards=spec,
        resolution=RES,
        batch_size=3,
        num_workers=workers,
        batches_per_epoch=5,
        shuffle_buffer=6,
        small_images="skip",
        max_pixels=50_000,
        max_bad_fraction=1.0,
        seed=3,
        **kw,
    )
    dm.train_decoder = CountingDecoder(**vars(dm.train_decoder))
    return dm


def batches(loader, n: int) -> list[dict]:
    return list(itertools.islice(loader, n))


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    """Four shards of good and bad samples (every kind of skip)."""
    out = tmp_path_factory.mktemp("mixed")
    paths = []
    for tag in "abcd":
        samples, _ = bad_shard_samples(tag)
        paths += write_shards(samples, out, f"mix{tag}", shard_size=1000)
    return "::".join(paths)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("used", [1, 2, 4])
def test_training_stream_resumes_exactly_where_its_state_was_taken(mixed_shards, workers, used):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight_dm = resumable(mixed_shards, workers)
        loader = straight_dm.train_dataloader(rank=1, world_size=2)
        CountingDecoder.calls = 0
        straight = batches(loader, 5) + batches(loader, 5)  # two epochs
        straight_calls = CountingDecoder.calls
        assert [len(b["key"]) for b in straight] == [3] * 10

        first_dm = resumable(mixed_shards, workers)
        loader = first_dm.train_dataloader(rank=1, world_size=2)
        CountingDecoder.calls = 0
        first = batches(loader, used)
        state = loader.state_dict()
        first_calls = CountingDecoder.calls
        state = torch.serialization.pickle.loads(torch.serialization.pickle.dumps(state))

        second_dm = resumable(mixed_shards, workers)
        loader = second_dm.train_dataloader(rank=1, world_size=2)
        loader.load_state_dict(state)
        CountingDecoder.calls = 0
        rest = batches(loader, 10) + batches(loader, 10)  # the rest of epoch 0, then epoch 1
        rest_calls = CountingDecoder.calls

    resumed = first + rest
    assert len(resumed) == 10
    for a, b in zip(straight, resumed):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    # Skip counts continue from the checkpoint's.
    assert second_dm.train_stats.as_dict() == straight_dm.train_stats.as_dict()
    assert second_dm.train_stats.good == straight_dm.train_stats.good
    if workers == 0:  # one process: every decode is seen; none is repeated on resume
        assert first_calls + rest_calls == straight_calls


def test_state_of_another_stream_layout_is_refused_with_a_warning(mixed_shards):
    dm = resumable(mixed_shards, 0)
    loader = dm.train_dataloader()
    batches(loader, 2)
    state = loader.state_dict()
    other = resumable(mixed_shards, 2).train_dataloader()
    with pytest.warns(UserWarning, match="num_workers 0 -> 2"):
        other.load_state_dict(state)
    fresh = resumable(mixed_shards, 2).train_dataloader()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [b["key"] for b in batches(other, 5)] == [b["key"] for b in batches(fresh, 5)]
