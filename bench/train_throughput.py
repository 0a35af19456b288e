"""Training throughput with and without each speed option (``vistok.common.speed``): images/s of
a tokenizer step (VQ, conv encoder/decoder) and tokens/s of a generator step (GPT), printed as
ratios to the plain fp32 step.

    python bench/train_throughput.py [--device cuda] [--steps 6] [--only tokenizer|generator]

A step is forward + backward + optimizer step (the tokenizer's reconstruction and quantizer
losses; the GPT's cross-entropy), timed after warm-up steps (which absorb ``torch.compile``), the
median of ``--steps``. Activation checkpointing trades compute for memory, so its row also
reports the bytes the autograd graph keeps for the backward pass (measured with saved-tensor
hooks, so it works on CPU too).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from torch import nn

from vistok.common.speed import compile_modules, fused_available, to_channels_last
from vistok.generators.ar import GPT
from vistok.tokenizers.vq import VQTokenizer


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while running fn()."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.backward()
    return total


def time_steps(step, warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_step(model: nn.Module, loss_fn, inputs, options: set[str], device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    fused = "fused" in options and fused_available(params)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)
    amp = "bf16" in options
    precision = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()

    def loss():
        with precision:
            return loss_fn(*inputs).float()

    def step():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    return step, loss


def tokenizer_case(options: set[str], a, device):
    torch.manual_seed(0)
    tok = VQTokenizer(
        resolution=a.resolution,
        channels=a.channels,
        num_res_blocks=1,
        channel_mult=[1, 2, 2],
        codebook_size=1024,
    ).to(device)
    images = torch.rand(a.batch, 3, a.resolution, a.resolution, device=device) * 2 - 1
    if "channels_last" in options:
        to_channels_last(tok)
        images = images.contiguous(memory_format=torch.channels_last)
    if "compile" in options:
        compile_modules(tok.encoder, tok.decoder)

    def loss_fn(x):
        recon, q = tok(x)
        return (recon.float() - x).abs().mean() + q.loss

    return make_step(tok, loss_fn, (images,), options, device), a.batch


def generator_case(options: set[str], a, device):
    torch.manual_seed(0)
    space = {"kind": "index", "vocab_size": a.vocab, "channels": 8}
    gpt = GPT(space, [a.side, a.side], 10, preset=a.preset, dropout=0.0, token_dropout=0.0)
    gpt = gpt.to(device).train()
    gpt.activation_checkpointing = "checkpointing" in options
    if "compile" in options:
        compile_modules(gpt)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(a.vocab, (a.batch, a.side, a.side), generator=g).to(device)
    labels = torch.arange(a.batch, device=device) % 10
    return make_step(gpt, lambda c, y: gpt.loss(c, y)[0], (codes, labels), options, device), (
        a.batch * gpt.num_tokens
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=["tokenizer", "generator"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--preset", default="S")
    p.add_argument("--side", type=int, default=16)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    cases = {
        "tokenizer": (
            tokenizer_case,
            "img/s",
            f"VQ conv tokenizer {a.resolution}px ch{a.channels}, batch {a.batch}",
            ["bf16", "channels_last", "compile", "fused"],
        ),
        "generator": (
            generator_case,
            "tok/s",
            f"GPT-{a.preset}, {a.side * a.side} tokens, vocab {a.vocab}, batch {a.batch}",
            ["bf16", "compile", "fused", "checkpointing"],
        ),
    }
    for name, (case, unit, title, switches) in cases.items():
        if a.only and a.only != name:
            continue
        print(f"\n{name}: {title}")
        print(f"{'options':<28}{'s/step':>9}{unit:>11}{'ratio':>8}{'saved MB':>10}")
        base = None
        for options in [set(), *({s} for s in switches), set(switches) - {"checkpointing"}]:
            (step, loss), items = case(options, a, device)
            try:
                sec = time_steps(step, a.warmup, a.steps, device)
            except Exception as e:  # e.g. no compiler toolchain: report, keep going
                print(f"{'+'.join(sorted(options)) or 'fp32 baseline':<28} failed: {e!r:.60}")
                continue
            saved = saved_bytes(loss) / 2**20
            base = base or sec
            label = "+".join(sorted(options)) or "fp32 baseline"
            print(f"{label:<28}{sec:>9.3f}{items / sec:>11.1f}{base / sec:>8.2f}{saved:>10.1f}")
    print("\nratio: baseline s/step / s/step (> 1 = faster)")


if __name__ == "__main__":
    main()
