"""``python -m vistok.convert FORMAT CHECKPOINT --out FOLDER``: a reference implementation's
checkpoint as an ordinary vistok export folder (see docs/parity_wetok.md)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from vistok.convert import diffusers_vae, wetok

FORMATS: dict[str, Callable[..., Path]] = {
    "wetok": wetok.convert,
    "diffusers-vae": diffusers_vae.convert,
}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m vistok.convert", description=__doc__)
    parser.add_argument("format", choices=sorted(FORMATS))
    parser.add_argument("checkpoint", help="the reference checkpoint file or folder")
    parser.add_argument("--out", required=True, help="export folder to write")
    parser.add_argument("--ema", action="store_true", help="take the checkpoint's EMA weights")
    parser.add_argument("--tokenizer", help="converted tokenizer folder (generator formats)")
    parser.add_argument("--resolution", type=int, help="image side (default: the reference's)")
    args = parser.parse_args(argv)
    try:
        folder = FORMATS[args.format](
            args.checkpoint,
            args.out,
            ema=args.ema,
            tokenizer=args.tokenizer,
            resolution=args.resolution,
        )
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {folder}")
    return folder


if __name__ == "__main__":
    main()
