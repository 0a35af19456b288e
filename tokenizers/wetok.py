"""WeTok: group-wise lookup-free quantization (GQ) and generative decoding (GD).

https://arxiv.org/abs/2508.05599. All-CNN encoder/decoder (no attention, 4 mid blocks), decoder
conditioned on the quantized latent by adaptive GroupNorm, depth-to-space upsampling. Presets
follow the paper's compression ratios, ratio = 256*256*24 / (tokens * bits per token):

| preset       | downsample | tokens | bits (groups x bits) | ratio |
| compratio24  | 8          | 32x32  | 64 (8 x 8)           | 24    |
| compratio48  | 8          | 32x32  | 32 (4 x 8)           | 48    |
| compratio192 | 16         | 16x16  | 32 (4 x 8)           | 192   |
| compratio768 | 32         | 8x8    | 32 (4 x 8)           | 768   |

The presets are WeTok's released models (``GeneralDomain_compratio*`` configs, checked key by key
against the released state dicts): width 256, 4 res blocks per level and as many mid blocks,
GroupNorm(32) (at these widths), bias-free ResBlock convs, a 1x1 encoder output conv, one
adaptive GroupNorm per decoder level, no projection between the nets and the quantizer
(z_channels = bits). Ratio 768 widens its sixth level to 8x (2048 channels), as released.

``generative=True`` is stage 2 (GD): the decoder also takes a Gaussian noise map of the latent's
shape, concatenated on channels; its noise weights start at zero when initialised from stage 1.
"""

from __future__ import annotations

from typing_extensions import Unpack

from vistok.tokenizers.quantizers.lfq import LFQ
from vistok.tokenizers.tokenizer import ConvArgs, Tokenizer, conv_nets, resolve_preset

# num_mid_blocks is not set: WeTok builds as many mid blocks as res blocks per level. WeTok's
# GroupNorms have 32 groups; the default rule (``nets.cnn.num_groups``) gives exactly 32 at these
# widths and still works when a preset is shrunk below 128 channels (set norm_groups=32 to force).
_CNN = dict(channels=256, num_res_blocks=4, mid_attention=False, bias=False)

WETOK_PRESETS: dict[str, dict] = {
    "compratio24": dict(_CNN, channel_mult=[1, 2, 2, 4], bits=64, groups=8),
    "compratio48": dict(_CNN, channel_mult=[1, 2, 2, 4], bits=32, groups=4),
    "compratio192": dict(_CNN, channel_mult=[1, 1, 2, 2, 4], bits=32, groups=4),
    "compratio768": dict(_CNN, channel_mult=[1, 1, 2, 2, 4, 8], bits=32, groups=4),
}


class WeTokArgs(ConvArgs, total=False):
    bits: int  # bits per position, split into ``groups`` lookup-free groups
    groups: int


class WeTok(Tokenizer):
    def __init__(
        self,
        preset: str = "compratio192",
        resolution: int = 256,
        entropy_weight: float = 0.1,
        commitment_weight: float = 0.25,
        temperature: float = 0.01,
        pooled_marginal: bool = False,
        generative: bool = False,
        **sizes: Unpack[WeTokArgs],
    ):
        cfg = resolve_preset(WETOK_PRESETS, preset, **sizes)
        cfg.setdefault("z_channels", cfg["bits"])
        cfg.setdefault("num_mid_blocks", cfg["num_res_blocks"])
        encoder, decoder = conv_nets(
            cfg,
            encoder_options=dict(out_kernel=1),
            adaptive_norm=True,
            upsample="depth_to_space",
            noise_channels=cfg["z_channels"] if generative else 0,
        )
        quantizer = LFQ(
            bits=cfg["bits"],
            groups=cfg["groups"],
            commitment_weight=commitment_weight,
            entropy_weight=entropy_weight,
            temperature=temperature,
            pooled_marginal=pooled_marginal,
        )
        super().__init__(
            encoder, quantizer, decoder, resolution, project=cfg["z_channels"] != cfg["bits"]
        )
