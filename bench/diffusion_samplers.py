"""Diffusion samplers on toys with a known answer: error against a converged reference and against
the true distribution, per number of net evaluations, printed side by side.

    python bench/diffusion_samplers.py [--train-steps 700] [--samples 4000]

Flow matching: a tiny DiT trained on CPU on a 3-component 2D Gaussian mixture (the toy of
tests/test_diffusion.py); Euler and Heun at several step counts against Euler with 1000 steps
from the same noise (mean |x - x_ref|) and against the mixture (total variation between the
sampled and true component weights). Binary diffusion: a tiny model on four 8-bit patterns over
two tokens (tests/test_binary_diffusion.py's toy); share of samples that are one of the patterns
and total variation of the pattern frequencies, per step count.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from vistok.generators.binary_diffusion import BinaryDiffusion
from vistok.generators.diffusion import DiffusionSampling, FlowMatching

MEANS = torch.tensor([[-2.0, -2.0], [2.0, -1.0], [0.0, 2.5]])
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
PATTERNS = torch.tensor(
    [
        [0, 0, 0, 0, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 1, 0, 1, 0],
        [0, 1, 1, 0, 0, 1, 1, 0],
    ]
)
PATTERN_WEIGHTS = torch.tensor([0.4, 0.3, 0.2, 0.1])


def fit(model, batches, steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss, _ = model.loss(*batches(g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def mixture(g: torch.Generator, n: int = 256):
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
    return (MEANS[k] + 0.3 * torch.randn(n, 2, generator=g))[:, :, None], k


def flow(args) -> None:
    torch.manual_seed(0)
    space = {"kind": "continuous", "channels": 2, "vocab_size": 0, "groups": 1, "bits": 0}
    model = FlowMatching(space, [1], num_classes=0, preset="tiny")
    x, _ = mixture(torch.Generator().manual_seed(1), 10000)
    model.set_latent_stats(x.mean((0, 2)), x.std((0, 2)))
    fit(model, lambda g: (mixture(g)[0], None), args.train_steps)
    labels = torch.full((args.samples,), -1)

    def run(steps: int, sampler: str):
        start = time.perf_counter()
        out = model.generate(
            labels, DiffusionSampling(steps, sampler), torch.Generator().manual_seed(2)
        )
        return out[:, :, 0], time.perf_counter() - start

    ref, _ = run(1000, "euler")
    print(f"flow matching, {args.samples} samples; reference: Euler 1000 steps")
    print(f"{'sampler':>8} {'steps':>5} {'NFE':>5} {'|x-ref|':>8} {'TV(weights)':>11} {'s':>6}")
    for sampler in ("euler", "heun"):
        for steps in (5, 10, 25, 50):
            x, secs = run(steps, sampler)
            k = torch.cdist(x, MEANS).argmin(1)
            tv = 0.5 * (torch.bincount(k, minlength=3) / len(k) - WEIGHTS).abs().sum()
            nfe = steps * (2 if sampler == "heun" else 1)
            err = (x - ref).abs().mean()
            print(f"{sampler:>8} {steps:>5} {nfe:>5} {err:>8.4f} {tv:>11.4f} {secs:>6.2f}")


def bits(args) -> None:
    torch.manual_seed(0)
    space = {"kind": "bits", "channels": 4, "vocab_size": 2, "groups": 1, "bits": 4}
    model = BinaryDiffusion(space, [2], num_classes=0, preset="tiny")

    def batch(g):
        k = torch.multinomial(PATTERN_WEIGHTS, 256, replacement=True, generator=g)
        return PATTERNS[k].reshape(256, 2, 4), None

    fit(model, batch, args.train_steps)
    n = args.samples
    print(f"\nbinary diffusion, {n} samples")
    print(f"{'steps':>5} {'in support':>10} {'TV(patterns)':>12} {'s':>6}")
    for steps in (4, 8, 16, 32, 64):
        start = time.perf_counter()
        z = model.generate(
            torch.full((n,), -1), DiffusionSampling(steps), torch.Generator().manual_seed(2)
        )
        secs = time.perf_counter() - start
        match = (z.reshape(n, 1, 8) == PATTERNS[None]).all(-1).float()  # (n, 4)
        tv = 0.5 * (match.mean(0) - PATTERN_WEIGHTS).abs().sum()
        print(f"{steps:>5} {match.any(1).float().mean():>10.4f} {tv:>12.4f} {secs:>6.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--train-steps", type=int, default=700)
    p.add_argument("--samples", type=int, default=4000)
    a = p.parse_args()
    torch.set_num_threads(1)
    flow(a)
    bits(a)
