"""Reference checkpoints -> ordinary vistok export folders.

    python -m vistok.convert llamagen-vq vq_ds16_c2i.pt --out vq16/
    python -m vistok.convert llamagen-gpt c2i_B_256.pt --tokenizer vq16/ --out gpt-b/
    python -m vistok.convert wetok WeTok.ckpt --ema --out wetok/
    python -m vistok.convert diffusers-vae path/to/sd-vae-ft-ema/ --out sd-vae/

The folder loads like any export (``vistok.load_tokenizer`` / ``vistok.load_generator``,
``sample.py``, ``extract_codes``, post-training). The architecture is read from the checkpoint's
shapes and validated; a checkpoint that fits no supported layout is refused, naming the first key
or shape that does not fit. Checkpoints are read with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from vistok.common.hub import parameter_count
from vistok.common.summary import closing_summary
from vistok.convert import diffusers_vae, wetok
from vistok.convert.common import ConversionError
from vistok.convert.llamagen import convert_gpt, convert_vq

Converter = Callable[..., Path]

# format name -> convert(checkpoint, out, **common.Options) -> folder
FORMATS: dict[str, Converter] = {
    "llamagen-vq": convert_vq,
    "llamagen-gpt": convert_gpt,
    "wetok": wetok.convert,
    "diffusers-vae": diffusers_vae.convert,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        allow_abbrev=False, prog="python -m vistok.convert", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("format", choices=sorted(FORMATS), help="the checkpoint's format")
    p.add_argument("checkpoint", help="the reference checkpoint file (or folder, per format)")
    p.add_argument("--out", required=True, help="export folder to write")
    p.add_argument("--ema", action="store_true", help="convert the checkpoint's EMA weights")
    p.add_argument("--tokenizer", help="generators: the converted tokenizer folder they model")
    p.add_argument(
        "--resolution", type=int, help="tokenizers: image size (default: the reference's, 256)"
    )
    args = p.parse_args(argv)
    if args.resolution is not None and args.resolution <= 0:
        p.error("--resolution must be positive")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    convert = FORMATS[args.format]
    try:
        folder = convert(
            args.checkpoint,
            args.out,
            ema=args.ema,
            tokenizer=args.tokenizer,
            resolution=args.resolution,
        )
    except (ConversionError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    files = ", ".join(sorted(f.name for f in Path(folder).iterdir() if f.is_file()))
    figures = {"parameters": f"{parameter_count(folder) / 1e6:.2f}M", "files": files}
    done = f"converted the {args.format} checkpoint {args.checkpoint}"
    print(closing_summary(done, figures, {"export folder": folder}))
    return folder


if __name__ == "__main__":
    main()
