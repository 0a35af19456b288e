"""make_shards: folder -> WebDataset shards, read back by the DataModule."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import numpy as np
from PIL import Image

from vistok.data import make_shards
from vistok.data.datamodule import ImageDataModule
from vistok.data.make_shards import shard_pattern

RES = 32


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def noise(w: int, h: int, seed: int) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def test_make_shards_round_trip(tmp_path, capsys):
    src = tmp_path / "src"
    expected = {}
    for c, cls in enumerate(["cat", "dog", "eel"]):
        for j in range(3 + c):
            sub = src / cls / ("nested" if j == 0 else "")
            sub.mkdir(parents=True, exist_ok=True)
            fmt, ext = [("JPEG", "JPEG"), ("PNG", "png"), ("WEBP", "webp")][j % 3]
            data = encode(noise(20 + j, 30, 10 * c + j), fmt)
            (sub / f"img.{j}.{ext}").write_bytes(data)
            expected[data] = c
    (src / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (src / "eel" / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    paths = make_shards.main([str(src), str(out), "--classes", "--shard-size", "4"])
    printed = capsys.readouterr().out
    assert len(paths) == 3 and "broken.jpg" in printed and "1 unreadable" in printed
    assert printed.strip().splitlines()[-1] == shard_pattern(paths)
    assert (out / "classes.txt").read_text().split() == ["cat", "dog", "eel"]

    got, keys = {}, []
    for path in paths:
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        stems = Counter(name.split(".", 1)[0] for name in members)
        for stem in stems:
            image = [
                (n, d)
                for n, d in members.items()
                if n.startswith(stem + ".") and not n.endswith(".cls")
            ]
            assert len(image) == 1
            name, data = image[0]
            assert name.rsplit(".", 1)[1] == Image.open(io.BytesIO(data)).format.lower().replace(
                "jpeg", "jpg"
            )
            got[data] = int(members[f"{stem}.cls"])
            keys.append(stem)
    assert got == expected  # every good image once, bytes untouched, right label
    assert len(keys) == len(set(keys)) == len(expected)
    # stable: the same folder gives the same bytes
    again = make_shards.main([str(src), str(tmp_path / "again"), "--classes", "--shard-size", "4"])
    assert [open(p, "rb").read() for p in again] == [open(p, "rb").read() for p in paths]


def test_make_shards_readable_by_datamodule(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    for j in range(5):
        noise(40, 30 + j, j).save(src / f"{j}.png")
    paths = make_shards.main([str(src), str(tmp_path / "o"), "--prefix", "val"])
    dm = ImageDataModule(val_shards=shard_pattern(paths), resolution=RES, num_workers=0)
    batches = list(dm.val_dataloader())
    assert sum(len(b["key"]) for b in batches) == 5
    assert all((b["label"] == -1).all() for b in batches)  # unlabelled
