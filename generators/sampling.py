"""Sampling for the AR generator: classifier-free guidance, temperature, top-k / top-p.

- CFG on logits (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598; LlamaGen's form
  ``u + s (c - u)``): the batch is doubled, conditional rows first, null-class rows second. It
  acts on every factor the head samples: per sub-token for WeTok's factorized head, on the
  Bernoulli logits (as two-way logits) for bits.
- Guidance schedule: ``constant``, ``linear`` (the scale ramps from 1 at the first token to s
  at the last) or ``pow-cosine``, RAR's power-cosine ramp (Yu et al. 2024,
  https://arxiv.org/abs/2411.00776) that RobusTok uses to make its post-training pairs:
  ``(s - 1) (1 - cos(pi (i / N) ** p)) / 2 + 1`` at token i of N, p = ``cfg_power`` (1.15); at
  peak s = 6 it averages about 3.3 over 256 tokens. Each is restricted to an interval of token
  positions (guidance is off outside it, as in "Applying Guidance in a Limited Interval",
  Kynkaanniemi et al. 2024, https://arxiv.org/abs/2404.07724, here over positions rather than
  noise levels).
- Temperature 0 or top-k 1 is greedy decoding and draws no random numbers. Otherwise logits are
  divided by the temperature, filtered (top-k, then top-p: the smallest set whose probability
  reaches p, the most likely token always kept) and sampled with the Gumbel-max trick from a
  seeded ``torch.Generator``; filtered tokens have logit -inf and are never drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

from vistok.generators.ar import GPT

CFG_SCHEDULES = ("constant", "linear", "pow-cosine")


@dataclass
class SamplingConfig:
    cfg_scale: float = 1.0
    cfg_schedule: Literal["constant", "linear", "pow-cosine"] = "constant"
    cfg_interval: tuple[float, float] = (0.0, 1.0)  # fraction of token positions with guidance
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    cfg_power: float = 1.15  # exponent p of the pow-cosine schedule (RAR / RobusTok)

    def __post_init__(self):
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(
                f"cfg_schedule must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}"
            )
        if self.cfg_power <= 0:
            raise ValueError(f"cfg_power must be > 0, got {self.cfg_power}")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval must satisfy 0 <= start <= end <= 1, got {lo, hi}")
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")

    def scale_at(self, i: int, n: int) -> float:
        """Guidance scale at token position i of n."""
        lo, hi = self.cfg_interval
        if not lo <= i / n < hi:
            return 1.0
        if self.cfg_schedule == "linear":
            return 1.0 + (self.cfg_scale - 1.0) * (i / max(n - 1, 1))
        if self.cfg_schedule == "pow-cosine":
            ramp = (1.0 - math.cos(math.pi * (i / n) ** self.cfg_power)) / 2  # 0 -> ~1
            return 1.0 + (self.cfg_scale - 1.0) * ramp
        return self.cfg_scale

    def to_dict(self) -> dict:
        return asdict(self)


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set every logit outside the top-k / top-p set to -inf (along the last dim)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach p.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def sample_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Logits (..., V) -> sampled indices (...)."""
    logits = _at_least_fp32(logits)
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    where = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape, generator=generator, device=where).to(logits.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    return (logits + gumbel).argmax(-1)


class Picker:
    """What a head calls per factor: logits (M, F, V) -> codes (M, F), guidance included.

    With guidance, M = 2B (conditional rows first); the guided logits (B, F, V) are sampled
    once and the codes returned for both halves, so both streams continue from the same prefix.
    """

    def __init__(self, config: SamplingConfig, guided: bool, generator: torch.Generator | None):
        self.config, self.guided, self.generator = config, guided, generator
        self.scale = 1.0

    def guide(self, logits: Tensor) -> Tensor:
        if not self.guided:
            return _at_least_fp32(logits)
        cond, uncond = _at_least_fp32(logits).chunk(2)
        return uncond + self.scale * (cond - uncond)

    def __call__(self, logits: Tensor) -> Tensor:
        c = self.config
        codes = sample_logits(self.guide(logits), c.temperature, c.top_k, c.top_p, self.generator)
        return torch.cat([codes, codes]) if self.guided else codes


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware runs it natively (CUDA); None = full precision."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def guided_labels(model: GPT, labels: Tensor, config: SamplingConfig) -> tuple[Tensor, list[float]]:
    """The per-position guidance scales, and the labels (B,) -> (2B,) with the null class
    appended when any position is guided (rows B.. give the unconditional logits)."""
    n = model.num_tokens
    scales = [config.scale_at(i, n) for i in range(n)]
    if any(s != 1.0 for s in scales):
        if model.num_classes == 0:
            raise ValueError("an unconditional generator has no guidance: use cfg_scale 1")
        labels = torch.cat([labels, torch.full_like(labels, model.null_class)])
    return labels, scales


def sampling_inputs(
    model: GPT, labels: Tensor, config: SamplingConfig | None
) -> tuple[SamplingConfig, Tensor, list[float]]:
    """What the AR samplers start from: the config (the default when None), the labels on the
    model's device, guided (``guided_labels``), and the per-position guidance scales."""
    if model.training:
        raise RuntimeError("call model.eval() before sampling (dropout would be active)")
    config = config or SamplingConfig()
    labels, scales = guided_labels(model, labels.to(model.norm.weight.device), config)
    return config, labels, scales


def decode_positions(
    model: GPT,
    labels: Tensor,
    choose: Callable[[int, Tensor], Tensor],
    use_cache: bool = True,
    autocast: bool = True,
) -> Tensor:
    """The AR loop that sampling and teacher forcing share: position by position, the hidden
    state h (M, D) of the prefix goes to ``choose(i, h)``, which returns position i's codes
    (M, F); the whole sequence (M, N, F) comes back. ``labels`` (M,) are the (guided) class
    labels on the model's device. ``use_cache=False`` recomputes the prefix at every position."""
    device = labels.device
    m, n = labels.shape[0], model.num_tokens
    amp = autocast_dtype(device) if autocast else None
    dtype = amp or model.norm.weight.dtype
    precision = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    with precision:
        seq = torch.zeros(m, n, model.factors, dtype=torch.long, device=device)  # (M, N, F)
        x = model.class_tokens(labels, m).to(dtype)  # (M, 1, D)
        if use_cache:
            model.setup_cache(m, dtype, device)
        for i in range(n):
            # The hidden state is needed even where a caller keeps its codes: it fills the cache.
            if use_cache:
                h = model.hidden(x, start=i)[:, -1]  # (M, D)
            else:
                h = model.hidden(model.input_sequence(seq[:, :i], labels))[:, -1]
            seq[:, i] = choose(i, h)
            x = model.head.embed(seq[:, i : i + 1]).to(dtype)  # (M, 1, D)
    return seq


@torch.no_grad()
def generate(
    model: GPT,
    labels: Tensor,
    config: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    autocast: bool = True,
) -> Tensor:
    """Sample code maps (B, *token_shape[, F]) for class labels (B,) (-1 = unconditional).

    ``use_cache=False`` recomputes the whole prefix at every position (reference / benchmark).
    """
    b = labels.shape[0]
    config, labels, scales = sampling_inputs(model, labels, config)
    picker = Picker(config, labels.shape[0] > b, generator)

    def choose(i: int, h: Tensor) -> Tensor:
        picker.scale = scales[i]
        return model.head.sample(h, picker)  # (M, F)

    seq = decode_positions(model, labels, choose, use_cache, autocast)
    return model.from_sequence(seq[:b])
