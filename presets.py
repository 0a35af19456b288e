"""``python -m vistok.presets``: every named preset of every family, built on the meta device.

Columns: parameters (M), the reference's count where one is known, tokens and bits per token at
256 px, and the compression ratio 256*256*24 / (tokens * bits per token) of discrete codes.
Markdown, so ``docs/presets.md`` carries the output as is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from vistok.generators.ar import GPT, GPT_PRESETS
from vistok.generators.diffusion import DIT_PRESETS, FlowMatching
from vistok.tokenizers.binary import BINARY_PRESETS, BinaryTokenizer
from vistok.tokenizers.diffusers_vae import DIFFUSERS_VAE_PRESETS, DiffusersKL
from vistok.tokenizers.gaussian import KL_PRESETS, KLTokenizer
from vistok.tokenizers.gpstoken import GPSTOKEN_PRESETS, GPSToken
from vistok.tokenizers.titok import TOKENIZER_1D_PRESETS, Tokenizer1D
from vistok.tokenizers.vq import VQ_PRESETS, VQTokenizer
from vistok.tokenizers.wetok import WETOK_PRESETS, WeTok

RESOLUTION = 256


def _cited(source: str, family: str, **millions: float) -> dict[tuple[str, str], tuple[float, str]]:
    return {(family, name): (m, source) for name, m in millions.items()}


# Reference parameter counts (millions) and where they come from.
OFFICIAL: dict[tuple[str, str], tuple[float, str]] = {
    # Sums of the released state dicts' shapes (encoder + decoder; the GQ quantizer has no
    # weights), listed in ../shared/parity/wetok/official_shapes.json.
    **_cited(
        "released checkpoint",
        "WeTok",
        compratio24=448.405827,
        compratio48=447.881507,
        compratio192=460.294179,
        compratio768=1673.089059,
    ),
    # LlamaGen (arXiv 2406.06525) Table 2 / README: c2i GPT sizes with a 16384 codebook.
    **_cited("LlamaGen paper", "GPT", B=111.0, L=343.0, XL=775.0, XXL=1400.0),
    **_cited("LlamaGen paper (VQ-16)", "VQ", llamagen_vq16=72.0),
    # DiT (arXiv 2212.09748) Table 1, patch 2 on 32x32x4 SD-VAE latents.
    **_cited("DiT paper", "DiT", S=33.0, B=130.0, L=458.0, XL=675.0),
}
# The code space generators are counted against: LlamaGen VQ-16 codes / SD-VAE latents at 256 px.
VQ16 = dict(kind="index", channels=8, vocab_size=16384, groups=1, bits=0)
SD_LATENTS = dict(kind="continuous", channels=4, vocab_size=0, groups=1, bits=0)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def diffusers_count(preset: str) -> int:
    """diffusers' own AutoencoderKL built from the released config's shape."""
    from diffusers import AutoencoderKL

    p = DIFFUSERS_VAE_PRESETS[preset]
    n = len(p["block_out_channels"])
    with torch.device("meta"):
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(p["block_out_channels"]),
            layers_per_block=p["layers_per_block"],
            latent_channels=p["latent_channels"],
            use_quant_conv=p["use_quant_conv"],
            use_post_quant_conv=p["use_quant_conv"],
        )
    return count(vae)


def code_columns(tok) -> tuple[int, str, str]:
    """Tokens, bits per token and compression ratio at 256 px."""
    tokens = math.prod(tok.token_shape)
    cs = tok.code_space
    if cs.kind == "continuous":
        return tokens, f"{cs.channels} floats", "-"
    bits = math.log2(cs.vocab_size) if cs.kind == "index" else cs.bits
    shown = f"{bits:.3g}"
    if cs.kind == "groups":
        shown += f" ({cs.groups}x{cs.bits // cs.groups})"
    return tokens, shown, f"{RESOLUTION * RESOLUTION * 24 / (tokens * bits):.4g}"


TOKENIZERS: dict[str, tuple[dict, Callable[[str], nn.Module]]] = {
    "WeTok": (WETOK_PRESETS, lambda p: WeTok(preset=p, resolution=RESOLUTION)),
    "VQ": (VQ_PRESETS, lambda p: VQTokenizer(preset=p, resolution=RESOLUTION)),
    "Binary": (BINARY_PRESETS, lambda p: BinaryTokenizer(preset=p, resolution=RESOLUTION)),
    "KL": (KL_PRESETS, lambda p: KLTokenizer(preset=p, resolution=RESOLUTION)),
    "DiffusersKL": (DIFFUSERS_VAE_PRESETS, lambda p: DiffusersKL(preset=p, resolution=RESOLUTION)),
    "Tokenizer1D": (TOKENIZER_1D_PRESETS, lambda p: Tokenizer1D(preset=p, resolution=RESOLUTION)),
    "GPSToken": (GPSTOKEN_PRESETS, lambda p: GPSToken(preset=p, resolution=RESOLUTION)),
}
GENERATORS: dict[str, tuple[dict, Callable[[str], nn.Module]]] = {
    "GPT": (GPT_PRESETS, lambda p: GPT(VQ16, [16, 16], 1000, preset=p)),
    "DiT": (DIT_PRESETS, lambda p: FlowMatching(SD_LATENTS, [32, 32], 1000, preset=p)),
}


def rows() -> Iterator[list[str]]:
    for family, (presets, build) in {**TOKENIZERS, **GENERATORS}.items():
        for name in presets:
            with torch.device("meta"):
                model = build(name)
            official = OFFICIAL.get((family, name))
            if family == "DiffusersKL":
                official = (diffusers_count(name) / 1e6, "diffusers AutoencoderKL")
            ref = f"{official[0]:.2f} ({official[1]})" if official else ""
            if family in GENERATORS:
                grid = "16x16 VQ-16 codes" if family == "GPT" else "32x32x4 SD-VAE latents"
                cols = (grid, "", "")
            else:
                cols = code_columns(model)
            yield [family, name, f"{count(model) / 1e6:.2f}", ref, *map(str, cols)]


def table() -> str:
    head = ["family", "preset", "params (M)", "reference (M)", "tokens", "bits/token", "ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
