"""pFID: FID of reconstructions decoded from perturbed codes (RobusTok's robustness metric).

RobusTok (Qiu et al. 2025, "Robust Latent Matters", https://arxiv.org/abs/2503.08354) reports
pFID next to rFID and finds that it tracks the generation FID of a downstream generator (Spearman
rho > 0.95) where rFID does not; their code for it was never released, so the exact perturbation
parameters and averaging are unknown. This is the definition used here, stated so that every
number can be reproduced:

    pFID@s = FID( { decode(codes_to_latents(perturb(codes_i, s, g_i(s), latents_i))) }_i ,
                  { x_i }_i )

over the N evaluated validation images x_i, where ``latents_i = pre_quant(x_i)`` and
``codes_i = quantizer(latents_i).codes`` with the tokenizer in eval mode. ``perturb`` is the
quantizer's own RobusTok rule at strength s (RobusTok's annealing ratio: alpha = s, delta =
int(100 s)), documented in each quantizer:

- VQ (``quantizers/vq.py``): with probability alpha a token is replaced by a uniform pick among its
  delta nearest codebook entries (the own code counts as the first, so the change rate is
  alpha (delta - 1) / delta);
- LFQ / WeTok group-wise LFQ (``quantizers/lfq.py``) and Bernoulli bits
  (``quantizers/bernoulli.py``): with probability alpha, each of a token's k = round(log2 delta)
  least-confident bits (smallest |latent|) flips with probability 1/2, a uniform pick among its
  2**k Hamming neighbours;
- FSQ (``quantizers/fsq.py``): the same on its round(log2 delta) channels nearest a rounding
  boundary, each moving one level.

``g_i(s)`` is a ``torch.Generator`` seeded from ``(seed, s, key_i)`` alone (``image_seed``), where
``key_i`` is the image's dataset key: every image gets the same draw whatever the batch size,
data-loader workers or number of processes, so a 2-process evaluation equals a 1-process one and
two runs of the same checkpoint give the same numbers. The reference is the Inception statistics
of the same N original images that rFID uses, so pFID@0 = rFID exactly. Decoders that take noise
(WeTok generative decoding) get the same per-image noise, seeded from ``(seed, key_i)``, for the
reconstruction and for every strength, so the strengths differ only in their codes.

Headline strength 0.5: RobusTok's training schedule anneals the ratio from 1 to 0.5, so s = 0.5
(alpha 0.5, delta 50: about half the tokens moved to one of their 49 nearest codes) is the
strongest perturbation a RobusTok decoder is trained for at the end of training, and s = 1
(alpha 1, delta 100) the one it starts with. A curve over strengths is reported next to it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from vistok.tokenizers.tokenizer import Tokenizer


def image_seed(seed: int, tag: str | float, key: str) -> int:
    """A 63-bit seed from (seed, tag, image key), stable across processes and Python runs
    (``hash()`` of a string is salted per interpreter)."""
    digest = hashlib.sha256(f"{seed}|{tag}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def strength_tag(strength: float) -> str:
    """How a strength is written in seeds and metric names: ``0.5``, ``1``, ``0.25``."""
    return f"{float(strength):g}"


def _generator(seed: int) -> torch.Generator:
    # CPU generators: the quantizers draw on the generator's device and move the draws, so the
    # numbers do not depend on the accelerator.
    return torch.Generator().manual_seed(seed)


def perturb_codes(
    tokenizer: Tokenizer,
    codes: Tensor,
    latents: Tensor,
    strength: float,
    keys: Sequence[str],
    seed: int,
) -> Tensor:
    """Each image's codes perturbed with its own generator (see the module docstring).

    codes: (B, *S[, G or bits]) as the quantizer returned them; latents: (B, C_q, *S), the
    quantizer's input. One ``perturb`` call per image keeps every draw independent of batching.
    """
    if len(keys) != codes.shape[0]:
        raise ValueError(f"{len(keys)} keys for {codes.shape[0]} images")
    quantizer = tokenizer.quantizer
    tag = strength_tag(strength)
    out = [
        quantizer.perturb(
            codes[i : i + 1], strength, _generator(image_seed(seed, tag, k)), latents[i : i + 1]
        )
        for i, k in enumerate(keys)
    ]
    return torch.cat(out)  # same layout as codes


def decoder_noise(
    tokenizer: Tokenizer, quantized: Tensor, keys: Sequence[str], seed: int
) -> Tensor | None:
    """Per-image noise (B, noise_channels, h, w) for decoders that take it, else None."""
    channels = getattr(tokenizer.decoder, "noise_channels", 0)
    if not channels:
        return None
    shape = (1, channels, *quantized.shape[2:])
    noise = [torch.randn(shape, generator=_generator(image_seed(seed, "noise", k))) for k in keys]
    return torch.cat(noise).to(quantized.device, quantized.dtype)


@torch.no_grad()
def reconstruct_with_perturbations(
    tokenizer: Tokenizer,
    images: Tensor,
    keys: Sequence[str],
    strengths: Sequence[float],
    seed: int = 0,
):
    """Reconstruction and perturbed reconstructions of a batch, as pFID defines them.

    images: (B, 3, H, W) in [-1, 1]. Returns ``(recon, perturbed, out)``: recon (B, 3, H, W)
    decoded from the unperturbed codes, ``perturbed[strength]`` (B, 3, H, W) for each strength
    (empty for continuous tokenizers), and the ``QuantizerOutput``. Outputs are float, clamped
    to [-1, 1]. The tokenizer should be in eval mode (deterministic codes).
    """
    latents = tokenizer.pre_quant(images)  # (B, C_q, h, w)
    out = tokenizer.quantizer(latents)
    noise = decoder_noise(tokenizer, out.quantized, keys, seed)
    finish = lambda x: x.float().clamp(-1, 1)
    recon = finish(tokenizer.decode(out.quantized, noise=noise))
    perturbed: dict[float, Tensor] = {}
    if tokenizer.code_space.kind == "continuous":
        return recon, perturbed, out
    for s in strengths:
        codes = perturb_codes(tokenizer, out.codes, latents, s, keys, seed)
        z = tokenizer.quantizer.codes_to_latents(codes).to(out.quantized.dtype)  # (B, C, h, w)
        perturbed[s] = finish(tokenizer.decode(z, noise=noise))
    return recon, perturbed, out
