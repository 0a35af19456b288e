"""Output heads of the AR generator, one per code-space kind.

Every head embeds a position's code for the GPT input and turns the GPT hidden state into logits
``(B, T, F, V)``: F factors per token with V values each.

- ``IndexHead`` (VQ, FSQ): one softmax over the codebook, F = 1.
- ``GroupHead`` (WeTok's group-wise LFQ, https://arxiv.org/abs/2508.05599): a token of G
  sub-tokens is embedded as the sum of per-group embeddings; a small causal transformer runs over
  ``[h, e(s_1), ..., e(s_{G-1})]`` and predicts sub-token g from the GPT state and the previous
  sub-tokens of the same position, so the joint over 2^bits codes costs G softmaxes of
  2^(bits/G) entries. At sampling time sub-tokens are drawn one after another, each through the
  sampler (hence CFG per sub-token).
- ``BitHead`` (Bernoulli binary codes; Instella-T2I's AR prior, https://arxiv.org/abs/2506.21022):
  independent Bernoulli logits per bit, written as two-way logits ``[0, l]`` so that CFG,
  temperature and top-k/p act on them exactly as on a softmax (``u + s(c - u)`` on ``[0, l]`` is
  CFG on the Bernoulli logit); the input embedding is a linear map of the bits.

``sample(h, pick)``: ``h`` (M, D) are hidden states of one position, ``pick`` maps logits
(M, F', V) to codes (M, F') (it applies guidance and filtering, see ``sampling.Picker``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor, nn

from vistok.generators.layers import Block, RMSNorm  # the same Llama blocks as the GPT

Pick = Callable[[Tensor], Tensor]


class IndexHead(nn.Module):
    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.factors, self.vocab = 1, vocab_size
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.out = nn.Linear(dim, vocab_size, bias=False)

    def reset_output(self) -> None:
        nn.init.zeros_(self.out.weight)

    def embed(self, seq: Tensor) -> Tensor:
        return self.token_embed(seq[..., 0])  # (B, T, 1) -> (B, T, D)

    def logits(self, h: Tensor, seq: Tensor | None = None) -> Tensor:
        return self.out(h)[..., None, :]  # (B, T, 1, V)

    def sample(self, h: Tensor, pick: Pick) -> Tensor:
        return pick(self.out(h)[:, None])  # (M, 1)


class GroupHead(nn.Module):
    def __init__(
        self, dim: int, groups: int, vocab_size: int, layers: int, heads: int, multiple_of: int
    ):
        super().__init__()
        self.factors, self.vocab = groups, vocab_size
        # Group g uses rows [g * V, (g + 1) * V) of both tables.
        self.token_embed = nn.Embedding(groups * vocab_size, dim)  # GPT input
        self.sub_embed = nn.Embedding(groups * vocab_size, dim)  # factorized transformer input
        self.pos = nn.Parameter(torch.randn(groups, dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(dim, heads, multiple_of=multiple_of) for _ in range(layers)
        )
        self.norm = RMSNorm(dim)
        self.out = nn.Parameter(torch.zeros(groups, vocab_size, dim))  # one projection per group
        self.register_buffer("offset", torch.arange(groups) * vocab_size, persistent=False)

    def reset_output(self) -> None:
        nn.init.zeros_(self.out)

    def embed(self, seq: Tensor) -> Tensor:
        return self.token_embed(seq + self.offset).sum(-2)  # (B, T, G) -> (B, T, D)

    def _states(self, h: Tensor, prev: Tensor) -> Tensor:
        """GPT states (M, D) and the first g sub-tokens (M, g) -> head states (M, g + 1, D)."""
        g = prev.shape[1]
        sub = self.sub_embed(prev + self.offset[:g])  # (M, g, D)
        x = torch.cat([h[:, None], sub.to(h.dtype)], dim=1) + self.pos[: g + 1].to(h.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def logits(self, h: Tensor, seq: Tensor) -> Tensor:
        b = h.shape[0]
        hf = rearrange(h, "b t d -> (b t) d")
        prev = rearrange(seq[..., :-1], "b t g -> (b t) g")  # teacher forcing within a token
        y = self._states(hf, prev)  # (BT, G, D)
        logits = torch.einsum("mgd,gvd->mgv", y, self.out.to(y.dtype))
        return rearrange(logits, "(b t) g v -> b t g v", b=b)

    def sample(self, h: Tensor, pick: Pick) -> Tensor:
        tokens = torch.zeros(h.shape[0], 0, dtype=torch.long, device=h.device)
        for g in range(self.factors):
            # G is small (4-8): recomputing the few head positions is cheaper than a cache.
            y = self._states(h, tokens)[:, -1]  # (M, D)
            logits = y @ self.out[g].to(y.dtype).T  # (M, V)
            tokens = torch.cat([tokens, pick(logits[:, None])], dim=1)  # (M, g + 1)
        return tokens


class BitHead(nn.Module):
    def __init__(self, dim: int, bits: int):
        super().__init__()
        self.factors, self.vocab = bits, 2
        self.token_embed = nn.Linear(bits, dim)
        self.out = nn.Linear(dim, bits)

    def reset_output(self) -> None:
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def embed(self, seq: Tensor) -> Tensor:
        signs = seq.to(self.token_embed.weight.dtype) * 2 - 1  # {0, 1} -> {-1, +1}
        return self.token_embed(signs)  # (B, T, bits) -> (B, T, D)

    def _two_way(self, h: Tensor) -> Tensor:
        logit = self.out(h)  # (..., bits)
        return torch.stack([torch.zeros_like(logit), logit], dim=-1)  # (..., bits, 2)

    def logits(self, h: Tensor, seq: Tensor | None = None) -> Tensor:
        return self._two_way(h)  # (B, T, bits, 2)

    def sample(self, h: Tensor, pick: Pick) -> Tensor:
        return pick(self._two_way(h))  # (M, bits)


def make_head(code_space: dict, dim: int, layers: int, heads: int, multiple_of: int) -> nn.Module:
    kind = code_space["kind"]
    if kind == "index":
        return IndexHead(dim, code_space["vocab_size"])
    if kind == "groups":
        return GroupHead(
            dim, code_space["groups"], code_space["vocab_size"], layers, heads, multiple_of
        )
    if kind == "bits":
        return BitHead(dim, code_space["bits"])
    raise ValueError(
        f"the AR generator models discrete codes; this tokenizer's code space is {kind!r} "
        "(continuous latents need a diffusion generator)"
    )
