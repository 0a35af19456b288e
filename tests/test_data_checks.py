"""Data option checks (every size and count option named in its error) and broken shards counted
once each, truncated ones included."""

from __future__ import annotations

import warnings

import pytest
from test_data import grid_shards

from vistok.data.datamodule import ImageDataModule


@pytest.mark.parametrize(
    "option, value",
    [
        ("val_batch_size", -4),
        ("batch_size", 0),
        ("num_workers", -1),
        ("shuffle_buffer", -2),
        ("batches_per_epoch", 0),
        ("bad_fraction_min_samples", -1),
        ("resolution", 0),
        ("max_pixels", 0),
        ("batch_size", 2.5),
    ],
)
def test_every_size_option_is_checked_by_name(option, value):
    with pytest.raises(ValueError, match=f"--data.{option} must be an integer >= "):
        ImageDataModule(**{option: value})
    with pytest.raises(ValueError, match="--data.max_bad_fraction"):
        ImageDataModule(max_bad_fraction=1.5)


def read_all(spec: str, workers: int = 0) -> tuple[list[str], ImageDataModule, list[str]]:
    dm = ImageDataModule(val_shards=spec, resolution=16, val_batch_size=4, num_workers=workers)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        keys = [k for b in dm.val_dataloader() for k in b["key"]]
    messages = [str(w.message) for w in record if "skipping unreadable" in str(w.message)]
    return keys, dm, messages


@pytest.mark.parametrize("pipe", [False, True])
def test_a_truncated_shard_is_counted_once_and_says_what_was_lost(tmp_path, pipe):
    whole = grid_shards(tmp_path, [40])
    data = open(whole, "rb").read()
    keys, _, messages = read_all(whole)
    assert len(keys) == 40 and not messages  # a complete shard is never reported
    for fraction in (0.3, 0.5, 0.7, 0.71):
        cut = tmp_path / f"cut{fraction}.tar"
        cut.write_bytes(data[: int(len(data) * fraction)])
        spec = f"pipe:cat {cut}" if pipe else str(cut)
        keys, dm, messages = read_all(spec)
        assert 0 < len(keys) < 40
        assert dm.val_stats.skipped["unreadable_shard"] == 1, (fraction, messages)
        assert len(messages) == 1 and str(cut) in messages[0]
        if "between two members" in messages[0]:
            assert "how many is unknown" in messages[0]


def test_unreadable_shards_are_counted_once_each(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar" * 100)
    good = grid_shards(tmp_path, [3])
    spec = f"{tmp_path / 'missing.tar'}::{bad}::{good}::pipe:cat {tmp_path / 'gone.tar'}"
    keys, dm, messages = read_all(spec)
    assert len(keys) == 3
    assert dm.val_stats.skipped["unreadable_shard"] == 3 and len(messages) == 3
