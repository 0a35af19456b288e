"""Convolutional encoder/decoder of the VQGAN family, with WeTok's options.

The layout follows VQGAN (Esser et al. 2021, https://arxiv.org/abs/2012.09841) as used by
LlamaGen (https://arxiv.org/abs/2406.06525): ResBlocks (GroupNorm + SiLU) per resolution level,
strided-conv downsampling, optional self-attention at the lowest resolution. WeTok
(https://arxiv.org/abs/2508.05599, public ``improved_model.py``, itself MAGVIT-v2's layout) is
the same skeleton switched by constructor arguments:

- no attention, as many mid blocks as res blocks per level (``num_mid_blocks``);
- ``bias=False``: the ResBlock convs, their 1x1 shortcuts and the encoder's input conv carry no
  bias; ``out_kernel=1``: the encoder's last conv is 1x1; ``norm_groups=32`` at every width;
- ``adaptive_norm`` (decoder): at the start of each up-level, before its plain-GroupNorm
  ResBlocks, one GroupNorm without affine whose scale and bias are Linear maps of the decoder
  input latent's per-channel std and mean (WeTok's AdaptiveGroupNorm);
- ``upsample="depth_to_space"``: a conv to 4C followed by a 2x depth-to-space in DCR order
  (channel index = (row offset, column offset, channel)) instead of nearest + conv;
- ``noise_channels > 0``: Generative Decoding. A Gaussian noise map is concatenated to ``z`` before
  ``conv_in``; ``load_stage1`` starts it from a plain decoder with the noise part of ``conv_in`` at
  zero, so training starts exactly where stage 1 ended.

Options that express the taming-transformers / LlamaGen network exactly (LlamaGen's
``tokenizer/tokenizer_image/vq_model.py``, checked against its outputs in
``tests/test_parity_llamagen.py``):

- ``level_attention``: an attention block after every ResBlock of the lowest-resolution level
  (taming's ``attn_resolutions`` = the latent resolution), besides the one in the middle.
- ``down_padding="asymmetric"``: pad right/bottom by one, then a stride-2 conv without padding
  (taming's Downsample); ``"same"`` pads one on every side.
- ``norm_groups``: a fixed GroupNorm group count (taming: 32 at any width), wherever it divides
  the width (narrower test presets fall back to ``num_groups``).
- the decoder's ``num_res_blocks`` may differ from the encoder's (taming: one more).
"""

from __future__ import annotations

from typing import Literal, TypedDict

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from typing_extensions import Unpack

from vistok.common.configurable import Configurable
from vistok.common.nets import num_groups

# Named downsampling presets: len(channel_mult) - 1 stride-2 stages.
CHANNEL_MULT: dict[str, list[int]] = {
    "f8": [1, 2, 2, 4],
    "f16": [1, 1, 2, 2, 4],
    "f32": [1, 1, 2, 2, 4, 4],
}


def _groups(channels: int, groups: int | None) -> int:
    """``norm_groups`` where it divides the width (the references' 32 at their widths); else,
    e.g. for the narrow CPU presets, the default rule (``num_groups``)."""
    return groups if groups and channels % groups == 0 else num_groups(channels)


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine whose scale/bias come from the pooled latent statistics (WeTok).

    ``scale = to_scale(std(z))``, ``bias = to_bias(mean(z))`` with ``z`` the decoder's input
    latent (B, z_channels, h, w): WeTok's definition, scale not offset by 1, and PyTorch's default
    Linear initialisation as in its public code.
    """

    def __init__(self, channels: int, z_channels: int, groups: int | None = None):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels, groups), channels, eps=1e-6, affine=False)
        self.to_scale = nn.Linear(z_channels, channels)
        self.to_bias = nn.Linear(z_channels, channels)

    def forward(self, x: Tensor, cond: tuple[Tensor, Tensor]) -> Tensor:
        mean, std = cond  # (B, Z) each
        scale = rearrange(self.to_scale(std), "b c -> b c 1 1")
        bias = rearrange(self.to_bias(mean), "b c -> b c 1 1")
        return self.norm(x) * scale + bias


def _norm(channels: int, groups: int | None = None) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels, groups), channels, eps=1e-6)


def latent_stats(z: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of ``z`` over its spatial positions: (B, C) each.

    The variance is the unbiased one (``Tensor.var``'s default, as in WeTok's code); a 1x1 grid,
    where that is undefined (NaN in the reference), takes the biased one (0).
    """
    flat = rearrange(z, "b c h w -> b c (h w)")
    correction = 1 if flat.shape[-1] > 1 else 0
    return flat.mean(dim=-1), (flat.var(dim=-1, correction=correction) + eps).sqrt()


class ResBlock(nn.Module):
    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        dropout: float = 0.0,
        groups: int | None = None,
        bias: bool = True,
    ):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=bias)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, bias=bias) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, channels: int, groups: int | None = None):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        q, k, v = rearrange(qkv, "b (n c) h w -> n b 1 (h w) c", n=3)  # (B, 1, HW, C) each
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + self.proj(out)


class MidBlocks(nn.Module):
    """``num_blocks`` ResBlocks, with attention after the first one when enabled (VQGAN)."""

    def __init__(
        self,
        channels: int,
        num_blocks: int,
        attention: bool,
        dropout: float,
        groups: int | None = None,
        bias: bool = True,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_blocks):
            layers.append(ResBlock(channels, channels, dropout, groups, bias))
            if attention and i == 0:
                layers.append(AttnBlock(channels, groups))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Downsample(nn.Module):
    def __init__(self, channels: int, padding: Literal["same", "asymmetric"] = "same"):
        super().__init__()
        if padding not in ("same", "asymmetric"):
            raise ValueError(f"down_padding must be 'same' or 'asymmetric', got {padding!r}")
        self.asymmetric = padding == "asymmetric"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.asymmetric else 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.asymmetric:  # taming: windows start at even pixels, so pad right/bottom only
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int, mode: Literal["nearest", "depth_to_space"]):
        super().__init__()
        self.mode = mode
        out = 4 * channels if mode == "depth_to_space" else channels
        self.conv = nn.Conv2d(channels, out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "depth_to_space":
            # DCR order (WeTok / MAGVIT-v2): (B, (2 2 C), H, W) -> (B, C, 2H, 2W)
            return rearrange(self.conv(x), "b (p q c) h w -> b c (h p) (w q)", p=2, q=2)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


def _level(in_ch: int, out_ch: int, num_blocks: int, block: dict, attention: bool) -> nn.Module:
    """One resolution level: ResBlocks, each followed by attention when ``attention``."""
    level = nn.Module()
    level.blocks = nn.ModuleList(
        ResBlock(in_ch if j == 0 else out_ch, out_ch, **block) for j in range(num_blocks)
    )
    # Empty unless asked for: an empty ModuleList adds no state-dict key.
    groups = block.get("groups")
    level.attn = nn.ModuleList(
        AttnBlock(out_ch, groups) for _ in range(num_blocks if attention else 0)
    )
    return level


def _run_level(level: nn.Module, h: Tensor) -> Tensor:
    for j, block in enumerate(level.blocks):
        h = block(h)
        if len(level.attn):
            h = level.attn[j](h)
    return h


class CNNArgs(TypedDict, total=False):
    """The sizes an encoder and its mirrored decoder share; absent keys take ``CNN_DEFAULTS``."""

    channels: int
    channel_mult: list[int]
    num_res_blocks: int
    z_channels: int
    mid_attention: bool
    num_mid_blocks: int
    dropout: float
    norm_groups: int | None
    bias: bool
    level_attention: bool


CNN_DEFAULTS: CNNArgs = {
    "channels": 128,
    "channel_mult": [1, 1, 2, 2, 4],
    "num_res_blocks": 2,
    "z_channels": 256,
    "mid_attention": True,
    "num_mid_blocks": 2,
    "dropout": 0.0,
    "norm_groups": None,
    "bias": True,
    "level_attention": False,
}


def _sizes(arch: CNNArgs) -> tuple[dict, dict]:
    """(every size with its default, the keyword arguments each ResBlock takes)."""
    a = {**CNN_DEFAULTS, **arch}
    return a, dict(dropout=a["dropout"], groups=a["norm_groups"], bias=a["bias"])


class Encoder(Configurable, nn.Module):
    """Images (B, in_channels, H, W) -> latents (B, z_channels, H/f, W/f), f = ``downsample``."""

    def __init__(
        self,
        in_channels: int = 3,
        out_kernel: int = 3,
        down_padding: Literal["same", "asymmetric"] = "same",
        **arch: Unpack[CNNArgs],
    ):
        super().__init__()
        a, block = _sizes(arch)
        channels, channel_mult, bias = a["channels"], a["channel_mult"], a["bias"]
        self.z_channels = a["z_channels"]
        self.conv_in = nn.Conv2d(in_channels, channels * channel_mult[0], 3, padding=1, bias=bias)
        levels = []
        in_ch = channels * channel_mult[0]
        last = len(channel_mult) - 1
        for i, mult in enumerate(channel_mult):
            out_ch = channels * mult
            attention = a["level_attention"] and i == last
            level = _level(in_ch, out_ch, a["num_res_blocks"], block, attention)
            level.down = Downsample(out_ch, down_padding) if i < last else nn.Identity()
            levels.append(level)
            in_ch = out_ch
        self.levels = nn.ModuleList(levels)
        self.mid = MidBlocks(in_ch, a["num_mid_blocks"], a["mid_attention"], **block)
        self.norm_out = _norm(in_ch, a["norm_groups"])
        self.conv_out = nn.Conv2d(in_ch, self.z_channels, out_kernel, padding=out_kernel // 2)
        self._downsample = 2 ** (len(channel_mult) - 1)

    @property
    def downsample(self) -> int:
        return self._downsample

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for level in self.levels:
            h = level.down(_run_level(level, h))  # halves H, W except at the last level
        h = self.mid(h)  # (B, C_last, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, H/f, W/f)


class Decoder(Configurable, nn.Module):
    """Latents (B, z_channels, h, w) -> images (B, out_channels, h*f, w*f); mirror of Encoder.

    Each level has ``num_res_blocks`` ResBlocks: as many as the encoder in WeTok/MAGVIT-v2, one
    more in VQGAN/LlamaGen. With ``adaptive_norm`` each level starts with an
    :class:`AdaptiveGroupNorm` conditioned on the decoder input ``z`` (the quantized latent, not
    the noise).
    """

    def __init__(
        self,
        out_channels: int = 3,
        adaptive_norm: bool = False,
        upsample: Literal["nearest", "depth_to_space"] = "nearest",
        noise_channels: int = 0,
        **arch: Unpack[CNNArgs],
    ):
        super().__init__()
        if upsample not in ("nearest", "depth_to_space"):
            raise ValueError(f"upsample must be 'nearest' or 'depth_to_space', got {upsample!r}")
        a, block = _sizes(arch)
        channels, channel_mult, norm_groups = a["channels"], a["channel_mult"], a["norm_groups"]
        self.z_channels = z_channels = a["z_channels"]
        self.noise_channels = noise_channels
        in_ch = channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(z_channels + noise_channels, in_ch, 3, padding=1)
        self.mid = MidBlocks(in_ch, a["num_mid_blocks"], a["mid_attention"], **block)
        levels = []
        for i in reversed(range(len(channel_mult))):
            out_ch = channels * channel_mult[i]
            attention = a["level_attention"] and i == len(channel_mult) - 1
            level = _level(in_ch, out_ch, a["num_res_blocks"], block, attention)
            if adaptive_norm:
                level.norm = AdaptiveGroupNorm(in_ch, z_channels, norm_groups)
            level.up = Upsample(out_ch, upsample) if i > 0 else nn.Identity()
            levels.append(level)
            in_ch = out_ch
        self.levels = nn.ModuleList(levels)
        self.norm_out = _norm(in_ch, norm_groups)
        self.conv_out = nn.Conv2d(in_ch, out_channels, 3, padding=1)
        self._adaptive = adaptive_norm

    @property
    def last_layer(self) -> Tensor:
        """Weight of the final conv (for the adaptive GAN weight)."""
        return self.conv_out.weight

    def forward(
        self, z: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """``noise`` (B, noise_channels, h, w) is drawn from ``generator`` when not given.

        The noise is drawn on the generator's device and then moved, so a CPU generator gives the
        same noise whatever device ``z`` is on.
        """
        if self.noise_channels > 0:
            if noise is None:
                b, _, h, w = z.shape
                device = generator.device if generator is not None else z.device
                noise = torch.randn(
                    (b, self.noise_channels, h, w), generator=generator, device=device
                ).to(z)
            z_in = torch.cat([z, noise], dim=1)  # (B, z_channels + noise_channels, h, w)
        elif noise is not None:
            raise ValueError("noise given to a decoder built with noise_channels=0")
        else:
            z_in = z
        cond = latent_stats(z) if self._adaptive else None
        h = self.mid(self.conv_in(z_in))  # (B, C_last, h, w)
        for level in self.levels:
            if cond is not None:
                h = level.norm(h, cond)
            h = level.up(_run_level(level, h))  # doubles h, w except at the last level
        h = F.silu(self.norm_out(h))
        return self.conv_out(h)  # (B, out_channels, h*f, w*f)

    @torch.no_grad()
    def load_stage1(self, state_dict: dict[str, Tensor]) -> None:
        """Start a Generative-Decoding decoder from a plain (stage-1) decoder's weights.

        Every weight is copied; ``conv_in`` gets the stage-1 kernel on the latent channels and
        zeros on the noise channels, so the output equals the stage-1 decoder's for any noise.
        """
        state = dict(state_dict)
        w = state["conv_in.weight"]  # (C, z_channels, 3, 3)
        if w.shape[1] != self.z_channels:
            raise ValueError(
                f"stage-1 conv_in takes {w.shape[1]} channels, expected z_channels="
                f"{self.z_channels} (is it already a generative decoder?)"
            )
        noise_part = w.new_zeros(w.shape[0], self.noise_channels, *w.shape[2:])
        state["conv_in.weight"] = torch.cat([w, noise_part], dim=1)
        self.load_state_dict(state, strict=True)
