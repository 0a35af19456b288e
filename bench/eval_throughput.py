"""Images/s of ReconstructionEval's work on this machine, and the share spent in Inception.

    python bench/eval_throughput.py [--config tokenizer/vq.yaml] [--resolution 64]
        [--batch 32] [--batches 3] [--feature 2048] [--strengths 0.25 0.5 1.0] [--threads 1]

Builds the tokenizer from its config stacked with ``presets/cpu_small.yaml`` (random weights: the
cost does not depend on training), reads batches of the embedded validation split, and times
each step of what the callback does per batch, after one warm-up batch:

- rFID path: encode (encoder + quantizer), decode, Inception features of the reconstructions;
- the rest of a full evaluation: per strength perturb + decode + Inception, then LPIPS and
  PSNR/SSIM.

Prints ms per image for each step and images/s for the rFID path alone and for the full pass,
with the fraction of wall time inside Inception. Reference statistics are not timed (computed
once and cached).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from vistok.common.cli import VistokCLI
from vistok.data.datamodule import ImageDataModule
from vistok.evaluation.fid import FID
from vistok.evaluation.metrics import PSNR, SSIM
from vistok.evaluation.pfid import decoder_noise, perturb_codes
from vistok.losses.perceptual import LPIPS


@contextmanager
def clock(times: dict, name: str):
    start = time.perf_counter()
    yield
    times[name] += time.perf_counter() - start


@torch.no_grad()
def evaluate_batch(tok, fid, lpips, psnr, ssim, x, keys, strengths, times) -> None:
    with clock(times, "encode"):
        latents = tok.pre_quant(x)  # (B, C_q, h, w)
        q = tok.quantizer(latents)
    noise = decoder_noise(tok, q.quantized, keys, 0)
    with clock(times, "decode"):
        recon = tok.decode(q.quantized, noise=noise).clamp(-1, 1)
    with clock(times, "inception"):
        fid.update(recon, real=False)
    for s in strengths:
        with clock(times, "perturb"):
            z = tok.quantizer.codes_to_latents(perturb_codes(tok, q.codes, latents, s, keys, 0))
        with clock(times, "decode_perturbed"):
            img = tok.decode(z, noise=noise).clamp(-1, 1)
        with clock(times, "inception_perturbed"):
            fid.update(img, real=False)
    with clock(times, "lpips"):
        lpips(recon, x)
    with clock(times, "psnr_ssim"):
        psnr.update(recon, x)
        ssim.update(recon, x)


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tokenizer/vq.yaml")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3, help="timed batches after warm-up")
    parser.add_argument("--feature", type=int, default=2048)
    parser.add_argument("--strengths", type=float, nargs="*", default=[0.25, 0.5, 1.0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    res = args.resolution
    cli = VistokCLI(
        [
            "--config",
            args.config,
            "--config",
            "presets/cpu_small.yaml",
            f"--model.init_args.tokenizer.init_args.resolution={res}",
            "--run_dir=/tmp/vistok_eval_throughput",
        ]
    )
    tok = cli.model.tokenizer.eval()
    fid, lpips, psnr, ssim = FID(args.feature), LPIPS(), PSNR(), SSIM()
    data = ImageDataModule(resolution=res, val_batch_size=args.batch, num_workers=0)
    batches = iter(data.val_dataloader(rank=0, world_size=1))

    times: dict[str, float] = defaultdict(float)
    n = 0
    for i in range(args.batches + 1):
        batch = next(batches)
        x, keys = batch["image"][: args.batch], batch["key"][: args.batch]
        if i == 0:  # warm-up: first calls pick kernels and allocate
            evaluate_batch(tok, fid, lpips, psnr, ssim, x, keys, args.strengths, defaultdict(float))
            continue
        evaluate_batch(tok, fid, lpips, psnr, ssim, x, keys, args.strengths, times)
        n += x.shape[0]

    params = sum(p.numel() for p in tok.parameters()) / 1e6
    print(
        f"{args.config} ({params:.1f}M params) at {res} px, batch {args.batch}, {n} images timed, "
        f"{torch.get_num_threads()} thread(s), {args.feature}-d Inception at 299 px"
    )
    for name, t in times.items():
        print(f"  {name:<22}{1000 * t / n:9.1f} ms/image")
    rfid = times["encode"] + times["decode"] + times["inception"]
    total = sum(times.values())
    inception = times["inception"] + times["inception_perturbed"]
    print(
        f"rFID path (encode + decode + Inception): {n / rfid:.2f} images/s, "
        f"Inception {100 * times['inception'] / rfid:.0f}% of it"
    )
    print(
        f"full pass (rFID + {len(args.strengths)} pFID strengths + LPIPS + PSNR/SSIM): "
        f"{n / total:.2f} images/s, Inception {100 * inception / total:.0f}% of it"
    )


if __name__ == "__main__":
    main()
