"""The benchmark table for tokenizers trained here: four families, one budget, one protocol.

    python bench/tokenizer_table.py [--steps 400] [--num-images 256] [--out runs/bench_table]

Trains, through the real ``train.py`` CLI, one tokenizer per family on the embedded dataset with
``make train``'s CPU recipe (``presets/cpu_demo.yaml``: 64 px, 4x downsampling so 16x16 tokens,
32-channel CNN, L1 only, lr 2e-3 cosine, EMA 0.99), changing only the bottleneck:

- ``wetok``: group-wise lookup-free, 8 groups x 8 bits (``make train``'s model itself);
- ``vq``: a 4096 x 8 l2-normalised codebook (12 bits per token);
- ``binary``: 16 Bernoulli bits per token;
- ``kl``: a 4-channel Gaussian latent (continuous: no pFID).

Then runs ``python -m vistok.evaluation.benchmark`` on the four checkpoints over the embedded
validation split and prints its table (also in ``<out>/benchmark/benchmark.md``, with the JSON and
the pFID plots beside it). A family whose checkpoint is already in ``<out>`` is not retrained.
These are minutes-old CPU tokenizers at 64 px: the table shows the protocol and how the families
compare at equal training, not paper-scale numbers.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from vistok.data.default_dataset import default_shards

ROOT = Path(__file__).resolve().parent.parent
_TOK = "--model.init_args.tokenizer.init_args."
FAMILIES: dict[str, list[str]] = {
    "wetok": ["tokenizer/wetok.yaml"],
    "vq": ["tokenizer/vq.yaml", f"{_TOK}preset=f16_c4096", f"{_TOK}codebook_size=4096"],
    "binary": ["tokenizer/binary.yaml", f"{_TOK}preset=f8_b16", f"{_TOK}bits=16"],
    "kl": ["tokenizer/kl.yaml", f"{_TOK}preset=kl_f8c4", f"{_TOK}latent_channels=4"],
}


def train(family: str, steps: int, out: Path) -> Path:
    """The family's last checkpoint, trained now unless it is already there."""
    ckpt = out / family / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        print(f"{family}: reusing {ckpt}")
        return ckpt
    config, *overrides = FAMILIES[family]
    cmd = [sys.executable, "train.py", "--config", config, "--config", "presets/cpu_demo.yaml"]
    cmd += [*overrides, f"{_TOK}channel_mult=[1,2,4]", f"--trainer.max_steps={steps}"]
    cmd += [f"--trainer.val_check_interval={steps}", f"--run_dir={out / family}"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"{family}: {steps} steps in {time.perf_counter() - start:.0f} s (set-up included)")
    return ckpt


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400, help="training steps per family")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--num-images", type=int, default=256, help="validation images evaluated")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_table")
    args = p.parse_args()
    ckpts = [train(f, args.steps, args.out.resolve()) for f in args.families]
    cmd = [sys.executable, "-m", "vistok.evaluation.benchmark", "--tokenizers", *map(str, ckpts)]
    cmd += ["--data", default_shards("val"), "--num-images", str(args.num_images)]
    cmd += ["--batch-size", "16", "--num-workers", "1", "--out", str(args.out / "benchmark")]
    subprocess.run(cmd, cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
