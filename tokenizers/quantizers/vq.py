"""Vector quantization with a learned or EMA codebook.

VQ-VAE, van den Oord et al. 2017: https://arxiv.org/abs/1711.00937 (commitment loss, straight-
through estimator, EMA codebook updates in its appendix). Cosine codebook (l2-normalised codes
and encoder outputs) as in ViT-VQGAN, Yu et al. 2021: https://arxiv.org/abs/2110.04627, and
LlamaGen. Latent perturbation from RobusTok, Qiu et al. 2025 ("Robust Latent Matters"):
https://arxiv.org/abs/2503.08354.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from vistok.tokenizers.quantizers.base import (
    CodeSpace,
    Perturbation,
    Quantizer,
    QuantizerOutput,
    channels_first,
    channels_last,
    index_stats,
    rand,
)

# Distance matrices are built this many elements at a time (64 MB in float32).
_CHUNK_ELEMENTS = 1 << 24


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(x: Tensor) -> Tensor:
    if _distributed():
        dist.all_reduce(x)
    return x


def _gather_rows(x: Tensor) -> Tensor:
    """Concatenate (M_r, D) row blocks of every rank in rank order; M_r may differ."""
    if not _distributed():
        return x
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros(max(sizes), x.shape[1])
    padded[: x.shape[0]] = x
    blocks = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(blocks, padded)
    return torch.cat([b[:s] for b, s in zip(blocks, sizes)])


class VectorQuantizer(Quantizer):
    """Nearest-neighbour codebook lookup; codes (B, *spatial) int64 in [0, codebook_size).

    ``ema_decay`` set: the codebook is a buffer updated by exponential moving averages of the
    assigned encoder outputs (no codebook loss, no codebook gradient); otherwise it is a
    parameter trained by the codebook loss ``||sg(z) - e||^2``. In training the assignment uses the
    codebook as it was before this step's update.

    Dead-code restart: an EMA counter (``usage_decay``) tracks how many tokens of the global
    batch each code receives per training step; every ``restart_every`` steps, codes whose count
    is below ``dead_code_threshold`` are replaced by encoder outputs of the current batch, gathered
    across ranks and picked with a generator seeded by the step, so all ranks restart identically.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        l2_normalize: bool = False,
        ema_decay: float | None = None,
        ema_eps: float = 1e-5,
        dead_code_threshold: float = 0.0,
        restart_every: int = 0,
        usage_decay: float = 0.99,
        perturb_max_delta: int = 100,
    ):
        super().__init__()
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight
        self.l2_normalize = l2_normalize
        self.ema_decay = ema_decay
        self.ema_eps = ema_eps
        self.dead_code_threshold = dead_code_threshold
        self.restart_every = restart_every
        self.usage_decay = usage_decay
        self.perturb_max_delta = perturb_max_delta
        self.in_channels = dim
        self.code_space = CodeSpace("index", channels=dim, vocab_size=codebook_size)

        # Unit-variance init matches a normalised encoder output; the tiny uniform(-1/K, 1/K)
        # init of taming-transformers leaves most codes far from the data (collapse).
        init = torch.randn(codebook_size, dim)
        if l2_normalize:
            init = F.normalize(init, dim=-1)
        if ema_decay is None:
            self.codebook = torch.nn.Parameter(init)
        else:
            self.register_buffer("codebook", init)
            # Cluster sizes start at 1 with sums = codes, so a code unused for a while keeps
            # its position (sum and size decay together) instead of collapsing to 0.
            self.register_buffer("ema_cluster_size", torch.ones(codebook_size))
            self.register_buffer("ema_embed_sum", init.clone())
        self.register_buffer("usage_ema", torch.zeros(codebook_size))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        mode = f"ema={self.ema_decay}" if self.ema_decay is not None else "learned"
        return f"{self.codebook_size}x{self.dim}, l2={self.l2_normalize}, {mode}"

    def _normalized_codebook(self) -> Tensor:
        cb = self.codebook.float()
        return F.normalize(cb, dim=-1) if self.l2_normalize else cb  # (K, D)

    def _scores(self, x: Tensor, cb: Tensor) -> Tensor:
        """Higher = closer; x (m, D), cb (K, D) -> (m, K). Drops ||x||^2 (constant per row)."""
        if self.l2_normalize:
            return x @ cb.t()
        return 2 * x @ cb.t() - (cb * cb).sum(-1)

    def _nearest(self, x: Tensor, cb: Tensor) -> Tensor:
        rows = max(1, _CHUNK_ELEMENTS // cb.shape[0])
        return torch.cat([self._scores(c, cb).argmax(-1) for c in x.split(rows)])  # (M,)

    def forward(self, z: Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = channels_last(z.float())  # (B, *S, D)
            token_shape = x.shape[:-1]
            x = x.reshape(-1, self.dim)  # (M, D)
            if self.l2_normalize:
                x = F.normalize(x, dim=-1)
            cb = self._normalized_codebook()
            with torch.no_grad():
                idx = self._nearest(x.detach(), cb)  # (M,)
            q = cb[idx]  # (M, D)
            commitment = F.mse_loss(x, q.detach())
            loss = self.commitment_weight * commitment
            stats = {"commitment": commitment.detach()}
            if self.ema_decay is None:
                codebook_loss = F.mse_loss(q, x.detach())
                loss = loss + self.codebook_weight * codebook_loss
                stats["codebook"] = codebook_loss.detach()
            # Value is exactly the code (round trip), gradient goes straight to the encoder.
            out = q.detach() + (x - x.detach())
        quantized = channels_first(out.reshape(*token_shape, self.dim)).to(z.dtype)
        codes = idx.reshape(token_shape)
        if self.training:
            self._update(x.detach(), idx)
        stats.update(index_stats(codes, self.codebook_size))
        if self.dead_code_threshold > 0:
            dead = (self.usage_ema < self.dead_code_threshold).float().mean()
            stats["dead_fraction"] = dead
        return QuantizerOutput(quantized, codes, loss, stats)

    def codes_to_latents(self, codes: Tensor) -> Tensor:
        return channels_first(self._normalized_codebook()[codes])  # (B, D, *S)

    # ---- training-time codebook maintenance ---------------------------------------------------

    @torch.no_grad()
    def _update(self, x: Tensor, idx: Tensor) -> None:
        self.step += 1
        counts = torch.bincount(idx, minlength=self.codebook_size).float()  # (K,)
        sums = None
        if self.ema_decay is not None:
            sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, idx, x)  # (K, D)
            # One collective for both, so every rank ends with the same codebook.
            packed = _all_reduce_sum(torch.cat([counts[:, None], sums], dim=1))
            counts, sums = packed[:, 0], packed[:, 1:]
        else:
            counts = _all_reduce_sum(counts)
        self.usage_ema.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)

        if self.ema_decay is not None:
            d = self.ema_decay
            self.ema_cluster_size.mul_(d).add_(counts, alpha=1 - d)
            self.ema_embed_sum.mul_(d).add_(sums, alpha=1 - d)
            # Laplace smoothing keeps never-used codes away from a division by zero.
            n = self.ema_cluster_size.sum()
            size = (self.ema_cluster_size + self.ema_eps) / (n + self.codebook_size * self.ema_eps)
            self.codebook.copy_(self.ema_embed_sum / (size * n)[:, None])

        due = self.restart_every > 0 and int(self.step) % self.restart_every == 0
        if due and self.dead_code_threshold > 0:
            self._restart_dead_codes(x)

    @torch.no_grad()
    def _restart_dead_codes(self, x: Tensor) -> None:
        dead = (self.usage_ema < self.dead_code_threshold).nonzero().squeeze(1)  # (n_dead,)
        if dead.numel() == 0:
            return
        # Each rank offers at most K of its own tokens, so the gather stays small.
        local = x[torch.randperm(x.shape[0], device=x.device)[: self.codebook_size]]
        pool = _gather_rows(local)  # (P, D), identical on every rank
        g = torch.Generator().manual_seed(int(self.step))
        if dead.numel() <= pool.shape[0]:
            pick = torch.randperm(pool.shape[0], generator=g)[: dead.numel()]
        else:
            pick = torch.randint(pool.shape[0], (dead.numel(),), generator=g)
        new = pool[pick.to(pool.device)].to(self.codebook.dtype)  # (n_dead, D)
        self.codebook.data[dead] = new
        if self.ema_decay is not None:
            self.ema_embed_sum[dead] = new
            self.ema_cluster_size[dead] = 1.0
        # A restarted code gets one period of grace before it can be judged dead again.
        self.usage_ema[dead] = self.dead_code_threshold

    # ---- RobusTok latent perturbation ---------------------------------------------------------

    @torch.no_grad()
    def perturb_with(self, codes: Tensor, p: Perturbation) -> Tensor:
        """With probability alpha replace each token by a uniform pick among its delta nearest
        codes (the token's own code first, then the delta - 1 entries nearest to ``p.latents``
        (B, dim, *S), or to the token's own code when None). Change rate alpha*(delta-1)/delta.
        """
        delta = min(int(p.delta), self.codebook_size)
        flat = codes.reshape(-1)  # (M,)
        out = flat.clone()
        if p.alpha <= 0 or delta <= 1 or flat.numel() == 0:
            return out.reshape(codes.shape)
        token = rand((flat.numel(),), p.generator, flat.device) < p.alpha  # (M,)
        which = (
            rand((flat.numel(),), p.generator, flat.device) * delta
        ).long()  # (M,) in [0, delta)
        move = (token & (which > 0)).nonzero().squeeze(1)  # tokens that leave their code
        if move.numel() == 0:
            return out.reshape(codes.shape)
        cb = self._normalized_codebook()
        if p.latents is None:
            query = cb[flat[move]]  # (n, D)
        else:
            query = channels_last(p.latents.float()).reshape(-1, self.dim)[move]  # (n, D)
            if self.l2_normalize:
                query = F.normalize(query, dim=-1)
        rows = max(1, _CHUNK_ELEMENTS // self.codebook_size)
        picked = []
        for sl in torch.arange(move.numel(), device=flat.device).split(rows):
            s = self._scores(query[sl], cb)  # (n, K)
            s.scatter_(1, flat[move[sl]][:, None], float("-inf"))  # index 0 is the own code
            others = s.topk(delta - 1, dim=1).indices  # (n, delta - 1), nearest first
            picked.append(others.gather(1, (which[move[sl]] - 1)[:, None]).squeeze(1))
        out[move] = torch.cat(picked)
        return out.reshape(codes.shape)
