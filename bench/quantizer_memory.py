"""Peak memory and time of GQ (WeTok, https://arxiv.org/abs/2508.05599) vs full LFQ.

Forward + backward of ``LFQ`` in training mode (commitment + entropy loss, plus a stand-in
decoder loss on the quantized latent) at equal total bits: full LFQ (1 group, 2**D logits per
token) against group-wise LFQ (G groups, G * 2**(D/G) logits per token), on a batch of 16 images
of 16x16 tokens.

How peak memory is measured on CPU: each configuration runs in a fresh subprocess, which first
runs the same configuration once at batch 1 (so library initialisation and lazily allocated
workspaces are not counted), then resets the kernel's peak-resident-set mark (writing "5" to
/proc/self/clear_refs), reads the current VmRSS, runs one forward + backward, and reads VmHWM:
peak = VmHWM - VmRSS before. Tensors this large are mmap-allocated and returned to the OS when
freed, so the resident high-water mark tracks the peak of live tensors (plus a few MB of noise,
which only makes the small GQ figures look worse). Where clear_refs is not writable, the worker
skips the warm-up and uses getrusage's ru_maxrss instead. On CUDA (``--device cuda``) the peak is
torch.cuda.max_memory_allocated.

Full LFQ at 18 bits would need tens of GB at batch 16 (4 GiB per (4096 x 2**18) float32
tensor), so full LFQ is measured at batch 1 and 2 and extrapolated linearly to 16 (memory is
linear in the number of tokens); it is also measured directly where the extrapolation fits under
``--max-gib``, which checks the extrapolation.

    python bench/quantizer_memory.py [--threads 1] [--max-gib 8] [--device cpu]
"""

from __future__ import annotations

import statistics
import time

from vistok.common.memory import PeakMemory, run_worker, serve_worker, worker_parser

BATCH = 16
GRID = 16  # 16x16 tokens per image
CONFIGS = {16: [2, 4], 18: [2, 3]}  # total bits -> GQ group counts to compare with 1 group


def worker(bits: int, groups: int, batch: int, repeats: int, device: str) -> dict:
    import torch

    from vistok.tokenizers.quantizers.lfq import (
        LFQ,  # in the measured subprocess, after its baseline
    )

    q = LFQ(bits=bits, groups=groups).train().to(device)

    def step(b: int) -> None:
        z = torch.randn(b, bits, GRID, GRID, device=device, requires_grad=True)
        out = q(z)
        (out.loss + out.quantized.square().mean()).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    meter = PeakMemory(device)
    if meter.exact:
        step(1)  # warm-up
    meter.start()
    t0 = time.perf_counter()
    step(batch)
    first = time.perf_counter() - t0
    peak = meter.peak()
    times = [first]
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
    return {"peak_bytes": peak, "seconds": statistics.median(times)}


def run(bits: int, groups: int, batch: int, args) -> dict:
    argv = [str(bits), str(groups), str(batch), "--repeats", str(args.repeats)]
    return run_worker(__file__, [*argv, "--device", args.device], args.threads)


def mib(n: float) -> str:
    return f"{n / 2**20:9.1f}"


def main(args) -> None:
    print(f"LFQ fwd+bwd with entropy loss, batch {BATCH} x {GRID}x{GRID} tokens, {args.device},")
    print(f"{args.threads} thread(s), time = median of {args.repeats}\n")
    print(f"{'bits':>4} {'groups':>6} {'logits/token':>12} {'peak MiB':>9} {'time s':>7}  note")
    for bits, group_list in CONFIGS.items():
        # Full LFQ: batch 1 and 2, linear extrapolation, direct check where it fits.
        p1, p2 = run(bits, 1, 1, args), run(bits, 1, 2, args)
        full_mem = p1["peak_bytes"] + (BATCH - 1) * (p2["peak_bytes"] - p1["peak_bytes"])
        full_time = p1["seconds"] + (BATCH - 1) * (p2["seconds"] - p1["seconds"])
        note = "extrapolated from batch 1, 2"
        if full_mem <= args.max_gib * 2**30:
            direct = run(bits, 1, BATCH, args)
            note = f"measured (extrapolated from batch 1, 2: {mib(full_mem).strip()} MiB, "
            note += f"{full_time:.2f} s)"
            full_mem, full_time = direct["peak_bytes"], direct["seconds"]
        print(f"{bits:>4} {1:>6} {2**bits:>12} {mib(full_mem)} {full_time:7.2f}  {note}")
        for g in group_list:
            r = run(bits, g, BATCH, args)
            ratio_m = full_mem / max(r["peak_bytes"], 1)
            ratio_t = full_time / r["seconds"]
            print(
                f"{bits:>4} {g:>6} {g * 2 ** (bits // g):>12} {mib(r['peak_bytes'])} "
                f"{r['seconds']:7.2f}  full/GQ: memory x{ratio_m:.0f}, time x{ratio_t:.1f}"
            )


if __name__ == "__main__":
    parser = worker_parser(__doc__, nargs=3, type=int, metavar=("BITS", "GROUPS", "BATCH"))
    parser.add_argument("--max-gib", type=float, default=8.0)
    a = parser.parse_args()
    if a.worker:
        serve_worker(a.threads, lambda: worker(*a.worker, repeats=a.repeats, device=a.device))
    else:
        main(a)
