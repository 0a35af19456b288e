"""Images/s of the ImageDataModule training loader against a bare PIL decode + crop loop.

    python bench/data_throughput.py [--resolution 256] [--workers 2] [--batches 40]

Both read the same shards: ImageNet-like JPEGs (about 500 x 375, quality 90) cut from the
default-dataset photos, built once into a temporary folder (or ``--shards`` to use your own). The
bare loop reads the tar members and does decode -> RGB -> shorter-side resize + random crop ->
flip -> float in one process, with nothing else; the loader adds webdataset's sample grouping,
shuffling, skip accounting, batching and worker IPC. Printed for the bare loop and for the
loader with 0 and ``--workers`` workers: images per wall-clock second, and CPU milliseconds per
image summed over all processes (the figure that stays meaningful on a shared, loaded machine).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import resource
import tarfile
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from vistok.data.datamodule import ImageDataModule
from vistok.data.default_dataset import SOURCES, load_photo
from vistok.data.make_shards import shard_pattern, write_shards
from vistok.data.stream import expand_shards


def build_bench_shards(out: str, count: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(load_photo(name)) for name in SOURCES]

    def samples():
        for i in range(count):
            photo = photos[i % len(photos)]
            w, h = photo.size
            cw, ch = min(w, 500), min(h, 375)
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((500, 375))
            buf = io.BytesIO()
            crop.save(buf, "JPEG", quality=90)
            yield {"__key__": f"b{i:06d}", "jpg": buf.getvalue(), "cls": i % len(photos)}

    return shard_pattern(write_shards(samples(), out, "bench", shard_size=count // 8))


def bare_loop(urls: list[str], resolution: int, limit: int) -> int:
    """The minimal per-image work in one process: read the tar, decode, crop, flip, to float."""
    rng = random.Random(0)
    n = 0
    while n < limit:
        for url in urls:
            with tarfile.open(url) as tar:
                for member in tar:
                    if not member.name.endswith(".jpg") or n == limit:
                        continue
                    data = tar.extractfile(member).read()
                    img = Image.open(io.BytesIO(data)).convert("RGB")
                    side = min(img.size)
                    x0 = rng.randint(0, img.width - side)
                    y0 = rng.randint(0, img.height - side)
                    box = (x0, y0, x0 + side, y0 + side)
                    img = img.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
                    arr = np.array(img)  # (R, R, 3) uint8
                    if rng.random() < 0.5:
                        arr = arr[:, ::-1]
                    chw = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
                    chw.float().div_(127.5).sub_(1)  # (3, R, R) in [-1, 1]
                    n += 1
    return n


def loader_images(spec: str, resolution: int, batch: int, batches: int, workers: int) -> int:
    """Images delivered by one training epoch of the DataModule (worker start-up included)."""
    dm = ImageDataModule(
        train_shards=spec,
        resolution=resolution,
        batch_size=batch,
        num_workers=workers,
        batches_per_epoch=batches,
        shuffle_buffer=256,
    )
    return sum(len(b["key"]) for b in dm.train_dataloader())


def cpu_seconds() -> float:
    # Children count once they have exited: DataLoader workers are joined at the end of an epoch.
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def measure(fn, *args) -> tuple[float, float]:
    """(images per wall second, CPU milliseconds per image, all processes)."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    n = fn(*args)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return n / wall, 1000 * cpu / n


def main():
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="shard spec to read (default: build bench shards)")
    parser.add_argument("--count", type=int, default=800, help="images in the built shards")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    images = args.batch_size * args.batches
    runs = {
        "bare PIL loop (1 process)": [],
        "DataModule, 0 workers": [],
        f"DataModule, {args.workers} workers": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.shards or build_bench_shards(tmp, args.count)
        urls = expand_shards(spec)
        # Interleaved rounds, median of each: the machine's load drifts between runs.
        for _ in range(args.rounds):
            bare, single, multi = runs.values()
            bare.append(measure(bare_loop, urls, args.resolution, images))
            base = (spec, args.resolution, args.batch_size, args.batches)
            single.append(measure(loader_images, *base, 0))
            multi.append(measure(loader_images, *base, args.workers))
    print(
        f"resolution {args.resolution}, batch {args.batch_size}, {images} images per run, "
        f"median of {args.rounds} rounds; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    print(f"{'':<32}{'img/s':>8}{'x bare':>8}{'CPU ms/img':>12}{'x bare':>8}")
    ref_rate, ref_cpu = None, None
    for name, values in runs.items():
        rate, cpu = (float(np.median([v[i] for v in values])) for i in (0, 1))
        ref_rate, ref_cpu = ref_rate or rate, ref_cpu or cpu
        print(f"{name:<32}{rate:8.1f}{rate / ref_rate:8.2f}{cpu:12.2f}{ref_cpu / cpu:8.2f}")


if __name__ == "__main__":
    main()
