"""Time and peak memory of Gaussian splatting (GPSToken's renderer), dense vs tiled.

Forward + backward (gradients to geometry and features) of rendering N = 128 and 256 Gaussians
with 16 feature channels into a 64 x 64 map, batch 16: the GPSToken decoder's input at 256 px.
The Gaussians are GPSToken's initial layout of real photos (entropy partition of scikit-image
photos at 256 px, sigma = 2/3 of each region's size), so their sizes and overlaps are the ones
the renderer sees at the start of training.

Peak memory on CPU: each configuration runs in a fresh subprocess that renders once (warm-up),
resets the kernel's resident-set high-water mark (writes "5" to /proc/self/clear_refs), reads
VmRSS, renders once more and reads VmHWM: peak = VmHWM - VmRSS before. glibc's mmap threshold
is pinned (MALLOC_MMAP_THRESHOLD_) so that freed tensors go back to the OS and the resident
high-water mark follows the live tensors; times come from a second run with the default
allocator. Where clear_refs is not writable the figure falls back
to getrusage's ru_maxrss. On CUDA (``--device cuda``) the peak is torch.cuda.max_memory_allocated.
The "saved MiB" column is exact and device-independent: the bytes autograd keeps for backward
(counted with saved-tensor hooks), the part of the peak that grows with N.

    python bench/splatting.py [--threads 1] [--repeats 3] [--device cpu] [--tile 16]
"""

from __future__ import annotations

import statistics
import time

from vistok.common.memory import PeakMemory, run_worker, serve_worker, worker_parser

BATCH, SIZE, CHANNELS = 16, 64, 16


def layout(num: int, device: str):
    """Geometry (BATCH, num, 5) of GPSToken's initial layout of real photos."""
    import torch
    import torch.nn.functional as F
    from skimage import data

    from vistok.tokenizers.nets.partition import (  # in the measured subprocess, after its baseline
        boxes_to_geometry,
        entropy_partition,
    )

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    images = []
    for p in photos:
        x = torch.from_numpy(p).permute(2, 0, 1).float()[None] / 127.5 - 1
        images.append(F.interpolate(x, size=(256, 256), mode="area"))
    images = torch.cat(images).repeat(BATCH // len(photos), 1, 1, 1)
    boxes = entropy_partition(images, num)
    return boxes_to_geometry(boxes, 256, 256).to(device)


def worker(mode: str, num: int, repeats: int, device: str, tile: int) -> dict:
    import torch

    from vistok.tokenizers.nets.splatting import (  # in the measured subprocess, after its baseline
        render_dense,
        render_tiled,
    )

    geometry = layout(num, device)
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(BATCH, num, CHANNELS, generator=gen).to(device)
    weights = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen).to(device)

    saved: dict[int, int] = {}

    def pack(t):
        saved[id(t)] = t.numel() * t.element_size()  # each tensor once, however often saved
        return t

    def step() -> None:
        g = geometry.clone().requires_grad_()
        f = features.clone().requires_grad_()
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if mode == "dense":
                out = render_dense(g, f, (SIZE, SIZE))
            else:
                out = render_tiled(g, f, (SIZE, SIZE), tile=tile)
            loss = (out * weights).sum()
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    meter = PeakMemory(device)
    step()  # warm-up
    meter.start()
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if i == 0:
            peak = meter.peak()
    # How much the tiles cull: the busiest tile's Gaussian count, as the tiled renderer pads to it.
    from vistok.tokenizers.nets.splatting import (
        gaussian_boxes,  # in the measured subprocess, after its baseline
    )

    box = gaussian_boxes(geometry.cpu())
    covered = ((box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1]) / 4).clamp(max=1)
    return {
        "peak_bytes": peak,
        "saved_bytes": sum(saved.values()),
        "seconds": statistics.median(times),
        "mean_box_fraction": float(covered.mean()),
    }


def _worker(mode: str, num: int, args, pin_mmap: bool) -> dict:
    argv = [mode, str(num), "--repeats", str(args.repeats)]
    argv += ["--device", args.device, "--tile", str(args.tile)]
    env = {"MALLOC_MMAP_THRESHOLD_": "131072"} if pin_mmap else None
    return run_worker(__file__, argv, args.threads, env)


def run(mode: str, num: int, args) -> dict:
    """Memory from a run with the mmap threshold pinned, time from one with the default
    allocator (pinning makes every large allocation fault its pages in afresh)."""
    memory = _worker(mode, num, args, pin_mmap=args.device == "cpu")
    timing = _worker(mode, num, args, pin_mmap=False) if args.device == "cpu" else memory
    return {**memory, "seconds": timing["seconds"]}


def main(args) -> None:
    print(
        f"splatting fwd+bwd, batch {BATCH}, {SIZE}x{SIZE}x{CHANNELS} map, {args.device}, "
        f"{args.threads} thread(s), tile {args.tile}, time = median of {args.repeats}\n"
    )
    print(f"{'gaussians':>9} {'renderer':>8} {'peak MiB':>9} {'saved MiB':>9} {'time s':>7}  note")
    for num in (128, 256):
        dense = run("dense", num, args)
        tiled = run("tiled", num, args)
        for mode, r in (("dense", dense), ("tiled", tiled)):
            note = f"mean 3-sigma box = {100 * r['mean_box_fraction']:.0f}% of the image"
            if mode == "tiled":
                note = (
                    f"dense/tiled: memory x{dense['peak_bytes'] / max(r['peak_bytes'], 1):.1f}, "
                    f"time x{dense['seconds'] / r['seconds']:.1f}"
                )
            mem = f"{r['peak_bytes'] / 2**20:9.1f} {r['saved_bytes'] / 2**20:9.1f}"
            print(f"{num:>9} {mode:>8} {mem} {r['seconds']:7.3f}  {note}")


if __name__ == "__main__":
    parser = worker_parser(__doc__, nargs=2, metavar=("MODE", "N"))
    parser.add_argument("--tile", type=int, default=16)
    a = parser.parse_args()
    if a.worker:
        mode, n = a.worker
        serve_worker(a.threads, lambda: worker(mode, int(n), a.repeats, a.device, a.tile))
    else:
        main(a)
