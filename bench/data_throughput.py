"""Images/s of the ImageDataModule training loader against a bare PIL decode + crop loop.

    python bench/data_throughput.py [--resolution 256] [--workers 2] [--batches 40]

Both read the same shards: ImageNet-like JPEGs (about 500 x 375, quality 90) cut from the
default-dataset photos, built once into a temporary folder (or ``--shards`` to use your own). The
bare loop reads the tar members and does decode -> RGB -> shorter-side resize + random crop ->
flip -> float in one process, with nothing else; the loader adds webdataset's sample grouping,
shuffling, skip accounting, batching and worker IPC. Printed: both rates, and the loader with 0 workers (same
single process as the bare loop: the ratio is the pipeline's overhead) and with ``--workers``.
"""

from __future__ import annotations

import argparse
import io
import random
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


def bare_loop(urls: list[str], resolution: int, limit: int) -> float:
    """Images/s of the minimal per-image work in one process: read the tar, decode, crop."""
    rng = random.Random(0)
    n = 0
    start = time.perf_counter()
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
    return n / (time.perf_counter() - start)


def loader_rate(spec: str, resolution: int, batch: int, batches: int, workers: int) -> float:
    """Images/s of the training loader, from the first batch on (worker start-up excluded)."""
    dm = ImageDataModule(
        train_shards=spec,
        resolution=resolution,
        batch_size=batch,
        num_workers=workers,
        batches_per_epoch=batches + 1,
        shuffle_buffer=256,
    )
    it = iter(dm.train_dataloader())
    next(it)
    start = time.perf_counter()
    n = sum(len(b["key"]) for b in it)
    return n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    rates = {"bare": [], "single": [], "multi": []}
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.shards or build_bench_shards(tmp, args.count)
        # Interleaved rounds, median of each: the machine's load drifts between runs.
        for _ in range(args.rounds):
            rates["bare"].append(bare_loop(expand_shards(spec), args.resolution, images))
            for name, workers in (("single", 0), ("multi", args.workers)):
                rate = loader_rate(spec, args.resolution, args.batch_size, args.batches, workers)
                rates[name].append(rate)
    bare, single, multi = (float(np.median(rates[k])) for k in ("bare", "single", "multi"))
    print(f"resolution {args.resolution}, batch {args.batch_size}, {images} images per run, "
          f"median of {args.rounds} rounds")
    print(f"{'bare PIL loop (1 process)':<32}{bare:8.1f} img/s")
    print(f"{'DataModule, 0 workers':<32}{single:8.1f} img/s  {single / bare:6.2f} x bare")
    label = f"DataModule, {args.workers} workers"
    print(f"{label:<32}{multi:8.1f} img/s  {multi / bare:6.2f} x bare")


if __name__ == "__main__":
    main()
