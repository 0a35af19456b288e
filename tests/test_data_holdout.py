"""make_shards' validation hold-out (data/holdout.py) and flat folders labelled by a label file."""

from __future__ import annotations

import math
import random
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vistok.data import make_shards
from vistok.data.holdout import holdout_counts, split_holdout

SIZES = {"ant": 1, "bee": 2, "cat": 3, "dog": 5, "eel": 8}


def tiny(path: Path, seed: int) -> bytes:
    """A distinct 6x6 PNG (its bytes identify it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path.read_bytes()


def class_folders(root: Path) -> dict[bytes, int]:
    """SIZES images per class under root/<class>/; bytes -> class index."""
    expected, seed = {}, 0
    for c, (name, n) in enumerate(SIZES.items()):
        for j in range(n):
            expected[tiny(root / name / f"im{j:02d}.png", seed)] = c
            seed += 1
    return expected


def read_shards(paths) -> dict[bytes, int]:
    """Image bytes -> cls (-1 when unlabelled) over the given shards."""
    got = {}
    for path in paths:
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if not name.endswith(".cls"):
                stem = name.rsplit(".", 1)[0]
                assert data not in got
                got[data] = int(members.get(f"{stem}.cls", b"-1"))
    return got


def split_of(out: Path) -> tuple[dict[bytes, int], dict[bytes, int]]:
    return read_shards(sorted(out.glob("train-*.tar"))), read_shards(sorted(out.glob("val-*.tar")))


def test_holdout_counts_rounding_and_bounds():
    # halves round up; a class of 2+ keeps one on each side; a single image stays in training
    assert holdout_counts([1, 2, 3, 5, 8, 10, 100], fraction=0.1) == [0, 1, 1, 1, 1, 1, 10]
    assert holdout_counts([4, 5, 7], fraction=0.5) == [2, 3, 4]  # 2.5 -> 3, 3.5 -> 4
    assert holdout_counts([2, 10], fraction=0.9) == [1, 9]
    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.randint(1, 40) for _ in range(rng.randint(1, 8))]
        lo = sum(n >= 2 for n in sizes)
        hi = sum(n - 1 for n in sizes if n >= 2)
        if lo > hi or hi == 0:
            continue
        n_val = rng.randint(lo, hi)
        k = holdout_counts(sizes, count=n_val)
        assert sum(k) == n_val
        shares = [n_val * n / sum(sizes) for n in sizes]
        unclamped = all(
            (1 <= math.floor(s) and math.ceil(s) <= n - 1) if n >= 2 else s == 0
            for n, s in zip(sizes, shares)
        )
        for n, x, share in zip(sizes, k, shares):
            assert (1 <= x <= n - 1) if n >= 2 else x == 0
            if unclamped:  # largest remainder: each class gets its share rounded down or up
                assert math.floor(share) <= x <= math.ceil(share)
        frac = rng.uniform(0.01, 0.99)
        for n, x in zip(sizes, holdout_counts(sizes, fraction=frac)):
            want = min(max(math.floor(frac * n + 0.5), 1), n - 1) if n >= 2 else 0
            assert x == want


def test_holdout_counts_errors():
    with pytest.raises(ValueError, match=r"between 3 and 6"):
        holdout_counts([2, 3, 4], count=2)
    with pytest.raises(ValueError, match=r"between 3 and 6"):
        holdout_counts([2, 3, 4], count=7)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        holdout_counts([5], fraction=1.0)


def test_split_depends_on_names_not_listing_order():
    items = [(f"/d/c{c}/{j}.png", c) for c in range(4) for j in range(3 + 4 * c)]
    names = [p[3:] for p, _ in items]
    train, val = split_holdout(items, names, fraction=0.3, seed=7)
    order = list(range(len(items)))
    random.Random(1).shuffle(order)
    train2, val2 = split_holdout(
        [items[i] for i in order], [names[i] for i in order], fraction=0.3, seed=7
    )
    assert set(val2) == set(val) and set(train2) == set(train)
    assert sorted(train + val) == sorted(items) and not set(train) & set(val)
    _, other = split_holdout(items, names, fraction=0.3, seed=8)
    assert Counter(c for _, c in other) == Counter(c for _, c in val) and set(other) != set(val)


def test_cli_stratified_split_covers_every_good_image_once(tmp_path, capsys):
    src = tmp_path / "src"
    expected = class_folders(src)
    (src / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    argv = [str(src), str(out), "--classes", "--val-fraction", "0.3", "--shard-size", "3"]
    paths = make_shards.main(argv)
    printed = capsys.readouterr().out.strip().splitlines()
    train, val = split_of(out)
    assert {**train, **val} == expected and not train.keys() & val.keys()
    sizes = list(SIZES.values())
    assert Counter(val.values()) == Counter(
        {c: k for c, k in enumerate(holdout_counts(sizes, fraction=0.3)) if k}
    )
    assert Counter(val.values()) == {1: 1, 2: 1, 3: 2, 4: 2}  # ant's single image stays in train
    assert printed[-4] == "pass with --data.train_shards:"
    assert printed[-2] == "pass with --data.val_shards:"
    assert printed[-1] == make_shards.shard_pattern([p for p in paths if "/val-" in p])
    assert "1 unreadable" in "\n".join(printed)
    # same seed, same bytes; the count form holds out exactly N, stratified
    again = make_shards.main(argv[:1] + [str(tmp_path / "again")] + argv[2:])
    assert [Path(p).read_bytes() for p in again] == [Path(p).read_bytes() for p in paths]
    out_n = tmp_path / "count"
    make_shards.main([str(src), str(out_n), "--classes", "--val-count", "6", "--seed", "3"])
    train_n, val_n = split_of(out_n)
    assert len(val_n) == 6 and {**train_n, **val_n} == expected
    per_class = Counter(val_n.values())
    assert [per_class[c] for c in range(len(sizes))] == holdout_counts(sizes, count=6)


def test_cli_split_options_errors(tmp_path):
    src = tmp_path / "src"
    class_folders(src)

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "vistok.data.make_shards", str(src), str(tmp_path / "o"), *args],
            capture_output=True,
            text=True,
        )

    both = run("--val-fraction", "0.1", "--val-count", "3")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    clash = run("--val-fraction", "0.1", "--prefix", "val")
    assert clash.returncode == 2 and "give another --prefix" in clash.stderr
    small = run("--classes", "--val-count", "2")
    assert small.returncode == 2 and "between 4 and" in small.stderr
    assert not list((tmp_path / "o").glob("*.tar"))
    for path in src.rglob("*.png"):
        path.write_bytes(b"\x89PNG truncated")
    none = run("--classes", "--val-fraction", "0.2")
    assert none.returncode == 1 and "none of the 19 image files" in none.stderr
    assert not list((tmp_path / "o").glob("*.tar"))


def flat_folder(root: Path, n: int = 9) -> dict[str, bytes]:
    return {f"ILSVRC_val_{i:04d}.png": tiny(root / f"ILSVRC_val_{i:04d}.png", i) for i in range(n)}


def test_label_file_pairs_with_names_and_class_list(tmp_path, capsys):
    src = tmp_path / "val"
    files = flat_folder(src)
    (tmp_path / "classes.txt").write_text("n03\nn01\nn02\n")
    wnid = {name: ["n01", "n02", "n03"][i % 3] for i, name in enumerate(sorted(files))}
    listed = sorted(files)[:-1]  # the last image is not listed: skipped and counted
    lines = [f"{Path(n).stem},{wnid[n]} 1 2 3 4" for n in listed[::2]]  # stems, CSV, extra fields
    lines += [f"{n} {wnid[n]}" for n in listed[1::2]]  # full names, spaces
    random.Random(0).shuffle(lines)
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "out"
    argv = [str(src), str(out), "--labels", str(tmp_path / "labels.txt")]
    make_shards.main(argv + ["--class-list", str(tmp_path / "classes.txt")])
    printed = capsys.readouterr().out
    index = {"n03": 0, "n01": 1, "n02": 2}
    got = read_shards(sorted(out.glob("train-*.tar")))
    assert got == {files[n]: index[wnid[n]] for n in listed}
    assert "1 image file(s) not in" in printed and sorted(files)[-1] in printed
    assert (out / "classes.txt").read_text().split() == ["n03", "n01", "n02"]
    # without a class list the names are indexed in sorted order and the list is written
    make_shards.main([str(src), str(tmp_path / "o2"), "--labels", str(tmp_path / "labels.txt")])
    assert (tmp_path / "o2" / "classes.txt").read_text().split() == ["n01", "n02", "n03"]
    got2 = read_shards(sorted((tmp_path / "o2").glob("train-*.tar")))
    assert got2 == {files[n]: int(wnid[n][-1]) - 1 for n in listed}


def test_label_file_plain_integers_in_sorted_order_with_split(tmp_path):
    src = tmp_path / "val"
    files = flat_folder(src, 12)
    labels = [i % 3 for i in range(12)]
    (tmp_path / "gt.txt").write_text("".join(f"{x}\n" for x in labels))
    out = tmp_path / "out"
    make_shards.main(
        [str(src), str(out), "--labels", str(tmp_path / "gt.txt"), "--val-fraction", "0.25"]
    )
    train, val = split_of(out)
    assert {**train, **val} == {files[n]: x for n, x in zip(sorted(files), labels)}
    assert Counter(val.values()) == {0: 1, 1: 1, 2: 1}  # round(0.25 * 4) per class


@pytest.mark.parametrize(
    "text, message",
    [
        ("ILSVRC_val_0000.png 1\nILSVRC_val_0099.png 2\nnope.png 0\n", r"2 file\(s\) listed"),
        ("0\n1\n", r"holds 2 labels but .* holds 4 image files"),
        ("ILSVRC_val_0000.png 1\nILSVRC_val_0001.png n01\n", "mix integers and class names"),
        ("ILSVRC_val_0000.png 1\nILSVRC_val_0000 2\n", "listed more than once"),
        ("ILSVRC_val_0000.png\n", "expected '<file> <label>'"),
        ("0\n1\n2\n-1\n", r"label -1 is outside >= 0"),
    ],
)
def test_label_file_errors(tmp_path, text, message):
    src = tmp_path / "val"
    flat_folder(src, 4)
    (tmp_path / "labels.txt").write_text(text)
    res = subprocess.run(
        [sys.executable, "-m", "vistok.data.make_shards", str(src), str(tmp_path / "o")]
        + ["--labels", str(tmp_path / "labels.txt")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert re.search(message, res.stderr), res.stderr
    if "listed" in message and "more" not in message:
        assert "ILSVRC_val_0099.png" in res.stderr and "nope.png" in res.stderr
