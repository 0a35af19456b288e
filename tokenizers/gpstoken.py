"""GPSToken: Gaussian-parameterised, spatially adaptive tokens.

GPSToken (2025, "Gaussian-Parameterized Spatially-adaptive Tokenization"): an image becomes N
tokens, each a 2D Gaussian with 5 geometry numbers and c texture features (c = 16 in the paper,
21 floats per token). Pipeline here:

1. entropy-driven initial partition into N rectangles (``nets/partition.py``), each giving a
   Gaussian at its centre with sigma = 2/3 of its size;
2. a CNN encoder (the core one) gives a feature map; RoI-align pools each region's features;
   a transformer over the N region tokens predicts a geometry refinement (in logit space, head
   zero-initialised so training starts at the initial layout) and the texture features;
3. the decoder splats the Gaussians' textures into a feature map (``nets/splatting.py``) and
   the core CNN decoder turns it into the image.

Tokens are laid out (B, 5 + c, N) with channels ``TOKEN_CHANNELS`` (geometry first, bounded:
sigma in (0, 1) via sigmoid, rho and mu in (-1, 1) via 2 sigmoid - 1) and declared as
continuous codes with ``token_shape`` (N,), so a flow-matching generator over token sets reads them
like any continuous latent. ``split_tokens`` / ``join_tokens`` separate layout and texture for
two-stage generation (layout first, then texture conditioned on it). Paper numbers (ImageNet 256,
128 tokens): rFID 0.65, gFID 1.50.
"""

from __future__ import annotations

import torch
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torchvision.ops import roi_align
from typing_extensions import Unpack

from vistok.common.configurable import Configurable
from vistok.tokenizers.nets.cnn import Decoder, Encoder
from vistok.tokenizers.nets.partition import boxes_to_geometry, entropy_partition
from vistok.tokenizers.nets.splatting import SplatRenderer
from vistok.tokenizers.quantizers.identity import Identity
from vistok.tokenizers.tokenizer import ConvArgs, Tokenizer, resolve_preset

GEOMETRY = ("sigma_x", "sigma_y", "rho", "mu_x", "mu_y")
_EPS = 1e-4


def split_tokens(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Tokens (B, 5 + c, N) -> layout (B, 5, N) in ``GEOMETRY`` order, texture (B, c, N)."""
    return tokens[:, : len(GEOMETRY)], tokens[:, len(GEOMETRY) :]


def join_tokens(layout: Tensor, texture: Tensor) -> Tensor:
    """Inverse of ``split_tokens``."""
    return torch.cat([layout, texture], dim=1)


def geometry_to_logits(geometry: Tensor) -> Tensor:
    """Bounded geometry (..., 5) -> the unbounded values whose activations give it back."""
    sigma, rest = geometry[..., :2], (geometry[..., 2:] + 1) / 2  # all in (0, 1)
    return torch.logit(torch.cat([sigma, rest], dim=-1), eps=_EPS)


def logits_to_geometry(logits: Tensor) -> Tensor:
    """(..., 5) -> sigma = sigmoid(.), rho and mu = 2 sigmoid(.) - 1."""
    s = torch.sigmoid(logits)
    return torch.cat([s[..., :2], 2 * s[..., 2:] - 1], dim=-1)


def token_names(texture_channels: int) -> list[str]:
    """The documented channel order of a token."""
    return [*GEOMETRY, *(f"texture_{i}" for i in range(texture_channels))]


class GPSTokenArgs(ConvArgs, total=False):
    num_tokens: int
    texture_channels: int
    width: int  # region transformer
    depth: int
    num_heads: int


# The region transformer of the paper's main model (``gps_m128``).
REGION_DEFAULTS: GPSTokenArgs = {
    "num_tokens": 128,
    "texture_channels": 16,
    "width": 512,
    "depth": 6,
    "num_heads": 8,
}


class GPSEncoder(Configurable, nn.Module):
    """Images (B, 3, H, W) -> tokens (B, 5 + texture_channels, N)."""

    def __init__(
        self,
        roi_size: int = 2,
        sigma_scale: float = 2 / 3,
        entropy_bins: int = 32,
        **sizes: Unpack[GPSTokenArgs],
    ):
        super().__init__()
        a = {**REGION_DEFAULTS, **sizes}
        width, texture_channels = a["width"], a["texture_channels"]
        self.num_tokens, self.texture_channels = a["num_tokens"], texture_channels
        self.z_channels = 5 + texture_channels
        self.roi_size, self.sigma_scale, self.entropy_bins = roi_size, sigma_scale, entropy_bins
        self.cnn = Encoder(**{k: v for k, v in a.items() if k not in REGION_DEFAULTS})
        feat = self.cnn.z_channels
        self.roi_embed = nn.Linear(feat * roi_size * roi_size, width)
        self.geometry_embed = nn.Linear(5, width)
        self.blocks = nn.ModuleList(
            Block(width, a["num_heads"], qkv_bias=True) for _ in range(a["depth"])
        )
        self.norm = nn.LayerNorm(width)
        self.geometry_head = nn.Linear(width, 5)
        self.texture_head = nn.Linear(width, texture_channels)
        # Zero refinement at the start: the first renders use the entropy layout as is.
        nn.init.zeros_(self.geometry_head.weight)
        nn.init.zeros_(self.geometry_head.bias)

    def initial_layout(self, images: Tensor) -> Tensor:
        """The entropy partition's boxes (B, N, 4) int64 (y0, x0, y1, x1) in pixels."""
        return entropy_partition(images, self.num_tokens, bins=self.entropy_bins)

    def forward(self, images: Tensor, boxes: Tensor | None = None) -> Tensor:
        b, _, h, w = images.shape
        if boxes is None:
            boxes = self.initial_layout(images)
        init = boxes_to_geometry(boxes, h, w, self.sigma_scale)  # (B, N, 5)
        init = logits_to_geometry(geometry_to_logits(init))  # clipped into the open ranges
        feats = self.cnn(images)  # (B, F, h/f, w/f)
        rois = torch.cat(  # (B * N, 5): batch index, x0, y0, x1, y1 in pixels
            [
                torch.arange(b, device=images.device).repeat_interleave(boxes.shape[1])[:, None],
                rearrange(boxes[..., [1, 0, 3, 2]], "b n c -> (b n) c"),
            ],
            dim=1,
        ).to(feats.dtype)
        pooled = roi_align(
            feats,
            rois,
            self.roi_size,
            spatial_scale=feats.shape[-1] / w,
            sampling_ratio=2,
            aligned=True,
        )  # (B * N, F, r, r)
        x = self.roi_embed(rearrange(pooled, "(b n) f p q -> b n (f p q)", b=b))  # (B, N, D)
        x = x + self.geometry_embed(init.to(x.dtype))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        geometry = logits_to_geometry(geometry_to_logits(init) + self.geometry_head(x).float())
        tokens = torch.cat([geometry.to(x.dtype), self.texture_head(x)], dim=-1)  # (B, N, 21)
        return rearrange(tokens, "b n c -> b c n")


class GPSDecoder(Configurable, nn.Module):
    """Tokens (B, 5 + c, N) -> splatted (B, c, H/f, W/f) feature map -> CNN decoder -> images."""

    def __init__(
        self,
        resolution: int = 256,
        texture_channels: int = 16,
        renderer: str = "dense",
        tile: int = 16,
        truncate: float = 3.0,
        **cnn: Unpack[ConvArgs],
    ):
        super().__init__()
        self.texture_channels = texture_channels
        self.z_channels = 5 + texture_channels
        self.cnn = Decoder(**{**cnn, "z_channels": texture_channels})
        f = 2 ** (len(self.cnn.levels) - 1)
        self.map_size = (resolution // f, resolution // f)
        self.renderer = SplatRenderer(renderer, truncate, tile)

    @property
    def last_layer(self) -> Tensor:
        return self.cnn.last_layer

    def render(self, tokens: Tensor) -> Tensor:
        """Tokens (B, 5 + c, N) -> feature map (B, c, H/f, W/f)."""
        layout, texture = split_tokens(tokens)
        geometry = rearrange(layout, "b g n -> b n g")
        # Generated tokens may leave the encoder's open ranges; clamp sigma and rho back into them
        # (identity, gradient included, for everything the encoder produces).
        lo = geometry.new_tensor([_EPS, _EPS, -1 + _EPS, -torch.inf, -torch.inf])
        hi = geometry.new_tensor([1.0, 1.0, 1 - _EPS, torch.inf, torch.inf])
        geometry = torch.maximum(torch.minimum(geometry, hi), lo)
        return self.renderer(geometry, rearrange(texture, "b c n -> b n c"), self.map_size)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.cnn(self.render(tokens))


# --- presets (256 px): f4 decoders, so the splatted map is 64 x 64 x 16 -------------------------
_CNN = dict(
    channels=128, channel_mult=[1, 2, 4], num_res_blocks=2, z_channels=256, mid_attention=True
)

GPSTOKEN_PRESETS: dict[str, dict] = {
    "gps_m128": dict(_CNN, **REGION_DEFAULTS),
    "gps_m256": dict(_CNN, num_tokens=256, texture_channels=16, width=512, depth=6, num_heads=8),
    "gps_l128": dict(_CNN, num_tokens=128, texture_channels=16, width=768, depth=12, num_heads=12),
}


class GPSToken(Tokenizer):
    """Images <-> N Gaussian tokens (B, 5 + c, N), continuous codes (a plain autoencoder).

    ``width``/``depth``/``num_heads`` size the region transformer; the ``ConvArgs`` size the CNN
    encoder and decoder (shared with the other families, so ``presets/cpu_small.yaml`` applies).
    ``renderer``: "dense" or "tiled" (same values, different memory profile).
    """

    def __init__(
        self,
        preset: str = "gps_m128",
        resolution: int = 256,
        renderer: str = "dense",
        tile: int = 16,
        roi_size: int = 2,
        sigma_scale: float = 2 / 3,
        **sizes: Unpack[GPSTokenArgs],
    ):
        cfg = resolve_preset(GPSTOKEN_PRESETS, preset, **sizes)
        heads = cfg["num_heads"]
        if sizes.get("num_heads") is None and cfg["width"] % heads:
            heads = max(1, cfg["width"] // 64)  # a narrowed preset keeps 64-wide heads
        sized = {k: cfg[k] for k in GPSTokenArgs.__annotations__ if k in cfg}
        encoder = GPSEncoder(roi_size, sigma_scale, **{**sized, "num_heads": heads})
        conv = {k: cfg[k] for k in ConvArgs.__annotations__ if k in cfg}
        decoder = GPSDecoder(
            resolution, cfg["texture_channels"], renderer=renderer, tile=tile, **conv
        )
        channels = 5 + cfg["texture_channels"]
        super().__init__(encoder, Identity(channels), decoder, resolution, z_channels=channels)
        # Geometry must reach the renderer untouched: no learned projections around the codes.
        self.proj_in, self.proj_out = nn.Identity(), nn.Identity()
        self.num_tokens = cfg["num_tokens"]

    @property
    def token_shape(self) -> tuple[int, ...]:
        return (self.num_tokens,)

    @property
    def token_channels(self) -> list[str]:
        return token_names(self.encoder.texture_channels)

    def pre_quant(self, images: Tensor, boxes: Tensor | None = None) -> Tensor:
        """Images (B, 3, H, W) -> tokens (B, 21, N); ``boxes`` (B, N, 4) skips the partition
        (e.g. computed in dataloader workers)."""
        return self.encoder(images, boxes)

    split_tokens = staticmethod(split_tokens)
    join_tokens = staticmethod(join_tokens)

    def describe(self) -> dict:
        info = super().describe()
        info["token_channels"] = self.token_channels
        return info
