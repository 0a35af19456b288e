"""Pack a folder of images into WebDataset tar shards.

    python -m vistok.data.make_shards SRC OUT [--shard-size 1000] [--prefix train]
        [--classes | --labels FILE] [--class-list classes.txt]
        [--val-fraction F | --val-count N] [--seed 0]

SRC is searched recursively. With ``--classes`` every immediate subfolder of SRC is a class
(ImageNet layout), the label is the folder's index in sorted order (or in ``--class-list``, to give
a validation split the training split's indices), and the class list is written beside the shards
as ``classes.txt`` and ``classes.json``.

With ``--labels FILE`` the labels come from a file instead (ImageNet's flat val folder): either
lines ``<file> <label>`` / ``<file>,<label>`` (the file by its path relative to SRC or that path
without its extension; extra fields after the label are ignored; the label an integer or a class
name, names indexed in ``--class-list`` or else in their sorted order), or one integer per line
for the image files in sorted path order. A listed file that does not exist is an error; an image
file that is not listed is skipped and counted.

``--val-fraction``/``--val-count`` hold out a seeded, class-stratified validation split
(``data/holdout.py`` documents the rounding) written as ``val-XXXXXX.tar`` beside the
``{prefix}-XXXXXX.tar`` training shards.

Each sample stores the file's original encoded bytes untouched, under the suffix of the format PIL
detects (``jpg``, ``png``, ``webp`` ...: the file name's extension can lie), plus ``cls`` when
labelled. Keys come from the relative path, so they are unique and stable across runs. Every file
is fully decoded once to check it, its EXIF orientation applied as the training decoder applies it
(``data/image_decode.py``; the tag stays in the stored bytes, so the shards hold what the camera
wrote and every EXIF-aware reader shows it upright); unreadable files are skipped and listed at
the end, and a folder without a single readable image is an error (exit code 1). The last line
printed is the shard pattern to pass as ``--data.train_shards`` (with a hold-out, the last two
patterns are for ``--data.train_shards`` and ``--data.val_shards``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from multiprocessing import Pool
from pathlib import Path

from PIL import Image, ImageOps
from tqdm import tqdm

from vistok.data.holdout import split_holdout

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
_FORMAT_SUFFIX = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tiff",
    "PPM": "ppm",
}


def write_shards(
    samples: Iterable[dict],
    out_dir: str | os.PathLike,
    prefix: str = "train",
    shard_size: int = 1000,
) -> list[str]:
    """Write ``{"__key__": str, <suffix>: bytes | str | int, ...}`` dicts into
    ``{prefix}-000000.tar`` ... and return the shard paths.

    Byte-for-byte deterministic (fixed mtime/owner, members in sample order); each shard is
    written under a temporary name and renamed when complete, so readers never see half a shard.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    tar, count, tmp = None, 0, None
    try:
        for sample in samples:
            if tar is None:
                path = out / f"{prefix}-{len(paths):06d}.tar"
                tmp = path.with_name(path.name + f".tmp{os.getpid()}")
                tar = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT)
                paths.append(str(path))
            key = sample["__key__"]
            for suffix, value in sample.items():
                if suffix.startswith("__"):
                    continue
                data = value if isinstance(value, bytes) else str(value).encode("utf-8")
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
            count += 1
            if count == shard_size:
                tar.close()
                os.replace(tmp, paths[-1])
                tar, count = None, 0
    finally:
        if tar is not None:
            tar.close()
            os.replace(tmp, paths[-1])
    return paths


def shard_pattern(paths: list[str]) -> str:
    """``out/train-{000000..000009}.tar`` for consecutive shards (the plain path for one)."""
    if len(paths) == 1:
        return paths[0]
    first, last = Path(paths[0]), Path(paths[-1])
    prefix, lo = first.stem.rsplit("-", 1)
    hi = last.stem.rsplit("-", 1)[1]
    return str(first.with_name(f"{prefix}-{{{lo}..{hi}}}.tar"))


def make_key(rel_path: str, seen: set[str]) -> str:
    """Relative path -> a tar-safe key without dots (webdataset splits keys at the first dot)."""
    key = re.sub(r"[^\w-]", "_", rel_path.replace(os.sep, "__")).lstrip("_") or "img"
    base, n = key, 1
    while key in seen:  # only when two paths sanitise alike
        key, n = f"{base}_{n}", n + 1
    seen.add(key)
    return key


def check_image(path: str) -> tuple[bytes, str] | None:
    """The file's bytes and format suffix if PIL can fully decode it, else None."""
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            if fmt == "JPEG":
                img.draft(img.mode, (64, 64))  # still reads the whole stream; much faster
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # a broken EXIF block fails here
        return data, _FORMAT_SUFFIX.get(fmt, (fmt or "bin").lower())
    except Exception:
        return None


def list_images(src: str | os.PathLike, classes: list[str] | None = None) -> list[tuple[str, int]]:
    """Sorted (path, label) pairs; label -1 without classes."""
    root = Path(src)
    if classes is None:
        dirs = [(root, -1)]
    else:
        dirs = [(root / name, label) for label, name in enumerate(classes)]
    items = []
    for folder, label in dirs:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                items.append((str(path), label))
    return items


def read_label_file(
    path: str | os.PathLike, classes: list[str] | None = None
) -> tuple[list[str], list[int], list[str] | None]:
    """``(names, labels, classes)``: ``names`` is empty for a plain list of integers (one per
    image in sorted path order); ``classes`` is the class list the labels index (``None`` for
    integers without one)."""
    lines = [(n, line.strip()) for n, line in enumerate(Path(path).read_text().splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line]
    if not lines:
        raise ValueError(f"{path}: the label file is empty")
    if all(re.fullmatch(r"-?\d+", line) for _, line in lines):
        return [], _integer_labels(path, [line for _, line in lines], classes), classes
    names, raw = [], []
    for n, line in lines:
        fields = re.split(r"[,\s]+", line, maxsplit=1)
        if len(fields) < 2 or not fields[1].strip():
            raise ValueError(f"{path}:{n}: expected '<file> <label>' or '<file>,<label>': {line!r}")
        names.append(fields[0])
        raw.append(fields[1].split()[0].split(",")[0])
    dupes = sorted(x for x, k in Counter(names).items() if k > 1)
    if dupes:
        raise ValueError(f"{path}: files listed more than once: {', '.join(dupes[:5])}")
    if all(re.fullmatch(r"-?\d+", x) for x in raw):
        return names, _integer_labels(path, raw, classes), classes
    if any(re.fullmatch(r"-?\d+", x) for x in raw):
        raise ValueError(f"{path}: labels mix integers and class names; use one kind")
    classes = classes if classes is not None else sorted(set(raw))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(raw) - index.keys())
    if unknown:
        raise ValueError(
            f"{path}: {len(unknown)} label(s) not in the class list, e.g. {', '.join(unknown[:5])}"
        )
    return names, [index[x] for x in raw], classes


def _integer_labels(
    path: str | os.PathLike, raw: list[str], classes: list[str] | None
) -> list[int]:
    labels = [int(x) for x in raw]
    top = len(classes) if classes is not None else None
    out = [x for x in labels if x < 0 or (top is not None and x >= top)]
    if out:
        bound = f"0..{top - 1} (the class list)" if top is not None else ">= 0"
        raise ValueError(f"{path}: label {out[0]} is outside {bound}")
    return labels


def label_images(
    src: str | os.PathLike, names: list[str], labels: list[int], label_file: str = "label file"
) -> tuple[list[tuple[str, int]], list[str]]:
    """``(items, unlisted)``: the image files under ``src`` labelled from a label file (see
    ``read_label_file``), and the image files it does not list (skipped)."""
    files = [p for p, _ in list_images(src)]
    rel = [Path(os.path.relpath(p, src)).as_posix() for p in files]
    if not names:  # a plain list of integers, one per image in sorted path order
        if len(labels) != len(files):
            raise ValueError(
                f"{label_file} holds {len(labels)} labels but {src} holds {len(files)} image "
                "files: a plain list of labels must give one per image, in sorted file order"
            )
        return list(zip(files, labels)), []
    by_name = {r: i for i, r in enumerate(rel)}
    by_stem = {}
    for i, r in enumerate(rel):
        by_stem.setdefault(r.rsplit(".", 1)[0], []).append(i)
    items, listed, missing = [], set(), []
    for name, label in zip(names, labels):
        name = name.replace(os.sep, "/")
        i = by_name.get(name)
        if i is None and len(by_stem.get(name, [])) == 1:
            i = by_stem[name][0]
        if i is None:
            missing.append(name)
            continue
        if i in listed:
            raise ValueError(f"{label_file}: {rel[i]} is listed more than once (as {name!r})")
        listed.add(i)
        items.append((i, label))
    if missing:
        raise ValueError(
            f"{len(missing)} file(s) listed in {label_file} are not image files under {src} "
            f"(or their extensionless name matches several), e.g. {', '.join(missing[:5])}"
        )
    items.sort()
    unlisted = [files[i] for i in range(len(files)) if i not in listed]
    return [(files[i], label) for i, label in items], unlisted


def checked_images(paths: list[str], workers: int = 0) -> Iterator[tuple[bytes, str] | None]:
    """``check_image`` of each path, in order (on ``workers`` processes when > 0)."""
    if workers > 0:
        with Pool(workers) as pool:
            yield from pool.imap(check_image, paths, chunksize=16)
    else:
        yield from map(check_image, paths)


def folder_samples(
    items: list[tuple[str, int]],
    root: str | os.PathLike,
    bad: list[str],
    workers: int = 0,
    progress: tqdm | None = None,
) -> Iterator[dict]:
    """Checked samples in ``items`` order; unreadable paths are appended to ``bad``."""
    checked = checked_images([p for p, _ in items], workers)
    yield from _samples(items, root, bad, checked, progress)


def readable_items(
    items: list[tuple[str, int]], bad: list[str], workers: int = 0, progress: tqdm | None = None
) -> tuple[list[tuple[str, int]], dict[str, str]]:
    """``(good items, path -> format suffix)``: the check alone, so that a split can be made over
    the readable images before their bytes are read again to be written."""
    good, suffixes = [], {}
    for item, result in zip(items, checked_images([p for p, _ in items], workers)):
        if progress is not None:
            progress.update(1)
        if result is None:
            bad.append(item[0])
        else:
            good.append(item)
            suffixes[item[0]] = result[1]
    return good, suffixes


def _samples(items, root, bad, checked, progress):
    seen: set[str] = set()
    for (path, label), result in zip(items, checked):
        if progress is not None:
            progress.update(1)
        if result is None:
            bad.append(path)
            continue
        data, suffix = result
        sample = {"__key__": make_key(os.path.relpath(path, root), seen), suffix: data}
        if label >= 0:
            sample["cls"] = label
        yield sample


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="folder of images (searched recursively)")
    parser.add_argument("out", help="output folder for the shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--prefix", default="train", help="shard name prefix, e.g. train / val")
    labelling = parser.add_mutually_exclusive_group()
    labelling.add_argument("--classes", action="store_true", help="subfolders of SRC are classes")
    labelling.add_argument("--labels", help="label file for a flat folder (see the module doc)")
    parser.add_argument("--class-list", help="classes.txt to take class indices from")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, help="hold out this fraction as val shards")
    split.add_argument("--val-count", type=int, help="hold out this many images as val shards")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    parser.add_argument("--workers", type=int, default=0, help="processes decoding to check")
    args = parser.parse_args(argv)
    holding_out = args.val_fraction is not None or args.val_count is not None
    if holding_out and args.prefix == "val":
        parser.error("--val-fraction/--val-count write val-*.tar: give another --prefix")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.val_count is not None and args.val_count < 1:
        parser.error(f"--val-count must be >= 1, got {args.val_count}")

    classes = None
    if args.class_list:
        classes = Path(args.class_list).read_text().split()
    elif args.classes:
        classes = sorted(p.name for p in Path(args.src).iterdir() if p.is_dir())
    unlisted: list[str] = []
    if args.labels:
        try:
            names, labels, classes = read_label_file(args.labels, classes)
            items, unlisted = label_images(args.src, names, labels, args.labels)
        except ValueError as e:
            parser.error(str(e))
    else:
        items = list_images(args.src, classes)
    if not items:
        parser.error(f"no image files under {args.src}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if classes is not None:
        (out / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
        (out / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")

    bad: list[str] = []
    written: list[tuple[str, list[str], int]] = []  # (prefix, shard paths, images)
    if not holding_out:
        with tqdm(total=len(items), unit="img", desc=f"{args.prefix} shards") as progress:
            samples = folder_samples(items, args.src, bad, args.workers, progress)
            paths = write_shards(samples, out, args.prefix, args.shard_size)
            written.append((args.prefix, paths, len(items) - len(bad)))
    else:  # check every file first, so the split is over the readable images only
        with tqdm(total=len(items), unit="img", desc="checking") as progress:
            good, suffixes = readable_items(items, bad, args.workers, progress)
        if good:
            rel = [os.path.relpath(p, args.src) for p, _ in good]
            try:
                train, val = split_holdout(good, rel, args.val_fraction, args.val_count, args.seed)
            except ValueError as e:
                parser.error(f"{e} (readable images only)")
            for prefix, part in ((args.prefix, train), ("val", val)):
                stored = ((Path(p).read_bytes(), suffixes[p]) for p, _ in part)
                samples = _samples(part, args.src, bad, stored, None)
                paths = write_shards(samples, out, prefix, args.shard_size)
                written.append((prefix, paths, len(part)))
    for prefix, paths, n in written:
        print(f"{n} images in {len(paths)} {prefix} shards under {out}")
    if unlisted:
        print(f"{len(unlisted)} image file(s) not in {args.labels} skipped, e.g.:")
        for path in unlisted[:5]:
            print(f"  {path}")
    if bad:
        print(f"{len(bad)} unreadable file(s) skipped:")
        for path in bad:
            print(f"  {path}")
    if len(bad) == len(items):
        raise SystemExit(
            f"error: none of the {len(items)} image files under {args.src} could be decoded: "
            "no shards written"
        )
    for prefix, paths, _ in written:
        flag = "val_shards" if prefix.startswith("val") else "train_shards"
        print(f"pass with --data.{flag}:")
        print(shard_pattern(paths))
    return [p for _, paths, _ in written for p in paths]


if __name__ == "__main__":
    main()
