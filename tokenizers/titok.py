"""1D tokenizers: an image becomes K tokens in a sequence, not a grid.

- TiTok (Yu et al. 2024, https://arxiv.org/abs/2406.07550): ViT encoder over [patches, K latent
  tokens], l2-normalised VQ 4096 x 12, ViT decoder from mask tokens on the patch grid. Paper
  rFID (ImageNet 256): L32 2.21, B64 1.70, S128 1.71.
- FlexTok (Bachmann et al. 2025, https://arxiv.org/abs/2502.13967): ordered tokens of flexible
  length. Causal attention among the latents plus nested dropout (keep the first k tokens, replace
  the rest by a learned token; k uniform or a power of two), FSQ codes; any prefix decodes. The
  paper's decoder is a rectified-flow model; here it is the same ViT decoder as TiTok's.
- MAETok (Chen et al. 2025, https://arxiv.org/abs/2502.03444): a plain autoencoder (identity
  quantizer, continuous latents) whose encoder trains with mask modeling: ``mask_ratio`` (lo, hi)
  replaces a random share of the patch tokens by a learned mask token, the share drawn per batch;
  the auxiliary feature decoders live on the training side (``vistok.tokenizers.mask_modeling``).
  Paper: rFID 0.48, SiT-XL gFID 1.67 on ImageNet 256 with 128 tokens.
- 1D binary (Instella-T2I, Wang et al. 2025, https://arxiv.org/abs/2506.21022): 128 latent tokens
  of 64 Bernoulli bits each, for the binary-head AR generator or Bernoulli diffusion.

``channels`` (the transformer width) and ``num_res_blocks`` (transformer blocks in each of the
encoder and the decoder) share their names with the CNN families so that one size override,
``presets/cpu_small.yaml``, shrinks every tokenizer.
"""

from __future__ import annotations

import math
from typing import Literal, TypedDict

import torch
from torch import Tensor
from typing_extensions import Unpack

from vistok.tokenizers.nets.vit import ViTDecoder, ViTEncoder
from vistok.tokenizers.quantizers.base import Quantizer
from vistok.tokenizers.quantizers.bernoulli import BernoulliQuantizer
from vistok.tokenizers.quantizers.fsq import FSQ
from vistok.tokenizers.quantizers.gaussian import DiagonalGaussian
from vistok.tokenizers.quantizers.identity import Identity
from vistok.tokenizers.quantizers.vq import VectorQuantizer
from vistok.tokenizers.tokenizer import Tokenizer, resolve_preset

QuantizerName = Literal["vq", "fsq", "bernoulli", "kl", "identity"]
NestedDropout = Literal["none", "uniform", "pow2"]


def sample_num_tokens(
    batch: int, num_latents: int, mode: NestedDropout, generator=None, device=None
) -> Tensor | None:
    """Per-sample prefix lengths k (B,) for nested dropout; None when ``mode`` is "none".

    "uniform": k uniform on 1..K; "pow2": k uniform on {1, 2, 4, ..., K} (K itself is always a
    choice, a power of two or not).
    """
    if mode == "none":
        return None
    if mode == "uniform":
        choices = torch.arange(1, num_latents + 1)
    elif mode == "pow2":
        choices = torch.tensor(prefix_lengths(num_latents))
    else:
        raise ValueError(f"nested_dropout must be 'none', 'uniform' or 'pow2', got {mode!r}")
    pick = torch.randint(len(choices), (batch,), generator=generator)
    return choices[pick].to(device)


def prefix_lengths(num_latents: int) -> list[int]:
    """1, 2, 4, ... up to and including ``num_latents``: the prefix lengths FlexTok evaluates."""
    lengths = [2**i for i in range(int(math.log2(num_latents)) + 1)]
    return lengths if lengths[-1] == num_latents else [*lengths, num_latents]


def _quantizer(name: QuantizerName, cfg: dict) -> Quantizer:
    if name == "vq":
        return VectorQuantizer(
            dim=cfg["code_dim"],
            codebook_size=cfg["codebook_size"],
            l2_normalize=True,
            commitment_weight=0.25,
            ema_decay=cfg["ema_decay"],
            dead_code_threshold=cfg["dead_code_threshold"],
            restart_every=cfg["restart_every"],
        )
    if name == "fsq":
        return FSQ(levels=cfg["levels"])
    if name == "bernoulli":
        return BernoulliQuantizer(bits=cfg["bits"], temperature=cfg["temperature"])
    if name == "kl":
        return DiagonalGaussian(channels=cfg["code_dim"], kl_weight=cfg["kl_weight"])
    if name == "identity":
        return Identity(channels=cfg["code_dim"])
    raise ValueError(f"quantizer must be one of vq, fsq, bernoulli, kl, identity; got {name!r}")


# --- presets (256 px) -------------------------------------------------------------------------
_S = dict(channels=512, num_res_blocks=8, num_heads=8)  # TiTok's "S" (their ViT-S is 512 wide)
_B = dict(channels=768, num_res_blocks=12, num_heads=12)
_L = dict(channels=1024, num_res_blocks=24, num_heads=16)
_VQ = dict(quantizer="vq", codebook_size=4096, code_dim=12)

TOKENIZER_1D_PRESETS: dict[str, dict] = {
    "titok_l32": dict(**_L, **_VQ, num_latents=32),
    "titok_b64": dict(**_B, **_VQ, num_latents=64),
    "titok_s128": dict(**_S, **_VQ, num_latents=128),
    "titok_kl_b64": dict(_B, quantizer="kl", code_dim=16, num_latents=64),
    # FSQ levels [8, 8, 8, 5, 5, 5]: 64,000 codes, FlexTok's choice.
    "flextok_b256": dict(
        _B,
        quantizer="fsq",
        levels=[8, 8, 8, 5, 5, 5],
        num_latents=256,
        nested_dropout="pow2",
        causal_latents=True,
    ),
    "binary_b128": dict(_B, quantizer="bernoulli", bits=64, num_latents=128, temperature=0.1),
    # MAETok: ViT-B both sides, 128 tokens of 32 plain channels, 40-60% of patches masked.
    "maetok_b128": dict(
        _B, quantizer="identity", code_dim=32, num_latents=128, mask_ratio=[0.4, 0.6]
    ),
}

_DEFAULTS = dict(
    patch_size=16,
    codebook_size=4096,
    code_dim=12,
    levels=[8, 8, 8, 5, 5, 5],
    bits=64,
    temperature=1.0,
    kl_weight=1e-6,
    ema_decay=None,
    dead_code_threshold=0.0,
    restart_every=0,
    nested_dropout="none",
    causal_latents=False,
    mlp_ratio=4.0,
    mask_ratio=None,
)


class Tokenizer1DArgs(TypedDict, total=False):
    """Every value a preset sets, each overridable (absent: the preset's, then ``_DEFAULTS``)."""

    channels: int  # transformer width
    num_res_blocks: int  # transformer blocks in the encoder and in the decoder
    num_heads: int
    patch_size: int
    num_latents: int
    quantizer: QuantizerName
    codebook_size: int
    code_dim: int
    levels: list[int]
    bits: int
    temperature: float
    kl_weight: float
    ema_decay: float | None
    dead_code_threshold: float
    restart_every: int
    nested_dropout: NestedDropout
    causal_latents: bool
    mlp_ratio: float
    mask_ratio: tuple[float, float] | None


class Tokenizer1D(Tokenizer):
    """ViT encoder -> K latent tokens -> any quantizer -> ViT decoder; codes laid out (B, K, ...).

    ``token_shape`` is ``(K,)``: the AR generator uses 1D RoPE over it. In training mode, with
    ``nested_dropout`` set, each image of a batch is decoded from a random prefix of its tokens;
    ``decode(latents, num_tokens=k)`` decodes from the first k at any time. Quantizer arguments
    that do not apply to the chosen quantizer (``codebook_size`` for FSQ, ...) are unused, so
    configs can stack on one another.
    """

    def __init__(
        self,
        preset: str = "titok_b64",
        resolution: int = 256,
        **sizes: Unpack[Tokenizer1DArgs],
    ):
        cfg = {**_DEFAULTS, **resolve_preset(TOKENIZER_1D_PRESETS, preset, **sizes)}
        width = cfg["channels"]
        heads = cfg.get("num_heads")
        if sizes.get("num_heads") is None and (heads is None or width % heads):
            heads = max(1, width // 64)  # a narrowed preset keeps 64-wide heads
        if width % heads:
            raise ValueError(f"channels={width} is not divisible by num_heads={heads}")
        q = _quantizer(cfg["quantizer"], cfg)
        nets = dict(
            image_size=resolution,
            patch_size=cfg["patch_size"],
            width=width,
            depth=cfg["num_res_blocks"],
            num_heads=heads,
            num_latents=cfg["num_latents"],
            mlp_ratio=cfg["mlp_ratio"],
        )
        # The encoder emits what the quantizer takes; the decoder embeds the quantized codes.
        encoder = ViTEncoder(
            **nets,
            z_channels=q.in_channels,
            causal_latents=cfg["causal_latents"],
            mask_ratio=cfg["mask_ratio"],
        )
        decoder = ViTDecoder(**nets, z_channels=q.code_space.channels)
        if cfg["nested_dropout"] == "none":
            # Training never drops a latent, so the token standing for dropped ones never gets a
            # gradient: frozen, so that every trainable parameter gets one in each step (DDP
            # without find_unused_parameters). It stays in the state dict (prefix decoding).
            decoder.dropped_token.requires_grad_(False)
        super().__init__(encoder, q, decoder, resolution)
        self.num_latents = cfg["num_latents"]
        self.nested_dropout: NestedDropout = cfg["nested_dropout"]

    @property
    def token_shape(self) -> tuple[int, ...]:
        return (self.num_latents,)

    @property
    def prefix_lengths(self) -> list[int]:
        return prefix_lengths(self.num_latents)

    @property
    def masks_patches(self) -> bool:
        """Whether the encoder trains with mask modeling (MAETok)."""
        return self.encoder.mask_ratio is not None

    def sample_patch_mask(self, batch: int, generator=None, device=None) -> Tensor:
        """A random (B, N) patch mask, True = masked, at the encoder's ``mask_ratio``."""
        return self.encoder.sample_mask(batch, generator, device)

    def pre_quant(self, images: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """Images -> what the quantizer takes (B, C_q, K); ``patch_mask`` (B, N) masks patches."""
        return self.proj_in(self.encoder(images, patch_mask=patch_mask))

    def decode(
        self,
        latents: Tensor,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        num_tokens: Tensor | int | None = None,
    ) -> Tensor:
        """Quantized latents (B, C, K) -> images; only the first ``num_tokens`` are used.

        Without ``num_tokens``, training mode samples one prefix length per image (nested
        dropout, when enabled) and eval mode uses all K.
        """
        if noise is not None:
            raise ValueError("the 1D ViT decoder takes no noise input")
        if num_tokens is None and self.training:
            num_tokens = sample_num_tokens(
                latents.shape[0], self.num_latents, self.nested_dropout, device=latents.device
            )
        return self.decoder(self.proj_out(latents), num_tokens=num_tokens)

    @torch.no_grad()
    def detokenize(
        self,
        codes: Tensor,
        generator: torch.Generator | None = None,
        num_tokens: int | None = None,
    ) -> Tensor:
        return self.decode(self.quantizer.codes_to_latents(codes), num_tokens=num_tokens)

    def describe(self) -> dict:
        info = super().describe()
        info.update(nested_dropout=self.nested_dropout, prefix_lengths=self.prefix_lengths)
        if self.masks_patches:
            info["mask_ratio"] = list(self.encoder.mask_ratio)
        return info
