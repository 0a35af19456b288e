"""Llama transformer layers shared by the GPT and its factorized sub-token head: RMSNorm,
rotary embeddings (1D and LlamaGen's 2D), a static KV cache, attention with incremental decoding,
SwiGLU and the pre-norm block, plus LlamaGen's initialisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right

# ---------------------------------------------------------------------------------------------
# Helpers


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (bf16 squares lose too much), cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_angles(token_shape: tuple[int, ...], head_dim: int, base: float = 10000.0) -> Tensor:
    """Rotation angles (1 + N, head_dim / 2): row 0 (class token) is zero.

    2D grids rotate the first half of each head's pairs by the row index and the second half by
    the column index (LlamaGen's 2D RoPE); 1D sequences rotate all pairs by the position.
    """
    if len(token_shape) == 2:
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        quarter = head_dim // 4
        freqs = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (Dh/4,)
        h, w = token_shape
        rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)  # (N,)
        cols = torch.arange(w, dtype=torch.float64).repeat(h)  # (N,)
        angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)  # (N, Dh/2)
    elif len(token_shape) == 1:
        half = head_dim // 2
        freqs = base ** (-torch.arange(half, dtype=torch.float64) / half)  # (Dh/2,)
        angles = (torch.arange(token_shape[0], dtype=torch.float64) + 1)[:, None] * freqs
    else:
        raise ValueError(f"token_shape must have 1 or 2 dims, got {token_shape}")
    return torch.cat([angles.new_zeros(1, angles.shape[1]), angles]).float()  # (1 + N, Dh/2)


def rope_tables(angles: Tensor) -> tuple[Tensor, Tensor]:
    """Angles (T, Dh/2) -> the full-width tables (T, Dh) that ``apply_rope`` multiplies by:
    each pair's cosine twice, and its sine as (-sin, +sin)."""
    cos, sin = angles.cos(), angles.sin()
    return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs (x0, x1) of x (B, H, T, Dh) by their angles:
    (x0 cos - x1 sin, x1 cos + x0 sin), with ``rope_tables`` (T, Dh).

    Full-width products with x and its pair-swapped copy: the same arithmetic, bit for bit, as
    splitting the pairs apart and stacking them again, in fewer passes and autograd nodes
    (bench/gpt_step.py --components times it)."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) per pair
    return (xf * cos + swapped * sin).to(x.dtype)


class KVCache:
    """Static key/value storage for one attention layer: allocated once, written in place.

    Not a buffer on purpose: it is scratch space for sampling, kept out of state dicts.
    """

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, dtype, device):
        shape = (batch, heads, length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def fits(self, batch: int, length: int, dtype, device) -> bool:
        b, _, n, _ = self.k.shape
        same_place = self.k.dtype == dtype and self.k.device == torch.device(device)
        return same_place and batch <= b and length <= n

    def update(self, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Write (B, H, T, Dh) at positions [start, start + T); return everything up to there."""
        b, _, t, _ = k.shape
        self.k[:b, :, start : start + t] = k
        self.v[:b, :, start : start + t] = v
        return self.k[:b, :, : start + t], self.v[:b, :, : start + t]


# ---------------------------------------------------------------------------------------------
# Blocks


class Attention(nn.Module):
    """Causal self-attention: ``dropout`` on the output projection, ``attn_dropout`` on the
    attention probabilities (LlamaGen: 0.1 and 0.0)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.attn_dropout, self.resid_dropout = attn_dropout, nn.Dropout(dropout)
        self.cache: KVCache | None = None

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, start: int | None = None
    ) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        dropout = self.attn_dropout if self.training else 0.0
        if start is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            if self.cache is None:
                raise RuntimeError("call setup_cache() before decoding with start=")
            t = q.shape[2]
            k, v = self.cache.update(k, v, start)  # (B, H, start + T, Dh)
            # Several new tokens at once (speculative verification): causal among them, all of
            # the past visible. A lower-right causal bias, not a materialised boolean mask, so
            # that SDPA can still pick its fused (flash / memory-efficient) kernels.
            mask = causal_lower_right(t, start + t) if t > 1 else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = rearrange(out, "b h t d -> b t (h d)")
        return self.resid_dropout(self.proj(out))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def ffn_hidden(dim: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4 * dim (same FLOPs as a GELU MLP), rounded up."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class Block(nn.Module):
    """Pre-norm transformer block: RMSNorm -> causal attention, RMSNorm -> SwiGLU, residuals."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        dropout: float = 0.0,
        multiple_of: int = 256,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        self.attn_norm, self.ffn_norm = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, heads, dropout, attn_dropout)
        self.ffn = SwiGLU(dim, ffn_hidden(dim, multiple_of), dropout)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, start: int | None = None
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, start)
        return x + self.ffn(self.ffn_norm(x))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """LlamaGen's initialisation: every linear and embedding weight ~ N(0, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
