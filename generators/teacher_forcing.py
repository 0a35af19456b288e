"""Teacher-forced regeneration of real code maps by an AR generator: RobusTok's post-training pairs.

RobusTok ("Image Tokenizer Needs Post-Training", 2025) re-generates the code map of a real image
with the trained generator: every token position keeps its ground-truth code with probability
sigma (the preservation ratio, 0.7 in the paper), otherwise the generator samples it conditioned on
the mixed prefix (ground truth where kept, its own samples where not). The decoder is then
post-trained to map these code maps back to the real image. sigma = 1 returns the ground truth
exactly; sigma = 0 is plain generation.

Sampling follows ``vistok.generators.sampling.generate``: classifier-free guidance on the logits of
every factor a head samples (per sub-token for group codes, per bit for binary codes), the same
guidance schedule, temperature, top-k / top-p through ``filter_logits``, greedy decoding at
temperature 0 or top-k 1, one position at a time through the static KV cache. A kept position is
kept whole (all its factors).

Randomness is per sample and drawn up front from the sample's own seed: the keep mask (N,) and one
uniform per (position, factor), turned into a draw by inverse-CDF sampling of the guided, filtered
distribution (the same categorical distribution as the sampler's Gumbel-max draw, but needing
N x F numbers per sample instead of N x F x V). A sample's result therefore depends on its seed,
not on the batch or process it ran in.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from vistok.generators.ar import GPT
from vistok.generators.diffusion import DiffusionSampling
from vistok.generators.sampling import (
    Picker,
    SamplingConfig,
    decode_positions,
    filter_logits,
    guided_labels,
)


class TeacherForced(NamedTuple):
    codes: Tensor  # the regenerated code map, in the tokenizer's layout (B, *token_shape[, F])
    kept: Tensor  # (B, *token_shape) bool: positions that kept their ground-truth code


def sample_from_uniforms(
    logits: Tensor, u: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Tensor:
    """Logits (..., V) and uniforms u (...) in [0, 1) -> indices (...), by inverse CDF.

    Filtered tokens have probability 0 and are never drawn: ``searchsorted(..., right=True)``
    skips every entry where the CDF does not rise.
    """
    logits = logits.double()
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    cdf = probs.cumsum(-1)  # (..., V)
    target = (u.double() * cdf[..., -1]).unsqueeze(-1)  # (..., 1)
    index = torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True).squeeze(-1)
    return index.clamp_max(logits.shape[-1] - 1)


class SeededPicker(Picker):
    """A ``Picker`` whose draws come from pre-drawn per-sample uniforms (B, N, F).

    ``at(i)`` selects the position; a head may call the picker several times per position (one
    sub-token at a time) and each call consumes the next factors' uniforms.
    """

    def __init__(self, config: SamplingConfig, guided: bool, uniforms: Tensor):
        super().__init__(config, guided, None)
        self.uniforms = uniforms  # (B, N, F)
        self.position, self.factor = 0, 0

    def at(self, position: int) -> None:
        self.position, self.factor = position, 0

    def __call__(self, logits: Tensor) -> Tensor:
        c = self.config
        guided = self.guide(logits)  # (B, F', V)
        f = guided.shape[1]
        u = self.uniforms[:, self.position, self.factor : self.factor + f]  # (B, F')
        self.factor += f
        codes = sample_from_uniforms(guided, u, c.temperature, c.top_k, c.top_p)
        return torch.cat([codes, codes]) if self.guided else codes


def draw_randomness(
    seeds: list[int], preservation: float, num_tokens: int, factors: int
) -> tuple[Tensor, Tensor]:
    """Per sample, from its own CPU generator: keep mask (B, N) bool and uniforms (B, N, F).

    Drawn on the CPU so that the same seed gives the same pair on every device.
    """
    keep, uniforms = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        keep.append(torch.rand(num_tokens, generator=g) < preservation)
        uniforms.append(torch.rand(num_tokens, factors, generator=g))
    return torch.stack(keep), torch.stack(uniforms)


@torch.no_grad()
def teacher_forced(
    model: GPT,
    codes: Tensor,
    labels: Tensor,
    preservation: float,
    seeds: list[int],
    config: SamplingConfig | None = None,
    use_cache: bool = True,
    autocast: bool = True,
) -> TeacherForced:
    """Regenerate ground-truth ``codes`` (B, *token_shape[, F]) for class ``labels`` (B,)
    (-1 = unconditional) with preservation ratio sigma = ``preservation`` and one seed per sample.

    ``use_cache=False`` recomputes the whole prefix at every position (reference for tests).
    """
    config = config or SamplingConfig()
    if not 0.0 <= preservation <= 1.0:
        raise ValueError(f"preservation ratio must be in [0, 1], got {preservation}")
    if model.training:
        raise RuntimeError("call model.eval() before sampling (dropout would be active)")
    device = model.norm.weight.device
    gt = model.to_sequence(codes.to(device).long())  # (B, N, F)
    b, n, f = gt.shape
    if n != model.num_tokens or f != model.factors:
        raise ValueError(
            f"codes of shape {tuple(codes.shape)} do not fit this generator (token shape "
            f"{model.token_shape}, {model.factors} factor(s) per token)"
        )
    if len(seeds) != b or labels.shape[0] != b:
        raise ValueError(f"need one seed and one label per sample ({b}), got {len(seeds)} seeds")
    vocab = model.head.vocab
    if gt.min() < 0 or gt.max() >= vocab:
        raise ValueError(f"codes must lie in [0, {vocab}); got [{gt.min()}, {gt.max()}]")
    keep, uniforms = draw_randomness(seeds, preservation, n, f)
    keep, uniforms = keep.to(device), uniforms.to(device)

    labels = labels.to(device)
    labels, scales = guided_labels(model, labels, config)
    m = labels.shape[0]
    picker = SeededPicker(config, m > b, uniforms)

    def choose(i: int, h: Tensor) -> Tensor:
        mixed = gt[:, i]  # (B, F)
        if not keep[:, i].all():
            picker.at(i)
            picker.scale = scales[i]
            sampled = model.head.sample(h, picker)[:b]  # (B, F)
            mixed = torch.where(keep[:, i, None], mixed, sampled)
        return torch.cat([mixed, mixed]) if m > b else mixed  # (M, F)

    seq = decode_positions(model, labels, choose, use_cache, autocast)  # (M, N, F): the mixed map
    kept = keep.reshape(b, *model.token_shape)
    return TeacherForced(model.from_sequence(seq[:b]), kept)


# ---------------------------------------------------------------------------------------------
# The continuous analogue: partial noising and denoising with a flow-matching generator


def sample_noise(seeds: list[int], shape: tuple[int, ...]) -> Tensor:
    """Standard normal noise (B, *shape), each sample from its own CPU generator."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


@torch.no_grad()
def partially_denoised(
    model,
    latents: Tensor,
    labels: Tensor,
    t: float,
    seeds: list[int],
    steps: int = 25,
    cfg_scale: float = 1.0,
    sampler: str = "euler",
) -> Tensor:
    """Continuous latents (B, C, *S) -> what a flow-matching generator makes of them after noising
    to level t (``x_t = (1 - t) x_0 + t eps`` in its normalised space) and integrating back to 0.

    The analogue of teacher forcing for continuous tokenizers: t plays the part of 1 - sigma
    (small t stays close to the real latent, t = 1 is a fresh sample). It is
    ``FlowMatching.denoise_from`` with the noise drawn per sample from its own seed, so that a
    sample's result does not depend on its batch (for one sample and a generator seeded with its
    seed the two are identical).
    """
    if not 0.0 < t <= 1.0:
        raise ValueError(f"t must be in (0, 1], got {t}")
    if len(seeds) != latents.shape[0]:
        raise ValueError(f"need one seed per sample ({latents.shape[0]}), got {len(seeds)}")
    x0 = model.normalize(latents.float())  # (B, C, *S)
    eps = sample_noise(seeds, tuple(x0.shape[1:])).to(x0.device)
    if not model.num_classes:
        labels = torch.full_like(labels, -1)
    config = DiffusionSampling(steps=steps, sampler=sampler, cfg_scale=cfg_scale)
    xt = (1 - t) * x0 + t * eps
    x = model.integrate(xt, labels.to(x0.device), config, t_start=t)
    return model.denormalize(x).to(latents.dtype)
