"""AR sampling speed: forward passes per image and wall time of plain decoding (prefix recomputed
at every step), KV-cache decoding, and speculative Jacobi decoding (exact and LANTERN-relaxed),
same model, same sampling settings, printed side by side.

    python bench/ar_sampling.py --generator runs/bench_ar/gen/checkpoints/last.ckpt
    python bench/ar_sampling.py --prepare runs/bench_ar      # trains that GPT first (CPU)
    python bench/ar_sampling.py --random [--preset S --side 16 --vocab 16384]  # untrained GPT

``--prepare`` runs the real CLIs on the embedded dataset: a VQ tokenizer at 64 px with f4
downsampling (16 x 16 = 256 tokens, 1024 codes), code extraction, then a GPT-S on those codes
(short schedules: a few minutes each on an idle 2-core CPU).
With a checkpoint, the relaxed mode takes its neighbourhoods from the generator's tokenizer, and
``--fid N`` adds the gFID of N samples of each mode against the embedded validation split.

Every verification pass of speculative decoding counts as one forward pass; plain and KV-cache
decoding take one pass per token. "passes/img" is passes per batch (the batch is decoded
together, so it is also what one image waits for).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from vistok.generators.ar import GPT
from vistok.generators.checkpoint import load_generator
from vistok.generators.gfid import fid_unavailable, make_fid
from vistok.generators.inference import add_sampling_args, ar_config
from vistok.generators.sampling import generate
from vistok.generators.speculative import Neighbours, SpeculativeConfig, speculative_generate
from vistok.tokenizers.checkpoint import resolve_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def prepare(folder: Path, tok_steps: int, gen_steps: int) -> Path:
    """Tokenizer -> codes -> GPT through the real CLIs; returns the GPT checkpoint."""
    tok_ckpt = folder / "tok" / "checkpoints" / "last.ckpt"
    gen_ckpt = folder / "gen" / "checkpoints" / "last.ckpt"
    py = [sys.executable]
    if not tok_ckpt.is_file():
        tok = {"resolution": 64, "channels": 32, "num_res_blocks": 1, "codebook_size": 1024}
        _run(
            [
                *py,
                "train.py",
                "--config=tokenizer/vq.yaml",
                "--config=presets/cpu_small.yaml",
                *[f"--model.init_args.tokenizer.init_args.{k}={v}" for k, v in tok.items()],
                "--model.init_args.tokenizer.init_args.channel_mult=[1, 2, 2]",
                "--model.init_args.loss.init_args.perceptual_weight=0",
                "--model.init_args.loss.init_args.gan_weight=0",
                f"--trainer.max_steps={tok_steps}",
                f"--trainer.val_check_interval={tok_steps}",
                f"--run_dir={folder / 'tok'}",
            ]
        )
    codes = folder / "codes"
    if not (codes / "meta.json").is_file() or "val" not in (codes / "meta.json").read_text():
        for split, extra in (("train", ["--flip"]), ("val", [])):
            _run(
                [
                    *py,
                    "-m",
                    "vistok.data.extract_codes",
                    f"--tokenizer={tok_ckpt}",
                    f"--out={codes}",
                    f"--split={split}",
                    "--num-workers=0",
                    "--device=cpu",
                    *extra,
                ]
            )
    if not gen_ckpt.is_file():
        _run(
            [
                *py,
                "train.py",
                "--config=generator/ar_cpu_small.yaml",
                f"--model.init_args.tokenizer={tok_ckpt}",
                f"--data.init_args.root={codes}",
                "--data.init_args.num_workers=0",
                "--data.init_args.batch_size=8",
                "--model.init_args.sample_images=0",
                f"--trainer.max_steps={gen_steps}",
                f"--trainer.val_check_interval={gen_steps}",
                f"--run_dir={folder / 'gen'}",
            ]
        )
    return gen_ckpt


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--generator", help="AR generator checkpoint (.ckpt) or exported folder")
    p.add_argument("--prepare", help="folder: train tokenizer + GPT on the embedded data first")
    p.add_argument("--tok-steps", type=int, default=200)
    p.add_argument("--gen-steps", type=int, default=150)
    p.add_argument("--random", action="store_true", help="an untrained GPT (--preset, --vocab)")
    p.add_argument("--preset", default="S")
    p.add_argument("--side", type=int, default=16)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--batches", type=int, default=4, help="batches timed per mode")
    p.add_argument("--cfg", type=float, default=2.0)
    add_sampling_args(p)  # the rest of sample.py's AR sampling flags
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--lantern-k", type=int, default=1000)
    p.add_argument("--lantern-delta", type=float, default=0.1)
    p.add_argument("--no-recompute", action="store_true", help="skip the slow plain decoding")
    p.add_argument("--fid", type=int, default=0, help="gFID of this many samples per mode")
    # One thread by default: on a shared, oversubscribed CPU a second OpenMP thread makes the
    # tiny per-token matmuls of cached decoding wait on each other (measured 10x slower here).
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    tokenizer = None
    if a.prepare:
        a.generator = str(prepare(Path(a.prepare), a.tok_steps, a.gen_steps))
    if a.generator:
        gen = load_generator(a.generator)
        model = gen.gpt
        tokenizer = resolve_tokenizer(gen.hparams["tokenizer_identity"]).tokenizer
        neighbours = Neighbours.from_tokenizer(tokenizer, a.lantern_k)
        name = f"{a.generator} (trained)"
    elif a.random:
        space = {"kind": "index", "vocab_size": a.vocab, "channels": 8}
        model = GPT(space, [a.side, a.side], num_classes=10, preset=a.preset).eval()
        torch.nn.init.normal_(model.head.out.weight, std=0.02)  # non-uniform logits
        neighbours = Neighbours.from_latents(torch.randn(a.vocab, 8), a.lantern_k)
        name = f"untrained GPT-{a.preset}"
    else:
        p.error("give --generator, --prepare or --random")
    classes = max(model.num_classes, 1)
    cfg = a.cfg if model.num_classes else 1.0
    config = ar_config(a, cfg)
    exact = SpeculativeConfig(window=a.window)
    relaxed = SpeculativeConfig(
        window=a.window, relaxed="lantern", lantern_k=a.lantern_k, lantern_delta=a.lantern_delta
    )
    modes = {
        "plain (recompute)": lambda lab, g: (generate(model, lab, config, g, False), None),
        "KV cache": lambda lab, g: (generate(model, lab, config, g), None),
        "speculative exact": lambda lab, g: speculative_generate(model, lab, config, g, exact),
        "speculative LANTERN": lambda lab, g: speculative_generate(
            model, lab, config, g, relaxed, neighbours
        ),
    }
    if a.no_recompute:
        modes.pop("plain (recompute)")
    n = model.num_tokens
    params = sum(q.numel() for q in model.parameters()) / 1e6
    print(
        f"{name}: {params:.1f}M params, {n} tokens, vocab {model.head.vocab}, batch {a.batch} x "
        f"{a.batches}, cfg {cfg}, temperature {a.temperature}, top-k {a.top_k}, top-p {a.top_p}, "
        f"window {a.window}, LANTERN k {a.lantern_k} delta {a.lantern_delta}, "
        f"{torch.get_num_threads()} threads"
    )
    modes["KV cache"](torch.zeros(1, dtype=torch.long), torch.Generator().manual_seed(0))  # warm-up
    rows = []
    for mode, fn in modes.items():
        seconds, passes, stats = 0.0, 0, None
        for j in range(a.batches):
            labels = (torch.arange(a.batch) + j * a.batch) % classes
            dt, (codes, st) = timed(fn, labels, torch.Generator().manual_seed(j))
            seconds += dt
            passes += st.forward_passes if st is not None else n
            stats = st if stats is None else (stats + st if st is not None else None)
        rate = f"{stats.acceptance_rate:.3f}" if stats is not None else "-"
        rows.append((mode, passes / a.batches, seconds / (a.batch * a.batches), rate))
        print(f"  done: {mode}", flush=True)
    print(f"{'mode':<22}{'passes/img':>12}{'x fewer':>9}{'s/img':>9}{'x faster':>10}{'accept':>8}")
    base_t = dict((r[0], r[2]) for r in rows)["KV cache"]
    for mode, passes, sec, rate in rows:
        fewer, faster = n / passes, base_t / sec
        print(f"{mode:<22}{passes:>12.1f}{fewer:>9.2f}{sec:>9.3f}{faster:>10.2f}{rate:>8}")
    print("x fewer: plain passes (one per token) / passes; x faster: KV-cache time / time")
    if a.fid and tokenizer is not None:
        report_fid(model, tokenizer, config, modes, a)


def report_fid(model, tokenizer, config, modes, a) -> None:
    """gFID of ``a.fid`` samples per mode against the embedded validation split."""
    skipped = fid_unavailable()
    if skipped:
        print(f"gFID skipped: {skipped}")
        return
    classes = max(model.num_classes, 1)
    for mode in ("KV cache", "speculative exact", "speculative LANTERN"):
        fid, _ = make_fid(None, tokenizer.resolution, torch.device("cpu"), None, 0, 1)
        for j, start in enumerate(range(0, a.fid, 16)):
            labels = torch.arange(start, min(start + 16, a.fid)) % classes
            codes, _ = modes[mode](labels, torch.Generator().manual_seed(10_000 + j))
            fid.update(tokenizer.detokenize(codes).float().clamp(-1, 1), real=False)
        print(f"gFID ({a.fid} samples, embedded val reference): {mode:<22}{fid.compute():8.2f}")


if __name__ == "__main__":
    main()
