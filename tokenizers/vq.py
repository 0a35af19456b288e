"""VQ tokenizer: CNN encoder/decoder around a vector quantizer (VQGAN / LlamaGen VQ).

LlamaGen's VQ-16 (https://arxiv.org/abs/2406.06525): f16, 16384 codes of dim 8, l2-normalised
codebook, commitment 0.25; rFID 2.19 at 256 px on ImageNet val (their paper, Table 2).

``llamagen_vq16`` / ``llamagen_vq8`` are LlamaGen's networks exactly (taming layout: attention
after every ResBlock of the lowest-resolution level, asymmetric downsampling padding, 32 GroupNorm
groups, one more ResBlock per decoder level); a released LlamaGen checkpoint converted with
``python -m vistok.convert llamagen-vq`` fills them with no key missing or left over, and gives
LlamaGen's outputs (``tests/test_parity_llamagen.py``). The ``f*_c*`` presets are vistok's own
lighter layout of the same sizes.
"""

from __future__ import annotations

from typing_extensions import Unpack

from vistok.tokenizers.quantizers.vq import VectorQuantizer
from vistok.tokenizers.tokenizer import ConvArgs, Tokenizer, conv_nets, resolve_preset

_CNN = dict(channels=128, num_res_blocks=2, z_channels=256, mid_attention=True)
# LlamaGen's VQModel (tokenizer/tokenizer_image/vq_model.py) in the taming layout.
_LLAMAGEN = dict(
    _CNN,
    norm_groups=32,
    level_attention=True,
    down_padding="asymmetric",
    decoder_res_blocks=3,
    codebook_size=16384,
    codebook_dim=8,
)

VQ_PRESETS: dict[str, dict] = {
    "f16_c16384": dict(_CNN, channel_mult=[1, 1, 2, 2, 4], codebook_size=16384, codebook_dim=8),
    "f8_c16384": dict(_CNN, channel_mult=[1, 2, 2, 4], codebook_size=16384, codebook_dim=8),
    "f16_c4096": dict(_CNN, channel_mult=[1, 1, 2, 2, 4], codebook_size=4096, codebook_dim=8),
    "llamagen_vq16": dict(_LLAMAGEN, channel_mult=[1, 1, 2, 2, 4]),
    "llamagen_vq8": dict(_LLAMAGEN, channel_mult=[1, 2, 2, 4]),
}


class VQArgs(ConvArgs, total=False):
    codebook_size: int
    codebook_dim: int


class VQTokenizer(Tokenizer):
    def __init__(
        self,
        preset: str = "f16_c16384",
        resolution: int = 256,
        l2_normalize: bool = True,
        commitment_weight: float = 0.25,
        ema_decay: float | None = None,
        dead_code_threshold: float = 0.0,
        restart_every: int = 0,
        **sizes: Unpack[VQArgs],
    ):
        cfg = resolve_preset(VQ_PRESETS, preset, **sizes)
        encoder, decoder = conv_nets(cfg)
        quantizer = VectorQuantizer(
            dim=cfg["codebook_dim"],
            codebook_size=cfg["codebook_size"],
            commitment_weight=commitment_weight,
            l2_normalize=l2_normalize,
            ema_decay=ema_decay,
            dead_code_threshold=dead_code_threshold,
            restart_every=restart_every,
        )
        super().__init__(encoder, quantizer, decoder, resolution)
