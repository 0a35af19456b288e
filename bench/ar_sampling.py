"""Tokens/s of AR sampling with the static KV cache vs recomputing the whole prefix every step.

    python bench/ar_sampling.py [--preset S] [--side 16] [--batch 8] [--vocab 16384] [--cfg 1.0]

Same model and seed, codes compared: 256-token images (16 x 16) at batch 8 by default.
The cache turns each step into one token's worth of work; recomputation costs O(i) at step i,
O(N^2) in all.
"""

from __future__ import annotations

import argparse
import time

import torch

from vistok.generators.ar import GPT
from vistok.generators.sampling import SamplingConfig, generate


def timed(model, labels, config, use_cache: bool, seed: int = 0) -> tuple[float, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    codes = generate(model, labels, config, gen, use_cache=use_cache)
    return time.perf_counter() - start, codes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="S")
    p.add_argument("--side", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--cfg", type=float, default=1.0)
    # One thread by default: on a shared, oversubscribed CPU a second OpenMP thread makes the
    # tiny per-token matmuls of cached decoding wait on each other (measured 10x slower here).
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    space = {"kind": "index", "vocab_size": a.vocab, "channels": 8}
    model = GPT(space, [a.side, a.side], num_classes=10, preset=a.preset).eval()
    torch.nn.init.normal_(model.head.out.weight, std=0.02)  # non-uniform logits
    labels = torch.arange(a.batch) % 10
    config = SamplingConfig(cfg_scale=a.cfg, top_k=100)
    tokens = a.batch * a.side * a.side
    timed(model, labels[:1], config, True)  # warm-up
    t_cache, c_cache = timed(model, labels, config, True)
    t_full, c_full = timed(model, labels, config, False)
    same = torch.equal(c_cache, c_full)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"GPT-{a.preset} ({params:.1f}M params), {a.side}x{a.side} tokens, batch {a.batch}, "
        f"vocab {a.vocab}, cfg {a.cfg}, {torch.get_num_threads()} threads"
    )
    print(f"{'':<16}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'KV cache':<16}{t_cache:>10.2f}{tokens / t_cache:>12.1f}")
    print(f"{'recompute':<16}{t_full:>10.2f}{tokens / t_full:>12.1f}")
    print(f"speed-up {t_full / t_cache:.1f}x; identical codes: {same}")


if __name__ == "__main__":
    main()
