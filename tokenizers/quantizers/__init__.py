"""Quantizers: one method per file, one return type (``QuantizerOutput``) for all."""

from vistok.tokenizers.quantizers.base import CodeSpace, Perturbation, Quantizer, QuantizerOutput
from vistok.tokenizers.quantizers.bernoulli import BernoulliQuantizer
from vistok.tokenizers.quantizers.fsq import FSQ
from vistok.tokenizers.quantizers.gaussian import DiagonalGaussian
from vistok.tokenizers.quantizers.identity import Identity
from vistok.tokenizers.quantizers.lfq import LFQ
from vistok.tokenizers.quantizers.vq import VectorQuantizer

__all__ = [
    "BernoulliQuantizer",
    "CodeSpace",
    "DiagonalGaussian",
    "FSQ",
    "Identity",
    "LFQ",
    "Perturbation",
    "Quantizer",
    "QuantizerOutput",
    "VectorQuantizer",
]
