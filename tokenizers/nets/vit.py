"""ViT encoder and decoder for 1D tokenizers, built from timm's transformer ``Block``.

TiTok (Yu et al. 2024, "An Image is Worth 32 Tokens", https://arxiv.org/abs/2406.07550): the
encoder runs over [patch tokens, K learnable latent tokens] and keeps only the K latents; the
decoder runs over [a learned mask token at every patch position, the K latents] and reads the
image back from the patch positions; attention is full. FlexTok (Bachmann et al. 2025,
https://arxiv.org/abs/2502.13967) orders the latents with causal attention among them
(``causal_latents``) and trains with nested dropout, so that any prefix of k tokens decodes.
MAETok (Chen et al. 2025, https://arxiv.org/abs/2502.03444) trains the encoder with mask modeling
(``mask_ratio``): a random share of the patch tokens is replaced by a learned mask token.
"""

from __future__ import annotations

from typing import TypedDict

import torch
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from typing_extensions import Unpack

from vistok.common.configurable import Configurable


def latent_attention_mask(num_patches: int, num_latents: int, causal: bool, device) -> Tensor:
    """Boolean mask (L, L), True = may attend, for the sequence [patches, latents].

    Patches attend to patches only, so a patch's features do not depend on any latent; latent i
    attends to every patch and to latents j <= i (``causal``) or to all latents. With the causal
    mask latent i is a function of the image and the latents before it: the ordering FlexTok's
    nested dropout relies on.
    """
    n, k = num_patches, num_latents
    mask = torch.ones(n + k, n + k, dtype=torch.bool, device=device)
    mask[:n, n:] = False
    if causal:
        mask[n:, n:] = torch.ones(k, k, dtype=torch.bool, device=device).tril()
    return mask


def keep_prefix(x: Tensor, mask_token: Tensor, num_tokens: Tensor | int | None) -> Tensor:
    """Tokens (B, K, D): positions >= num_tokens (per sample (B,) or one int) become mask_token."""
    if num_tokens is None:
        return x
    b, k, _ = x.shape
    # Checked where it costs no device sync: ints and CPU tensors (sampled lengths are valid).
    if not (isinstance(num_tokens, Tensor) and num_tokens.device.type != "cpu"):
        given = torch.as_tensor(num_tokens)
        if ((given < 1) | (given > k)).any():
            raise ValueError(f"num_tokens must be in [1, {k}], got {num_tokens}")
    keep = torch.as_tensor(num_tokens, device=x.device).reshape(-1, 1)  # (B or 1, 1)
    kept = torch.arange(k, device=x.device)[None] < keep  # (B, K)
    return torch.where(kept[..., None], x, mask_token.to(x.dtype).expand(b, k, -1))


def sincos_2d(grid: int, width: int) -> Tensor:
    """(grid * grid, width) 2D sine-cosine position code (MAE's initialisation), row-major."""
    quarter = width // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))
    pos = torch.arange(grid, dtype=torch.float64)
    y, x = torch.meshgrid(pos, pos, indexing="ij")
    parts = [f(c.reshape(-1, 1) * freqs) for c in (x, y) for f in (torch.sin, torch.cos)]
    code = torch.cat(parts, dim=1)  # (grid^2, 4 * quarter)
    return torch.cat([code, code.new_zeros(grid * grid, width - code.shape[1])], 1).float()


def sample_patch_mask(
    batch: int, num_patches: int, ratio: tuple[float, float], generator=None, device=None
) -> Tensor:
    """(B, N) bool, True = masked: one ratio r ~ U[lo, hi] for the batch, round(r * N) patches
    drawn uniformly without replacement for each image."""
    lo, hi = ratio
    r = lo + (hi - lo) * torch.rand((), generator=generator).item()
    count = round(r * num_patches)
    order = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)  # (B, N)
    mask = torch.zeros(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, order[:, :count], True)
    return mask.to(device)


def _run(blocks: nn.ModuleList, x: Tensor, mask: Tensor | None) -> Tensor:
    for block in blocks:
        x = block(x, attn_mask=mask)
    return x


class ViTArgs(TypedDict, total=False):
    """The sizes the encoder and the decoder share; absent keys take ``VIT_DEFAULTS``."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    num_latents: int
    z_channels: int
    mlp_ratio: float


VIT_DEFAULTS: ViTArgs = {
    "image_size": 256,
    "patch_size": 16,
    "width": 768,
    "depth": 12,
    "num_heads": 12,
    "num_latents": 32,
    "z_channels": 12,
    "mlp_ratio": 4.0,
}


class _ViT(Configurable, nn.Module):
    """What the encoder and the decoder share: the sizes, the patch grid, the transformer."""

    def __init__(self, **vit: Unpack[ViTArgs]):
        super().__init__()
        a = {**VIT_DEFAULTS, **vit}
        if a["image_size"] % a["patch_size"]:
            raise ValueError(
                f"image_size {a['image_size']} is not a multiple of patch {a['patch_size']}"
            )
        self.image_size, self.patch_size = a["image_size"], a["patch_size"]
        self.num_latents, self.z_channels = a["num_latents"], a["z_channels"]
        self.width, self.depth = a["width"], a["depth"]
        self.num_heads, self.mlp_ratio = a["num_heads"], a["mlp_ratio"]
        self.grid = self.image_size // self.patch_size
        self.num_patches = self.grid**2

    def _transformer(self) -> nn.ModuleList:
        """The blocks, built by each subclass where its parameters have always been made (the
        order of random initialisation stays the same)."""
        return nn.ModuleList(
            Block(self.width, self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=True)
            for _ in range(self.depth)
        )


class ViTEncoder(_ViT):
    """Images (B, 3, H, W) -> latent tokens (B, z_channels, K)."""

    def __init__(
        self,
        causal_latents: bool = False,
        in_channels: int = 3,
        mask_ratio: tuple[float, float] | None = None,
        **vit: Unpack[ViTArgs],
    ):
        if mask_ratio is not None:
            lo, hi = mask_ratio
            if not 0.0 <= lo <= hi < 1.0:
                raise ValueError(
                    f"mask_ratio must be (lo, hi) with 0 <= lo <= hi < 1, got {mask_ratio}"
                )
        super().__init__(**vit)
        self.causal_latents = causal_latents
        width, scale, p = self.width, self.width**-0.5, self.patch_size
        self.patch_embed = nn.Conv2d(in_channels, width, p, stride=p)
        # Learned, but started from a 2D sine-cosine code so patches know where they are at once.
        self.pos_embed = nn.Parameter(sincos_2d(self.grid, width))
        self.latents = nn.Parameter(scale * torch.randn(self.num_latents, width))
        self.blocks = self._transformer()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, self.z_channels)
        self.mask_ratio = tuple(mask_ratio) if mask_ratio is not None else None
        if mask_ratio is not None:  # only then: other encoders keep their state_dict
            self.mask_token = nn.Parameter(scale * torch.randn(width))

    def sample_mask(self, batch: int, generator=None, device=None) -> Tensor:
        """A random patch mask (B, N) at this encoder's ``mask_ratio`` (see sample_patch_mask)."""
        if self.mask_ratio is None:
            raise ValueError("this encoder was built without mask_ratio: it has no mask token")
        return sample_patch_mask(batch, self.num_patches, self.mask_ratio, generator, device)

    def forward(self, x: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """``patch_mask`` (B, N) bool: those patch tokens become the learned mask token (before
        the position code is added, so a masked token still knows where it is)."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(
                f"the encoder was built for {self.image_size} px images, got {tuple(x.shape[-2:])}"
            )
        patches = rearrange(self.patch_embed(x), "b d h w -> b (h w) d")  # (B, N, D)
        if patch_mask is not None:
            if self.mask_ratio is None:
                raise ValueError("this encoder was built without mask_ratio: it cannot mask")
            token = self.mask_token.to(patches.dtype)
            patches = torch.where(patch_mask[..., None], token, patches)
        patches = patches + self.pos_embed
        latents = self.latents.expand(x.shape[0], -1, -1)  # (B, K, D)
        seq = torch.cat([patches, latents], dim=1)  # (B, N + K, D)
        mask = None  # full attention over [patches, latents], as in TiTok
        if self.causal_latents:
            mask = latent_attention_mask(self.num_patches, self.num_latents, True, x.device)
        seq = _run(self.blocks, seq, mask)
        z = self.proj(self.norm(seq[:, self.num_patches :]))  # (B, K, z_channels)
        return rearrange(z, "b k c -> b c k")


class ViTDecoder(_ViT):
    """Latent tokens (B, z_channels, K) -> images (B, 3, H, W).

    ``num_tokens`` (an int or a (B,) tensor) keeps only the first k latents and puts a learned
    mask token in place of the rest (nested dropout at train time, prefix decoding at test time).
    With ``feature_dim`` set it predicts a feature vector per patch instead of pixels:
    ``features(z)`` (B, N, feature_dim), MAETok's auxiliary decoders.
    """

    def __init__(
        self, out_channels: int = 3, feature_dim: int | None = None, **vit: Unpack[ViTArgs]
    ):
        super().__init__(**vit)
        width, scale = self.width, self.width**-0.5
        self.embed = nn.Linear(self.z_channels, width)
        self.latent_pos = nn.Parameter(scale * torch.randn(self.num_latents, width))
        self.dropped_token = nn.Parameter(scale * torch.randn(width))  # stands for dropped latents
        self.mask_token = nn.Parameter(scale * torch.randn(width))  # every patch position
        self.pos_embed = nn.Parameter(sincos_2d(self.grid, width))
        self.blocks = self._transformer()
        self.norm = nn.LayerNorm(width)
        p = self.patch_size
        self.head = nn.Linear(width, feature_dim or p * p * out_channels)

    @property
    def last_layer(self) -> Tensor:
        return self.head.weight

    def features(self, z: Tensor, num_tokens: Tensor | int | None = None) -> Tensor:
        """Latents (B, z_channels, K) -> the head's output at every patch (B, N, head dim)."""
        b = z.shape[0]
        latents = self.embed(rearrange(z, "b c k -> b k c"))  # (B, K, D)
        latents = keep_prefix(latents, self.dropped_token, num_tokens) + self.latent_pos
        patches = (self.mask_token + self.pos_embed).expand(b, -1, -1)  # (B, N, D)
        seq = _run(self.blocks, torch.cat([patches, latents], dim=1), None)  # (B, N + K, D)
        return self.head(self.norm(seq[:, : self.num_patches]))  # (B, N, p*p*3 or feature_dim)

    def forward(self, z: Tensor, num_tokens: Tensor | int | None = None) -> Tensor:
        out = self.features(z, num_tokens)  # (B, N, p*p*3)
        p = self.patch_size
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=self.grid, p=p, q=p)
