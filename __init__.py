"""vistok: visual tokenizers and the generators that work in their latent space.

from vistok import load_tokenizer
tok = load_tokenizer("exported/wetok")   # an exported folder, a Hub repo id, or a .ckpt
"""

from __future__ import annotations

from vistok.common.version import package_version

__version__ = package_version()


def load_tokenizer(src: str, device: str = "cpu", ema: bool = True):
    """A frozen tokenizer in eval mode from an exported folder, a Hub repo id or a training
    checkpoint (``.ckpt``; its EMA weights when ``ema`` and present)."""
    from vistok.tokenizers.checkpoint import (
        read_tokenizer,  # `import vistok` stays light (no torch)
    )

    return read_tokenizer(src, ema=ema, device=device).tokenizer


def load_generator(src: str, device: str = "cpu", ema: bool | None = None):
    """(generator, tokenizer), frozen, from an exported folder, a Hub repo id or a training
    checkpoint; the tokenizer is the one the generator was trained with (checked by hash)."""
    from vistok.generators.checkpoint import load_generator as load  # `import vistok` stays light
    from vistok.tokenizers.checkpoint import resolve_tokenizer  # `import vistok` stays light

    gen = load(src, ema=ema, device=device)
    return gen.model, resolve_tokenizer(gen.hparams["tokenizer_identity"], device=device).tokenizer
