"""Class-conditional autoregressive GPT over the discrete codes of any tokenizer.

LlamaGen (Sun et al. 2024, https://arxiv.org/abs/2406.06525): Llama blocks (RMSNorm, SwiGLU,
rotary embeddings; 2D RoPE over the code grid), the class label as the first token with an extra
"null" class trained by 10% label dropout for classifier-free guidance, token dropout on the
input embeddings, and a static KV cache allocated once for incremental decoding.

The output side depends on the tokenizer's code space (``vistok.generators.heads``): one softmax
over a codebook, WeTok's factorized sub-token prediction for group-wise codes, or independent
Bernoulli logits per bit (Instella-T2I's AR prior). Every head gives logits ``(B, N, F, V)``:
F factors per token (1, the groups, or the bits) over V values each, so the loss and the sampler
are the same for all of them.

Sequence layout: input ``[class, t_0, ..., t_{N-2}]`` predicts ``[t_0, ..., t_{N-1}]``; input
position i >= 1 gets the rotation of code i-1's grid position. The class token is either left
unrotated (``class_rope="identity"``) or, as in LlamaGen, "rotated" by an all-zero table row
(``class_rope="zero"``): its query and key are zero, so every position gives it the attention
score 0 and it conditions the image through its value only. LlamaGen's checkpoints need "zero"
(``tests/test_parity_llamagen.py`` matches its logits and greedy samples).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vistok.common.configurable import Configurable
from vistok.generators.heads import make_head
from vistok.generators.layers import Block, KVCache, RMSNorm, init_weights, rope_angles, rope_tables

# ---------------------------------------------------------------------------------------------
# Helpers


def token_loss(logits: Tensor, seq: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean cross-entropy per factor of logits (B, N, F, V) against codes (B, N, F), plus the NLL
    per token (nats) and the accuracy for logging."""
    logits = logits.float()
    # One row per (token, factor) with the V classes contiguous: a class axis in the middle
    # ("b v n f") makes cross_entropy copy the logits and reduce over a strided axis, 3-5x
    # slower for a 16384-code softmax on a CPU.
    ce = F.cross_entropy(logits.flatten(0, 2), seq.flatten(), reduction="none").view(seq.shape)
    with torch.no_grad():
        stats = {
            "nll_per_token": ce.sum(-1).mean(),
            "accuracy": (logits.argmax(-1) == seq).float().mean(),
        }
    return ce.mean(), stats


# ---------------------------------------------------------------------------------------------
# Main module


class GPT(Configurable, nn.Module):
    """Decoder-only transformer over a tokenizer's code map.

    Args:
        code_space: the tokenizer's ``CodeSpace.to_dict()`` (kind index, groups or bits).
        token_shape: the code map's spatial shape, ``[h, w]`` (2D RoPE) or ``[n]`` (1D RoPE).
        num_classes: class labels; label ``num_classes`` is the null class (CFG). 0 = unconditional.
        preset: a name in ``GPT_PRESETS``; ``depth``/``dim``/``heads``/``head_layers`` override it.
        head_layers: transformer layers of the factorized sub-token head (group codes only).
        class_rope: how the class token enters the rotary embedding (see the module docstring).
        dropout: residual and FFN dropout; ``attn_dropout`` on the attention probabilities;
        ``token_dropout`` on the whole input sequence (class token included);
        label_dropout: probability of replacing the label by the null class in training.
        LlamaGen's c2i training: 0.1, 0.0, 0.1, 0.1.
    """

    def __init__(
        self,
        code_space: dict,
        token_shape: list[int],
        num_classes: int = 1000,
        preset: str = "B",
        depth: int | None = None,
        dim: int | None = None,
        heads: int | None = None,
        head_layers: int | None = None,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        token_dropout: float = 0.1,
        label_dropout: float = 0.1,
        multiple_of: int = 256,
        rope_base: float = 10000.0,
        class_rope: Literal["identity", "zero"] = "identity",
    ):
        super().__init__()
        if preset not in GPT_PRESETS:
            raise ValueError(f"unknown GPT preset {preset!r}; choose one of {sorted(GPT_PRESETS)}")
        given = dict(depth=depth, dim=dim, heads=heads, head_layers=head_layers)
        cfg = {**GPT_PRESETS[preset], **{k: v for k, v in given.items() if v is not None}}
        self.depth, self.dim, self.heads = cfg["depth"], cfg["dim"], cfg["heads"]
        self.token_shape = tuple(int(s) for s in token_shape)
        self.num_tokens = math.prod(self.token_shape)
        self.num_classes, self.label_dropout = num_classes, label_dropout
        self.kind = code_space["kind"]

        # One row per class plus the null class (the last row).
        self.class_embed = nn.Embedding(num_classes + 1, self.dim)
        self.head = make_head(code_space, self.dim, cfg["head_layers"], self.heads, multiple_of)
        self.token_dropout = nn.Dropout(token_dropout)
        self.blocks = nn.ModuleList(
            Block(
                self.dim,
                self.heads,
                dropout=dropout,
                multiple_of=multiple_of,
                attn_dropout=attn_dropout,
            )
            for _ in range(self.depth)
        )
        self.norm = RMSNorm(self.dim)
        # A training-time switch, not part of the model: recompute blocks in the backward pass.
        self.activation_checkpointing = False
        if class_rope not in ("identity", "zero"):
            raise ValueError(f"class_rope must be 'identity' or 'zero', got {class_rope!r}")
        angles = rope_angles(self.token_shape, self.dim // self.heads, rope_base)
        cos, sin = rope_tables(angles)  # (1 + N, Dh)
        if class_rope == "zero":
            cos[0], sin[0] = 0.0, 0.0  # LlamaGen: the class token's q and k become 0
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self)
        self.head.reset_output()

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def factors(self) -> int:
        return self.head.factors

    # --- code layout ---------------------------------------------------------------------------
    def to_sequence(self, codes: Tensor) -> Tensor:
        """Tokenizer layout (B, *token_shape[, F]) -> (B, N, F)."""
        if self.kind == "index":
            return rearrange(codes, "b ... -> b (...) 1")
        return rearrange(codes, "b ... f -> b (...) f")

    def from_sequence(self, seq: Tensor) -> Tensor:
        """(B, N, F) -> the tokenizer's layout."""
        if self.kind == "index":
            return seq.reshape(seq.shape[0], *self.token_shape)
        return seq.reshape(seq.shape[0], *self.token_shape, seq.shape[-1])

    # --- embeddings ---------------------------------------------------------------------------
    def class_tokens(self, labels: Tensor | None, batch: int, device=None) -> Tensor:
        """(B, 1, D). Labels < 0 (or None) mean unconditional: the null class."""
        if labels is None:
            labels = torch.full((batch,), -1, dtype=torch.long, device=device)
        labels = torch.where(labels < 0, torch.full_like(labels, self.null_class), labels)
        if self.training and self.label_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.class_embed(labels)[:, None]

    def input_sequence(self, seq: Tensor, labels: Tensor | None) -> Tensor:
        """Codes (B, T, F) -> transformer input [class, embed(codes)] (B, 1 + T, D)."""
        cls = self.class_tokens(labels, seq.shape[0], seq.device)
        tokens = self.head.embed(seq)  # (B, T, D)
        # LlamaGen drops out the class token's embedding too.
        return self.token_dropout(torch.cat([cls.to(tokens.dtype), tokens], dim=1))

    # --- transformer --------------------------------------------------------------------------
    def hidden(self, x: Tensor, start: int | None = None) -> Tensor:
        """Inputs (B, T, D) at positions [start, start + T) -> normed hidden states (B, T, D).

        ``start=None``: a full causal pass from position 0, no cache. An int: incremental
        decoding through the static cache (``setup_cache`` first).
        """
        s = 0 if start is None else start
        t = x.shape[1]
        if s + t > self.num_tokens:
            raise ValueError(
                f"positions up to {s + t} exceed the sequence length {self.num_tokens}"
            )
        rope = (self.rope_cos[s : s + t], self.rope_sin[s : s + t])
        recompute = self.activation_checkpointing and self.training and start is None
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, rope, None, use_reentrant=False)
            else:
                x = block(x, rope, start)
        return self.norm(x)

    def forward(self, codes: Tensor, labels: Tensor | None = None) -> Tensor:
        """Teacher-forced logits (B, N, F, V) for codes in the tokenizer's layout."""
        seq = self.to_sequence(codes)  # (B, N, F)
        h = self.hidden(self.input_sequence(seq[:, :-1], labels))  # (B, N, D)
        return self.head.logits(h, seq)

    def loss(self, codes: Tensor, labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Teacher-forced ``token_loss`` of codes in the tokenizer's layout."""
        return token_loss(self(codes, labels), self.to_sequence(codes))

    # --- incremental decoding -------------------------------------------------------------------
    def setup_cache(self, batch: int, dtype: torch.dtype | None = None, device=None) -> None:
        """Allocate every layer's KV cache for ``batch`` sequences, unless it already fits."""
        dtype = dtype or self.norm.weight.dtype
        device = device or self.norm.weight.device
        head_dim = self.dim // self.heads
        for block in self.blocks:
            attn = block.attn
            if attn.cache is None or not attn.cache.fits(batch, self.num_tokens, dtype, device):
                attn.cache = KVCache(batch, self.heads, self.num_tokens, head_dim, dtype, device)

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.cache = None


# ---------------------------------------------------------------------------------------------
# Presets: LlamaGen's GPT-B/L/XL/XXL (111M / 343M / 775M / 1.4B with a 16384 codebook), plus
# small sizes for CPU runs and tests.

GPT_PRESETS: dict[str, dict] = {
    "tiny": dict(depth=2, dim=64, heads=4, head_layers=1),
    "S": dict(depth=6, dim=256, heads=4, head_layers=1),
    "B": dict(depth=12, dim=768, heads=12, head_layers=2),
    "L": dict(depth=24, dim=1024, heads=16, head_layers=2),
    "XL": dict(depth=36, dim=1280, heads=20, head_layers=2),
    "XXL": dict(depth=48, dim=1536, heads=24, head_layers=2),
}
