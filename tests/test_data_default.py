"""The embedded default dataset: deterministic, safe to build from two processes, right counts."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from vistok.data import default_dataset
from vistok.data.datamodule import ImageDataModule


def _build_in(cache: str) -> str:
    os.environ["VISTOK_CACHE"] = cache
    return str(default_dataset.ensure_built())


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Two processes build into the same cache at once; the folder they agree on."""
    cache = tmp_path_factory.mktemp("cache")
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        folders = pool.map(_build_in, [str(cache)] * 2)
    assert folders[0] == folders[1]
    # one finished folder, no temporary leftovers
    assert [p.name for p in cache.iterdir()] == [f"default_dataset-{default_dataset.VERSION}"]
    return Path(folders[0])


def test_rebuild_is_byte_identical(built, tmp_path, monkeypatch):
    monkeypatch.setenv("VISTOK_CACHE", str(tmp_path))
    again = default_dataset.ensure_built()
    assert again != built and _digests(again) == _digests(built)


def test_counts_labels_and_pattern(built, monkeypatch):
    monkeypatch.setenv("VISTOK_CACHE", str(built.parent))
    n_classes = default_dataset.num_classes()
    for split in ("train", "val"):
        urls = wds.shardlists.expand_urls(default_dataset.default_shards(split))
        assert len(urls) >= 4 and all(Path(u).parent == built for u in urls)
        labels, keys = Counter(), set()
        for url in urls:
            with tarfile.open(url) as tar:
                names = tar.getnames()
                for name in names:
                    if name.endswith(".cls"):
                        labels[int(tar.extractfile(name).read())] += 1
                keys |= {n.split(".")[0] for n in names}
        total = default_dataset.num_samples(split)
        assert len(keys) == sum(labels.values()) == total
        assert sorted(labels) == list(range(n_classes))
        assert max(labels.values()) - min(labels.values()) <= 1  # balanced
    assert (built / "classes.txt").read_text().split() == list(default_dataset.SOURCES)
    with pytest.raises(ValueError):
        default_dataset.default_shards("test")


def test_datamodule_falls_back_to_default(built, monkeypatch):
    monkeypatch.setenv("VISTOK_CACHE", str(built.parent))
    dm = ImageDataModule(resolution=64, val_batch_size=64, num_workers=0)
    batches = list(dm.val_dataloader())
    assert sum(len(b["key"]) for b in batches) == default_dataset.num_samples("val")
    assert all(b["image"].shape[1:] == (3, 64, 64) for b in batches)
    assert dm.val_stats.bad == 0
    labels = {int(x) for b in batches for x in b["label"]}
    assert labels == set(range(default_dataset.num_classes()))
