"""Data pipeline: shard writing, bad-sample handling, skip accounting, distributed splits."""

from __future__ import annotations

import io
import itertools
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vistok.data.datamodule import ImageDataModule
from vistok.data.image_decode import ImageDecoder
from vistok.data.make_shards import write_shards
from vistok.data.stream import DataQualityError, partition_shards, to_unit_range

RES = 32


def epoch(loader, limit: int = 500) -> list[dict]:
    """One pass of a loader, bounded so that a broken epoch length fails instead of hanging."""
    return list(itertools.islice(loader, limit))


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries almost no pixel data (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def mode_images() -> dict[str, tuple[str, bytes]]:
    """Every colour mode the decoder must turn into RGB: name -> (suffix, bytes)."""
    p_trans = Image.new("P", (40, 32), 0)
    p_trans.putpalette([255, 0, 0] * 256)
    p_trans.info["transparency"] = 0
    grey16 = np.tile(np.array([0, 32768, 65535], np.uint16), (32, 14))[:, :40]
    return {
        "cmyk": ("jpg", encode(Image.new("CMYK", (40, 32), (0, 0, 0, 0)), "JPEG")),
        "l": ("png", encode(Image.new("L", (40, 32), 0))),
        "la": ("png", encode(Image.new("LA", (40, 32), (10, 0)))),
        "p": ("png", encode(noise(40, 32, 1).convert("P"))),
        "ptrans": ("png", encode(p_trans)),
        "rgba": ("png", encode(Image.new("RGBA", (40, 32), (10, 200, 30, 0)))),
        "i16": ("png", encode(Image.fromarray(grey16))),
        "i32": ("tif", encode(Image.fromarray(grey16.astype(np.int32)), "TIFF")),
    }


BAD_COUNTS = {"corrupt": 2, "empty": 1, "missing_image": 1, "too_small": 1, "too_large": 2}


def bad_shard_samples(tag: str) -> tuple[list[dict], set[str]]:
    """Samples of every bad kind between good ones (the last one good); returns (samples, good)."""
    jpeg = encode(noise(48, 40, 0), "JPEG", quality=90)
    bad = [
        ("truncated", {"jpg": jpeg[: len(jpeg) // 2]}),
        ("garbage", {"jpg": b"this is not an image" * 20}),
        ("zero", {"png": b""}),
        ("noimage", {"txt": "caption only"}),
        ("small", {"png": encode(noise(16, 16, 2))}),
        ("bomb", {"png": encode(noise(300, 300, 3))}),
        ("bombheader", {"png": png_header_only(9000, 9000)}),
    ]
    good = [(name, {suffix: data}) for name, (suffix, data) in mode_images().items()]
    good += [(f"good{i}", {"jpg": encode(noise(48 + i, 40, 10 + i), "JPEG")}) for i in range(4)]
    samples, good_keys = [], set()
    for i, (name, files) in enumerate(good):
        key = f"{tag}_{name}"
        samples.append({"__key__": key, **files, "cls": i})
        good_keys.add(key)
        if i < len(bad):
            samples.append({"__key__": f"{tag}_{bad[i][0]}", **bad[i][1], "cls": 0})
    assert samples[-1]["__key__"] in good_keys and len(bad) == sum(BAD_COUNTS.values())
    return samples, good_keys


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    """Two shards with identical structure (so two workers make identical progress)."""
    out = tmp_path_factory.mktemp("bad")
    paths, good = [], set()
    for tag in ("a", "b"):
        samples, keys = bad_shard_samples(tag)
        paths += write_shards(samples, out, f"mix{tag}", shard_size=1000)
        good |= keys
    return "::".join(paths), good


def bad_module(spec: str, **kw) -> ImageDataModule:
    args = dict(
        train_shards=spec,
        val_shards=spec,
        resolution=RES,
        batch_size=4,
        num_workers=0,
        small_images="skip",
        max_pixels=50_000,
        max_bad_fraction=1.0,
        shuffle_buffer=0,
    )
    return ImageDataModule(**{**args, **kw})


def check_batch(batch: dict):
    assert set(batch) == {"image", "label", "key"}
    image, label = batch["image"], batch["label"]
    assert image.dtype == torch.float32 and image.shape[1:] == (3, RES, RES)
    assert image.shape[0] == label.shape[0] == len(batch["key"]) > 0
    assert label.dtype == torch.long
    assert image.min() >= -1.0 and image.max() <= 1.0


# -- decoding ----------------------------------------------------------------------------------


def test_modes_convert_to_expected_rgb():
    dec = ImageDecoder(resolution=RES, random_crop=False, hflip=False)
    images = mode_images()
    out = {name: dec({suffix: data}, None) for name, (suffix, data) in images.items()}
    for name, arr in out.items():
        assert isinstance(arr, np.ndarray), (name, arr)
        assert arr.shape == (RES, RES, 3) and arr.dtype == np.uint8, name
    # alpha is composited on white; CMYK zero ink is white; black L stays black
    for name in ("la", "ptrans", "rgba", "cmyk"):
        assert (out[name] == 255).all(), name
    assert (out["l"] == 0).all()
    # 16-bit and 32-bit grey are scaled, not clipped (height 32 = RES: a crop, no resampling)
    for name in ("i16", "i32"):
        assert set(np.unique(out[name]).tolist()) == {0, 128, 255}, name


def test_bad_kinds_and_small_images():
    dec = ImageDecoder(resolution=RES, small_images="skip", max_pixels=50_000)
    jpeg = encode(noise(64, 48, 0), "JPEG")
    assert dec({"jpg": jpeg[:200]}, None) == "corrupt"
    assert dec({"png": b""}, None) == "empty"
    assert dec({"cls": b"3"}, None) == "missing_image"
    assert dec({"png": encode(noise(16, 40, 0))}, None) == "too_small"
    assert dec({"png": encode(noise(300, 300, 0))}, None) == "too_large"
    # Refused from the header: decoding this one would fail as corrupt.
    assert dec({"png": png_header_only(9000, 9000)}, None) == "too_large"
    # Above PIL's own hard limit too, still counted as too_large.
    assert ImageDecoder(resolution=RES)({"png": png_header_only(20000, 20000)}, None) == "too_large"
    up = ImageDecoder(resolution=RES, small_images="upscale")(
        {"png": encode(noise(16, 40, 0))}, None
    )
    assert isinstance(up, np.ndarray) and up.shape == (RES, RES, 3)


def test_to_unit_range_exact_and_channels_first():
    x = torch.arange(256, dtype=torch.uint8).repeat(3).view(1, 16, 16, 3)  # (B, H, W, C)
    x[..., 0], x[..., 1] = 0, 255
    y = to_unit_range(x)
    assert y.shape == (1, 3, 16, 16) and y.is_contiguous() and y.dtype == torch.float32
    assert (y[:, 0] == -1).all() and (y[:, 1] == 1).all()  # endpoints exact
    torch.testing.assert_close(y, x.permute(0, 3, 1, 2).float() / 127.5 - 1)


# -- bad samples through the streams -----------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_validation_counts_exact(bad_shards, tmp_path, workers):
    spec, good = bad_shards
    # A stream that ends in bad samples: their counts must still arrive.
    tail = write_shards([{"__key__": "t0", "jpg": b""}, {"__key__": "t1", "png": b"x"}], tmp_path)
    dm = bad_module(f"{spec}::{tail[0]}", num_workers=workers)
    for _ in range(2):  # counts are per validation pass
        keys = []
        for batch in dm.val_dataloader():
            check_batch(batch)
            keys += batch["key"]
        assert sorted(keys) == sorted(good)  # every good sample exactly once
        expected = {r: 2 * n for r, n in BAD_COUNTS.items()}
        expected["empty"] += 1
        expected["corrupt"] += 1
        assert dm.val_stats.as_dict() == {**expected, "unreadable_shard": 0}
        assert dm.val_stats.good == len(good)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_counts_exact_over_one_pass(bad_shards, workers):
    spec, good = bad_shards
    # batch 1 and no shuffle: one pass over both shards is exactly len(good) batches
    dm = bad_module(spec, num_workers=workers, batch_size=1, batches_per_epoch=len(good))
    keys = []
    for batch in epoch(dm.train_dataloader()):
        check_batch(batch)
        keys += batch["key"]
    assert sorted(keys) == sorted(good)
    assert dm.train_stats.as_dict() == {
        **{r: 2 * n for r, n in BAD_COUNTS.items()},
        "unreadable_shard": 0,
    }


@pytest.mark.parametrize("split", ["train", "val"])
def test_bad_fraction_error(bad_shards, split):
    spec, _ = bad_shards
    dm = bad_module(spec, max_bad_fraction=0.05, bad_fraction_min_samples=8, batches_per_epoch=20)
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    with pytest.raises(DataQualityError) as info:
        epoch(loader)
    msg = str(info.value)
    assert "max_bad_fraction=0.05" in msg and "--data.max_bad_fraction" in msg
    assert "corrupt=" in msg and "too_large=" in msg


def test_bad_fraction_tolerated_below_limit(bad_shards):
    spec, good = bad_shards
    dm = bad_module(spec, max_bad_fraction=0.5, bad_fraction_min_samples=1)
    assert sum(len(b["key"]) for b in dm.val_dataloader()) == len(good)


def test_unreadable_shards_warn_and_continue(tmp_path, bad_shards):
    spec, good = bad_shards
    not_tar = tmp_path / "nottar-000000.tar"
    not_tar.write_bytes(b"plain text, not a tar archive" * 50)
    missing = tmp_path / "missing-000001.tar"
    full = f"{missing}::{spec}::{not_tar}"
    dm = bad_module(full)
    with pytest.warns(UserWarning) as record:
        keys = [k for b in dm.val_dataloader() for k in b["key"]]
    messages = " ".join(str(w.message) for w in record)
    assert str(missing) in messages and str(not_tar) in messages
    assert sorted(keys) == sorted(good)
    assert dm.val_stats.skipped["unreadable_shard"] == 2
    # training goes on too, and counts reach the main process from worker processes
    dm = bad_module(full, num_workers=2, batches_per_epoch=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(epoch(dm.train_dataloader())) == 12
    assert dm.train_stats.skipped["unreadable_shard"] >= 2


def test_all_training_shards_unreadable_raises(tmp_path):
    dm = bad_module(str(tmp_path / "nothing-{0..2}.tar"), batches_per_epoch=2)
    with pytest.raises(RuntimeError, match="none of these training shards"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            next(iter(dm.train_dataloader()))


# -- distributed splits ------------------------------------------------------------------------


def grid_shards(out, sizes: list[int], res: int = 24) -> str:
    """Shards of tiny good JPEGs; key s{shard}_{index}."""
    paths = []
    for s, n in enumerate(sizes):
        samples = [
            {"__key__": f"s{s}_{j}", "jpg": encode(noise(res, res, 100 * s + j), "JPEG"), "cls": s}
            for j in range(n)
        ]
        paths += write_shards(samples, out, f"grid{s}", shard_size=1000)
    return "::".join(paths)


def test_partition_shards_properties():
    for n in range(1, 20):
        urls = [f"u{i}" for i in range(n)]
        for world in (1, 2, 3, 4):
            for workers in (1, 2, 3):
                parts = {
                    (r, w): partition_shards(urls, r, world, w, workers)
                    for r in range(world)
                    for w in range(workers)
                }
                assert all(parts.values())  # nobody is left without shards
                flat = [u for p in parts.values() for u in p]
                if n >= world * workers:
                    assert sorted(flat) == sorted(urls)  # disjoint and complete
                elif n >= world:
                    for r in range(world):
                        assert all(parts[(r, w)] == parts[(r, 0)] for w in range(workers))
                    assert sorted(u for r in range(world) for u in parts[(r, 0)]) == sorted(urls)


def test_training_ranks_and_workers_read_disjoint_shards(tmp_path):
    spec = grid_shards(tmp_path, [5] * 8)
    seen = {}
    for rank in range(2):
        dm = ImageDataModule(
            train_shards=spec,
            resolution=16,
            batch_size=2,
            num_workers=2,
            batches_per_epoch=10,
            shuffle_buffer=4,
        )
        batches = epoch(dm.train_dataloader(rank=rank, world_size=2))
        assert len(batches) == 10
        # IterableDataset workers deliver batches round-robin: batch i came from worker i % 2
        for i, batch in enumerate(batches):
            shards = {k.split("_")[0] for k in batch["key"]}
            seen.setdefault((rank, i % 2), set()).update(shards)
    assert len(seen) == 4
    groups = list(seen.values())
    for i in range(4):
        for j in range(i + 1, 4):
            assert not groups[i] & groups[j], seen


@pytest.mark.parametrize("shuffle", [0, 1000])
def test_training_same_batch_count_on_uneven_ranks(tmp_path, shuffle):
    spec = grid_shards(tmp_path, [9, 2, 5])  # rank 0 gets 14 samples, rank 1 gets 2
    for rank, shards in ((0, {"s0", "s2"}), (1, {"s1"})):
        for workers in (0, 2):
            dm = ImageDataModule(
                train_shards=spec,
                resolution=16,
                batch_size=3,
                num_workers=workers,
                batches_per_epoch=7,
                shuffle_buffer=shuffle,
            )
            loader = dm.train_dataloader(rank=rank, world_size=2)
            for _ in range(2):  # two epochs
                batches = epoch(loader)
                assert [len(b["key"]) for b in batches] == [3] * 7
                keys = {k for b in batches for k in b["key"]}
                assert {k.split("_")[0] for k in keys} == shards
                if shuffle == 0 and workers == 0:  # 21 draws cycle through all 14 (or 2)
                    assert len(keys) == (14 if rank == 0 else 2)


def test_training_seeded_by_seed_rank_epoch(tmp_path):
    spec = grid_shards(tmp_path, [6] * 4)

    def first_epochs(seed, rank):
        dm = ImageDataModule(
            train_shards=spec,
            resolution=16,
            batch_size=4,
            num_workers=0,
            batches_per_epoch=3,
            shuffle_buffer=8,
            seed=seed,
        )
        loader = dm.train_dataloader(rank=rank, world_size=2)
        return [[k for b in epoch(loader) for k in b["key"]] for _ in range(2)]

    a, b = first_epochs(0, 0), first_epochs(0, 0)
    assert a == b  # reproducible
    assert a[0] != a[1]  # a new epoch reseeds
    assert first_epochs(1, 0)[0] != a[0]
    assert set(first_epochs(0, 1)[0]).isdisjoint(a[0])  # other rank, other shards


@pytest.mark.parametrize("workers", [0, 2])
def test_validation_exactly_once_across_ranks(tmp_path, workers):
    spec = grid_shards(tmp_path, [7, 7, 5])  # 19 samples: odd, not divisible by 2
    per_rank = []
    for rank in range(2):
        dm = ImageDataModule(val_shards=spec, resolution=16, val_batch_size=4, num_workers=workers)
        per_rank.append([k for b in dm.val_dataloader(rank=rank, world_size=2) for k in b["key"]])
    everything = per_rank[0] + per_rank[1]
    assert len(everything) == 19 and len(set(everything)) == 19
    # Three shards for two ranks: whole shards per rank, loads differ by at most one shard.
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 7


def test_pipe_urls_and_brace_patterns(tmp_path):
    spec = grid_shards(tmp_path, [3, 4])
    first, second = spec.split("::")
    pattern = str(tmp_path / "grid{0..1}-000000.tar")
    for shards in (f"pipe:cat {first}::pipe:cat {second}", pattern):
        dm = ImageDataModule(val_shards=shards, resolution=16, num_workers=0)
        keys = sorted(k for b in dm.val_dataloader() for k in b["key"])
        assert keys == sorted([f"s0_{j}" for j in range(3)] + [f"s1_{j}" for j in range(4)])
