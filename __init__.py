"""vistok: visual tokenizers and the generators that work in their latent space.

from vistok import load_tokenizer
tok = load_tokenizer("exported/wetok")   # an exported folder, a Hub repo id, or a .ckpt
"""

from __future__ import annotations

__version__ = "0.1.0"


def load_tokenizer(src: str, device: str = "cpu", ema: bool = True):
    """A frozen tokenizer in eval mode from an exported folder, a Hub repo id or a training
    checkpoint (``.ckpt``; its EMA weights when ``ema`` and present)."""
    if str(src).endswith(".ckpt"):
        from vistok.data.codes import read_tokenizer

        return read_tokenizer(src, ema=ema, device=device).tokenizer
    from vistok.common.hub import load_pretrained

    return load_pretrained(src, kind="tokenizer", device=device)[0]


def load_generator(src: str, device: str = "cpu", ema: bool | None = None):
    """(generator, tokenizer), frozen, from an exported folder, a Hub repo id or a training
    checkpoint; the tokenizer is the one the generator was trained with (checked by hash)."""
    from vistok.generators.inference import load_generator as load
    from vistok.generators.inference import resolve_tokenizer

    gen = load(src, ema=ema, device=device)
    return gen.model, resolve_tokenizer(gen.hparams["tokenizer_identity"], device=device).tokenizer
