"""Latent diffusion transformer (DiT / SiT) trained with flow matching over continuous latents.

- Net: DiT (Peebles & Xie 2023, https://arxiv.org/abs/2212.09748): patchified latents, fixed
  sin-cos positions, one shared timestep + class embedding summed into the condition ``c`` that
  drives adaLN-Zero in every block (shift / scale / gate from ``c``, gates zero-initialised so
  every block starts as the identity), timm's attention and MLP. Works on 2D latent grids
  (B, C, H, W) with p x p patches and on 1D token sets (B, C, N) (1D tokenizers, GPSToken) with
  1D positions; patch size 1 there unless set. Presets S/B/L/XL use DiT's widths and depths.
- Objective: rectified flow / flow matching as in SiT (Ma et al. 2024,
  https://arxiv.org/abs/2401.08740) with the time convention of SD3 and diffusers'
  ``FlowMatchEulerDiscreteScheduler``: ``x_t = (1 - t) x_0 + t eps``, t = 1 is pure noise, the
  net predicts the velocity ``eps - x_0``; t is drawn logit-normal (SD3, Esser et al. 2024,
  https://arxiv.org/abs/2403.03206; diffusers' ``compute_density_for_timestep_sampling``).
- Latents are normalised per channel with statistics computed once from the training codes
  (``extract_codes`` writes them, the training module copies them into buffers, so they live in
  the generator's checkpoint and export); the net works in normalised space, and everything
  given to or returned by ``generate`` / ``denoise_from`` is in the tokenizer's raw scale.
- Sampling: Euler or Heun from t = 1 to 0 on a uniform grid, CFG ``u + s (c - u)`` on the
  velocity, optionally only over part of the trajectory (Kynkaanniemi et al. 2024,
  https://arxiv.org/abs/2404.07724). The samplers are written here rather than taken from
  diffusers' FlowMatch{Euler,Heun}DiscreteScheduler: those are stateful over a fixed schedule,
  while ``denoise_from`` must start at any t and CFG must be switched per evaluation point; the
  Euler step is tested to equal ``FlowMatchEulerDiscreteScheduler.step`` on the same sigmas.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from diffusers.models.embeddings import (
    TimestepEmbedding,
    Timesteps,
    get_1d_sincos_pos_embed_from_grid,
    get_2d_sincos_pos_embed,
)
from diffusers.training_utils import compute_density_for_timestep_sampling
from einops import rearrange
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from vistok.common.configurable import Configurable

# ---------------------------------------------------------------------------------------------
# Helpers


@dataclass
class DiffusionSampling:
    """How ``generate`` integrates. ``sampler``: ``euler`` / ``heun`` for flow matching,
    ``posterior`` for bits, None = the generator's own default; ``cfg_interval`` is the fraction
    of the trajectory with guidance, measured as progress from noise (0) to data (1);
    ``temperature`` divides the bit logits (binary diffusion only)."""

    steps: int = 50
    sampler: Literal["euler", "heun", "posterior"] | None = None
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    temperature: float = 1.0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.sampler not in (None, "euler", "heun", "posterior"):
            raise ValueError(f"sampler must be euler, heun or posterior, got {self.sampler!r}")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval must satisfy 0 <= start <= end <= 1, got {lo, hi}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def scale_at(self, t: float) -> float:
        """Guidance scale at noise level t (progress 1 - t along the trajectory)."""
        lo, hi = self.cfg_interval
        return self.cfg_scale if lo <= 1.0 - t <= hi else 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    """Normal noise drawn on the generator's device (a CPU generator also serves CUDA runs)."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where).to(device)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_positions(dim: int, grid: tuple[int, ...]) -> Tensor:
    """Fixed sin-cos position table (N, dim) for a 2D grid (h, w) or a 1D set (n,)."""
    if len(grid) == 2:
        return get_2d_sincos_pos_embed(dim, grid, base_size=grid[0]).float()
    return get_1d_sincos_pos_embed_from_grid(dim, torch.arange(grid[0]).float()).float()


# ---------------------------------------------------------------------------------------------
# Blocks


class LabelEmbedder(nn.Module):
    """Class embedding with a null class (the last row) for CFG; labels < 0 mean unconditional.
    In training each label becomes the null class with probability ``dropout`` (as in GPT)."""

    def __init__(self, num_classes: int, dim: int, dropout: float):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        null = torch.full_like(labels, self.num_classes)
        labels = torch.where(labels < 0, null, labels)
        if self.training and self.dropout > 0:
            labels = torch.where(
                torch.rand(labels.shape, device=labels.device) < self.dropout, null, labels
            )
        return self.table(labels)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)  # (B, D) x6
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """The denoising transformer: (B, in_channels, *token_shape), t (B,) in [0, 1], labels (B,)
    -> (B, out_channels, *token_shape). Shared by flow matching and binary diffusion.

    diffusers' ``DiTTransformer2DModel`` is not used: it gives every block its own timestep and
    label embedder (DiT shares one) and handles 2D grids only.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        token_shape: tuple[int, ...],
        patch_size: int,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        label_dropout: float = 0.1,
        qk_norm: bool = False,
    ):
        super().__init__()
        if len(token_shape) not in (1, 2):
            raise ValueError(f"token_shape must be (n,) or (h, w), got {token_shape}")
        if any(s % patch_size for s in token_shape):
            raise ValueError(f"patch_size {patch_size} does not divide token_shape {token_shape}")
        self.token_shape, self.patch = tuple(token_shape), patch_size
        self.grid = tuple(s // patch_size for s in token_shape)
        self.out_channels = out_channels
        patch_dim = in_channels * patch_size ** len(token_shape)
        self.embed = nn.Linear(patch_dim, dim)
        self.register_buffer("pos", sincos_positions(dim, self.grid)[None], persistent=False)
        # t in [0, 1] is scaled to DiT's 0..1000 so the frequencies resolve it.
        self.t_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.t_embed = TimestepEmbedding(256, dim)
        self.y_embed = LabelEmbedder(num_classes, dim, label_dropout)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final = FinalLayer(dim, out_channels * patch_size ** len(token_shape))
        self._init_weights()

    @classmethod
    def sized(
        cls,
        channels: int,
        token_shape: tuple[int, ...],
        patch_size: int,
        num_classes: int,
        preset: str,
        sizes: dict[str, int | None],
        **options,
    ) -> DiT:
        """A ``channels`` -> ``channels`` DiT of size ``preset``, with the ``depth`` / ``dim`` /
        ``heads`` of ``sizes`` that are not None overriding it; ``options`` as in ``__init__``."""
        cfg = preset_config(preset, **sizes)
        dims = (cfg["dim"], cfg["depth"], cfg["heads"])
        return cls(channels, channels, token_shape, patch_size, num_classes, *dims, **options)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.table.weight, std=0.02)
        for lin in (self.t_embed.linear_1, self.t_embed.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        # adaLN-Zero: every block and the output start at zero.
        for block in [*self.blocks, self.final]:
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        nn.init.zeros_(self.final.linear.weight)

    def patchify(self, x: Tensor) -> Tensor:
        p = self.patch
        if len(self.token_shape) == 2:
            return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)
        return rearrange(x, "b c (n p) -> b n (p c)", p=p)

    def unpatchify(self, x: Tensor) -> Tensor:
        p, c = self.patch, self.out_channels
        if len(self.token_shape) == 2:
            h, w = self.grid
            return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p, c=c)
        return rearrange(x, "b n (p c) -> b c (n p)", p=p, c=c)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        h = self.embed(self.patchify(x)) + self.pos.to(x.dtype)  # (B, N, D)
        temb = self.t_proj(t.reshape(-1) * 1000).to(h.dtype)  # (B, 256)
        c = self.t_embed(temb) + self.y_embed(labels).to(h.dtype)  # (B, D)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final(h, c))  # (B, out, *token_shape)


# ---------------------------------------------------------------------------------------------
# Main module


class FlowMatching(Configurable, nn.Module):
    """Class-conditional flow-matching generator over a continuous tokenizer's latents.

    Args:
        code_space: the tokenizer's ``CodeSpace.to_dict()`` (kind "continuous").
        token_shape: ``[h, w]`` (2D latent grid) or ``[n]`` (1D token set).
        num_classes: class labels; label ``num_classes`` is the null class. 0 = unconditional.
        preset: a name in ``DIT_PRESETS``; ``depth``/``dim``/``heads`` override it.
        patch_size: default 2 for 2D grids (DiT-x/2), 1 for 1D token sets.
        label_dropout: probability of the null label in training (for CFG).
        logit_mean / logit_std: the logit-normal timestep distribution (SD3: 0, 1).
        qk_norm: LayerNorm on queries and keys (guards long runs against NaN).
    """

    kind = "flow"

    def __init__(
        self,
        code_space: dict,
        token_shape: list[int],
        num_classes: int = 1000,
        preset: str = "B",
        patch_size: int | None = None,
        depth: int | None = None,
        dim: int | None = None,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        label_dropout: float = 0.1,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        qk_norm: bool = False,
    ):
        super().__init__()
        if code_space["kind"] != "continuous":
            raise ValueError(
                f"flow matching models continuous latents, but this tokenizer's codes are "
                f"{code_space['kind']!r}: use generator/ar.yaml (or binary_diffusion.yaml for bits)"
            )
        self.token_shape = tuple(int(s) for s in token_shape)
        self.channels, self.num_classes = code_space["channels"], num_classes
        self.logit_mean, self.logit_std = logit_mean, logit_std
        patch = patch_size or (2 if len(self.token_shape) == 2 else 1)
        sizes = dict(depth=depth, dim=dim, heads=heads)
        options = dict(mlp_ratio=mlp_ratio, label_dropout=label_dropout, qk_norm=qk_norm)
        self.net = DiT.sized(
            self.channels, self.token_shape, patch, num_classes, preset, sizes, **options
        )
        # Per-channel latent statistics; set once from the data (``set_latent_stats``).
        self.register_buffer("latent_mean", torch.zeros(self.channels))
        self.register_buffer("latent_std", torch.ones(self.channels))
        self.register_buffer("has_stats", torch.zeros((), dtype=torch.bool))

    # --- latent normalisation ----------------------------------------------------------------
    def set_latent_stats(self, mean, std) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.numel() != self.channels or std.numel() != self.channels:
            raise ValueError(f"latent stats need {self.channels} channels, got {mean.numel()}")
        if not torch.all(std > 0):
            raise ValueError("latent std must be > 0 for every channel")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)
        self.has_stats.fill_(True)

    def _stat(self, s: Tensor, x: Tensor) -> Tensor:
        return s.to(x.dtype).reshape(1, -1, *([1] * len(self.token_shape)))  # (1, C, 1[, 1])

    def normalize(self, latents: Tensor) -> Tensor:
        return (latents - self._stat(self.latent_mean, latents)) / self._stat(
            self.latent_std, latents
        )

    def denormalize(self, x: Tensor) -> Tensor:
        return x * self._stat(self.latent_std, x) + self._stat(self.latent_mean, x)

    # --- training ------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """Velocity (B, C, *S) at normalised latents x, noise level t (B,)."""
        if labels is None:
            labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        return self.net(x, t, labels)

    def loss(
        self, codes: Tensor, labels: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Velocity MSE at logit-normal t; stats: the MSE at low / high noise halves."""
        x0 = self.normalize(codes.float())  # (B, C, *S)
        b = x0.shape[0]
        t = compute_density_for_timestep_sampling(
            "logit_normal",
            b,
            self.logit_mean,
            self.logit_std,
            device=generator.device if generator is not None else x0.device,
            generator=generator,
        ).to(x0.device)  # (B,)
        eps = randn(tuple(x0.shape), generator, x0.device)
        tb = t.reshape(b, *([1] * (x0.dim() - 1)))
        xt = (1 - tb) * x0 + tb * eps
        err = (self(xt, t, labels).float() - (eps - x0)).square().flatten(1).mean(1)  # (B,)
        with torch.no_grad():
            low = t < 0.5
            stats = {
                "mse_low_noise": err[low].mean() if low.any() else err.new_zeros(()),
                "mse_high_noise": err[~low].mean() if (~low).any() else err.new_zeros(()),
            }
        return err.mean(), stats

    # --- sampling ------------------------------------------------------------------------------
    def velocity(self, x: Tensor, t: float, labels: Tensor, cfg_scale: float) -> Tensor:
        """Guided velocity ``u + s (c - u)``: one doubled batch, conditional rows first."""
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        if cfg_scale == 1.0:
            return self(x, tt, labels)
        null = torch.full_like(labels, -1)
        v = self(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
        cond, uncond = v.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    @torch.no_grad()
    def integrate(
        self, x: Tensor, labels: Tensor, config: DiffusionSampling, t_start: float = 1.0
    ) -> Tensor:
        """Solve the ODE from noise level ``t_start`` to 0 in ``config.steps`` uniform steps
        (normalised space). Heun uses two evaluations per step (2 x steps in all)."""
        if config.sampler == "posterior":
            raise ValueError("the posterior sampler is for bits; flow matching takes euler/heun")
        ts = torch.linspace(t_start, 0.0, config.steps + 1).tolist()
        heun = config.sampler == "heun"
        for t, t_next in zip(ts[:-1], ts[1:]):
            v = self.velocity(x, t, labels, config.scale_at(t))
            x_next = x + (t_next - t) * v
            if heun:
                v_next = self.velocity(x_next, t_next, labels, config.scale_at(t_next))
                x_next = x + (t_next - t) * 0.5 * (v + v_next)
            x = x_next
        return x

    def _labels(self, labels: Tensor | None, batch: int, device) -> Tensor:
        if labels is None or not self.num_classes:
            return torch.full((batch,), -1, dtype=torch.long, device=device)
        return labels.to(device)

    @torch.no_grad()
    def generate(
        self, labels: Tensor, config: DiffusionSampling, generator: torch.Generator | None = None
    ) -> Tensor:
        """Raw latents (B, C, *token_shape) in the tokenizer's scale, ready for ``detokenize``."""
        device = self.latent_mean.device
        labels = self._labels(labels, len(labels), device)
        noise = randn((len(labels), self.channels, *self.token_shape), generator, device)
        return self.denormalize(self.integrate(noise, labels, config))

    @torch.no_grad()
    def denoise_from(
        self,
        latents: Tensor,
        t: float,
        labels: Tensor | None = None,
        steps: int = 25,
        cfg_scale: float = 1.0,
        generator: torch.Generator | None = None,
        sampler: Literal["euler", "heun"] = "euler",
    ) -> Tensor:
        """Partially noise RAW latents (the tokenizer's scale, as ``encode`` returns them) to
        noise level t in (0, 1] (``x_t = (1 - t) x_0 + t eps``, in normalised space) and
        integrate back to t = 0 in ``steps`` steps; returns raw latents (B, C, *S). t = 1 is a
        fresh sample, small t stays close to the input. For decoder post-training."""
        if not 0.0 < t <= 1.0:
            raise ValueError(f"t must be in (0, 1], got {t}")
        x0 = self.normalize(latents.float())
        labels = self._labels(labels, x0.shape[0], x0.device)
        xt = (1 - t) * x0 + t * randn(tuple(x0.shape), generator, x0.device)
        config = DiffusionSampling(steps=steps, sampler=sampler, cfg_scale=cfg_scale)
        return self.denormalize(self.integrate(xt, labels, config, t_start=t)).to(latents.dtype)


def preset_config(preset: str, **overrides) -> dict:
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choose one of {sorted(DIT_PRESETS)}")
    return {**DIT_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}


# ---------------------------------------------------------------------------------------------
# Presets: DiT-S/B/L/XL (Peebles & Xie 2023, Table 1: 33M / 130M / 458M / 675M at patch 2), plus
# a tiny size for CPU tests.

DIT_PRESETS: dict[str, dict] = {
    "tiny": dict(depth=2, dim=64, heads=4),
    "S": dict(depth=12, dim=384, heads=6),
    "B": dict(depth=12, dim=768, heads=12),
    "L": dict(depth=24, dim=1024, heads=16),
    "XL": dict(depth=28, dim=1152, heads=16),
}
