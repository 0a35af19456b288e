"""Speculative Jacobi decoding for the AR generator: several tokens per forward pass.

Speculative Jacobi Decoding (SJD; Teng et al. 2024, https://arxiv.org/abs/2410.01699) needs no
draft model: the draft for the next ``window`` positions is what the previous forward pass sampled
there (a Jacobi iteration), and positions never predicted yet start from uniform random codes.
One forward pass of the GPT, through the static KV cache, verifies the whole window at once:

- draft token x at position j (drawn from the draft distribution q_j) is accepted with
  probability min(1, p_j(x) / q_j(x)), p_j being the distribution plain sampling draws from
  (guided, temperature, top-k/top-p filtered: the same processing as ``sampling.sample_logits``);
- at the first rejection the position is resampled from norm(max(0, p_j - q_j)) and committed;
  when every draft is accepted, the position after the window is sampled from its p directly;
- the positions after the committed prefix get new drafts sampled from this pass's p (computed
  on the old drafts: that is the Jacobi step), and the KV cache simply restarts at the first
  uncommitted position (entries past it are overwritten by the next pass, never read).

This is the speculative-sampling rule of Leviathan et al. / Chen et al. 2023; it keeps the
sampling distribution exactly, so every pass commits at least one token and a sequence never
needs more passes than plain decoding. Each verification pass counts as one forward pass.

Codes made of several factors (``groups``: WeTok's sub-tokens, ``bits``: Bernoulli bits) are
verified as whole tokens: p(x) and q(x) are the joint probabilities, the product over factors of
the per-factor (guided, filtered) probabilities, each factor conditioned on the previous ones as
the head samples them. Their residual norm(max(0, p - q)) has too many values to enumerate, so it
is sampled exactly by rejection: y ~ p, kept with probability max(0, 1 - q(y) / p(y)); the
expected number of tries given a rejection is 1 / TV(p, q), and a rejection happens with
probability TV(p, q), so on average one try per position. A hard cap (``max_residual_tries``, C)
falls back to p and is counted in the statistics (``residual_fallbacks``); it is reached with
probability TV exp(-C TV) <= 1 / (e C) per position (5.6e-6 for the default 65536).

Relaxed acceptance (LANTERN; Jang et al. 2024, https://arxiv.org/abs/2410.03355), approximate and
off by default: visual tokens are ambiguous (many codes are nearly interchangeable), so the draft
x is accepted with probability min(1, (p(x) + m(x)) / q(x)), where m(x) is the target mass of x's
latent neighbourhood B(x): its ``lantern_k`` nearest codes in the tokenizer's codebook (Euclidean
on ``codes_to_latents`` for index codes, Hamming for bit/group codes) taken in order of distance
while their total mass stays <= delta (LANTERN's B_{k,delta}). On rejection the residual is the
same norm(max(0, p - q)) as in exact mode. The token drawn at a position then deviates from p by
    TV = sum_y min((q(y) - p(y))+, m(y)),
which this module keeps <= delta at every position: for index codes it evaluates this sum
(exactly over the ``BUDGET_CODES`` codes with the largest excess, bounded by the excess itself on
the others) and scales m down (bisection) where it would exceed delta; for group/bit codes it caps
m(x) at delta * q(x), which bounds the sum by delta without enumerating the code space. Over a
sequence of N tokens the total variation to plain sampling is then <= N * delta.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

from vistok.generators.ar import GPT
from vistok.generators.sampling import (
    SamplingConfig,
    _at_least_fp32,
    autocast_dtype,
    filter_logits,
    sample_logits,
    sampling_inputs,
)

NONE, UNIFORM, HIDDEN = 0, 1, 2  # where a position's draft came from
BUDGET_CODES = 256  # codes whose relaxed deviation is evaluated exactly (index codes)

# ---------------------------------------------------------------------------------------------
# Helpers


@dataclass
class SpeculativeConfig:
    """``window``: draft tokens verified per forward pass. ``relaxed``: ``"lantern"`` enables the
    approximate acceptance (``lantern_k`` neighbours, TV budget ``lantern_delta`` per token).
    Group/bit codes with at most ``enumerate_codes`` joint values get their residual computed
    over all of them; larger code spaces sample it by rejection (``max_residual_tries``)."""

    window: int = 16
    relaxed: Literal["none", "lantern"] = "none"
    lantern_k: int = 1000
    lantern_delta: float = 0.1
    max_residual_tries: int = 65536
    enumerate_codes: int = 4096

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.relaxed not in ("none", "lantern"):
            raise ValueError(f"relaxed must be 'none' or 'lantern', got {self.relaxed!r}")
        if self.lantern_k < 1 or not 0.0 <= self.lantern_delta <= 1.0:
            raise ValueError("need lantern_k >= 1 and 0 <= lantern_delta <= 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SpeculativeStats:
    """Counters of one or more ``speculative_generate`` calls (add them with ``+``)."""

    forward_passes: int = 0  # GPT forward passes; each verifies the whole batch's windows
    sequences: int = 0  # images sampled
    tokens: int = 0  # tokens per image
    drafted: int = 0  # draft tokens put to the acceptance test
    accepted: int = 0
    residual_fallbacks: int = 0
    batches: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def passes_per_image(self) -> float:
        """Forward passes needed per image when the batch is decoded together; plain decoding
        needs ``tokens`` (one per position)."""
        return self.forward_passes / max(self.batches, 1)

    def __add__(self, other: SpeculativeStats) -> SpeculativeStats:
        out = SpeculativeStats(**{k: getattr(self, k) + getattr(other, k) for k in _COUNTERS})
        out.tokens = max(self.tokens, other.tokens)
        return out

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            acceptance_rate=self.acceptance_rate,
            forward_passes_per_image=self.passes_per_image,
            speedup_in_passes=self.tokens / self.passes_per_image if self.forward_passes else None,
        )
        return out


_COUNTERS = ("forward_passes", "sequences", "drafted", "accepted", "residual_fallbacks", "batches")


class Neighbours:
    """Latent neighbourhoods of codes, nearest first, the code itself excluded.

    ``table`` (V, k) for index codes (code ids), or ``xor`` (k, F) for group/bit codes (the
    neighbour of code x is ``x ^ xor[i]``: Hamming distance 1, then 2, over the latent bits).
    """

    def __init__(self, table: Tensor | None = None, xor: Tensor | None = None):
        self.table, self.xor = table, xor

    @classmethod
    def from_latents(cls, latents: Tensor, k: int) -> Neighbours:
        """Codebook latents (V, D) -> the k nearest other codes of each (Euclidean)."""
        v = latents.shape[0]
        k = min(k, v - 1)
        dist = torch.cdist(latents.double(), latents.double())  # (V, V)
        dist.fill_diagonal_(math.inf)  # the code itself is not its own neighbour
        return cls(table=dist.topk(k, dim=-1, largest=False).indices)  # (V, k)

    @classmethod
    def hamming(cls, code_space: dict, k: int) -> Neighbours:
        """Flips of one, then two latent bits, in bit order, truncated to k neighbours."""
        if code_space["kind"] == "bits":
            factors, per = code_space["bits"], 1
        else:
            factors = code_space["groups"]
            per = code_space["bits"] // factors
        bits = factors * per
        flips = [(i,) for i in range(bits)]
        flips += [(i, j) for i in range(bits) for j in range(i + 1, bits)]
        xor = torch.zeros(min(k, len(flips)), factors, dtype=torch.long)
        for row, flip in zip(xor, flips):
            for b in flip:  # bit b is bit (b % per) of factor (b // per)
                row[b // per] ^= 1 << (b % per)
        return cls(xor=xor)

    @classmethod
    def from_tokenizer(cls, tokenizer, k: int) -> Neighbours:
        """The tokenizer's codebook geometry for its code space."""
        space = tokenizer.code_space.to_dict()
        if space["kind"] in ("groups", "bits"):
            return cls.hamming(space, k)
        if space["kind"] != "index":
            raise ValueError(f"relaxed acceptance needs discrete codes, not {space['kind']!r}")
        ids = torch.arange(space["vocab_size"], device=_device(tokenizer))[None]  # (1, V)
        with torch.no_grad():
            latents = tokenizer.quantizer.codes_to_latents(ids)  # (1, D, V)
        return cls.from_latents(latents[0].T.float().cpu(), k)


def _device(module: torch.nn.Module) -> torch.device:
    return next(iter(module.parameters()), torch.zeros(())).device


class _Pick:
    """Like ``sampling.Picker`` but with one guidance scale per row (positions differ)."""

    def __init__(self, config: SamplingConfig, guided: bool, scale: Tensor | None, generator):
        self.config, self.guided, self.scale, self.generator = config, guided, scale, generator

    def guide(self, logits: Tensor) -> Tensor:
        logits = _at_least_fp32(logits)
        if not self.guided:
            return logits
        cond, uncond = logits.chunk(2)
        scale = self.scale.to(cond.dtype)
        scale = scale.reshape(*scale.shape, *([1] * (cond.dim() - scale.dim())))
        return uncond + scale * (cond - uncond)

    def __call__(self, logits: Tensor) -> Tensor:
        c = self.config
        codes = sample_logits(self.guide(logits), c.temperature, c.top_k, c.top_p, self.generator)
        return torch.cat([codes, codes]) if self.guided else codes


def _greedy(config: SamplingConfig) -> bool:
    return config.temperature == 0 or config.top_k == 1


def _log_probs(logits: Tensor, config: SamplingConfig) -> Tensor:
    """Guided logits (..., V) -> log-probabilities of the distribution plain sampling draws
    from (temperature, top-k, top-p; greedy: all mass on the argmax)."""
    if _greedy(config):
        top = logits.argmax(-1, keepdim=True)
        out = torch.full_like(logits, -math.inf)
        return out.scatter(-1, top, 0.0)
    return filter_logits(logits / config.temperature, config.top_k, config.top_p).log_softmax(-1)


# ---------------------------------------------------------------------------------------------
# Main module


class _Target:
    """Per-position token distributions of one model pass: joint log-probabilities of given
    codes, samples, and (index codes) full probability vectors."""

    def __init__(self, model: GPT, config: SamplingConfig, guided: bool, generator):
        self.model, self.config, self.guided, self.generator = model, config, guided, generator

    def rows(self, x: Tensor) -> Tensor:
        return torch.cat([x, x]) if self.guided else x

    def log_prob(self, h: Tensor, scale: Tensor, codes: Tensor) -> Tensor:
        """h (M, R, D) hidden states, scale (B, R), codes (B, R, F) -> log p(codes) (B, R)."""
        logits = self.model.head.logits(h, self.rows(codes))  # (M, R, F, V) teacher-forced
        guided = _Pick(self.config, self.guided, scale, None).guide(logits)  # (B, R, F, V)
        logp = _log_probs(guided, self.config)
        return logp.gather(-1, codes[..., None])[..., 0].sum(-1)  # (B, R)

    def probs(self, h: Tensor, scale: Tensor) -> Tensor:
        """Index codes: h (M, R, D) -> p (B, R, V)."""
        logits = self.model.head.logits(h)[:, :, 0]  # (M, R, V)
        guided = _Pick(self.config, self.guided, scale, None).guide(logits)
        return _log_probs(guided, self.config).exp()

    def sample(self, h: Tensor, scale: Tensor) -> Tensor:
        """h (M, R, D) -> codes (B, R, F) drawn exactly as plain sampling draws them."""
        m, r, _ = h.shape
        pick = _Pick(self.config, self.guided, scale.reshape(-1), self.generator)
        codes = self.model.head.sample(h.reshape(m * r, -1), pick)  # (M R, F)
        return codes.reshape(m, r, -1)[: m // 2 if self.guided else m]


class _Drafts:
    """Draft distribution q of each position: uniform over all codes, or the target of the pass
    that drew the draft (its hidden states are kept, so q can be evaluated at any code)."""

    def __init__(self, target: _Target, batch: int, m: int, n: int, dim: int, dtype, device):
        self.target = target
        self.kind = torch.zeros(batch, n, dtype=torch.long, device=device)  # NONE/UNIFORM/HIDDEN
        self.hidden = torch.zeros(m, n, dim, dtype=dtype, device=device)  # (M, N, D)
        head = target.model.head
        self.log_uniform = -head.factors * math.log(head.vocab)

    def log_prob(self, hq: Tensor, kind: Tensor, scale: Tensor, codes: Tensor) -> Tensor:
        """log q(codes) (B, R) given the drafts' hidden states hq (M, R, D); -inf: no draft."""
        out = torch.full(kind.shape, -math.inf, dtype=torch.float64, device=codes.device)
        out = torch.where(kind == UNIFORM, torch.full_like(out, self.log_uniform), out)
        if (kind == HIDDEN).any():
            logq = self.target.log_prob(hq, scale, codes).double()
            out = torch.where(kind == HIDDEN, logq, out)
        return out

    def probs(self, hq: Tensor, kind: Tensor, scale: Tensor) -> Tensor:
        """Index codes: q (B, R, V); zero where there is no draft."""
        q = self.target.probs(hq, scale).double()
        q = torch.where((kind == HIDDEN)[..., None], q, torch.zeros_like(q))
        vocab = q.shape[-1]
        return torch.where((kind == UNIFORM)[..., None], torch.full_like(q, 1.0 / vocab), q)

    def hidden_at(self, pos: Tensor) -> Tensor:
        """Each row's draft hidden states at its own position pos (B,) -> (M, 1, D)."""
        m = self.hidden.shape[0]
        pos = pos.repeat(m // pos.shape[0])
        return self.hidden[torch.arange(m, device=pos.device), pos][:, None]


def _model_rows(idx: Tensor, batch: int, guided: bool) -> Tensor:
    """Row indices (R,) of the decisions -> rows of the model batch (conditional, then null)."""
    return torch.cat([idx, idx + batch]) if guided else idx


def _rand(shape, generator, device, dtype=torch.float64) -> Tensor:
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where, dtype=dtype).to(device)


def _lantern_mass_index(p: Tensor, draft: Tensor, table: Tensor, delta: float) -> Tensor:
    """m(x): p's mass over x's neighbours taken nearest first while it stays <= delta
    (LANTERN's B_{k,delta}). p (B, R, V), draft (B, R) -> (B, R)."""
    pn = p.gather(-1, table[draft])  # (B, R, k)
    return (pn * (pn.cumsum(-1) <= delta)).sum(-1)


def _budgeted_scale(excess: Tensor, m_all: Tensor, delta, steps: int = 30) -> Tensor:
    """Largest lam in [0, 1] with sum_y min(excess(y), lam m(y)) <= delta (a float or one per
    row), per row (bisection; the sum is concave and increasing in lam); 0 when even lam = 0
    does not fit. excess, m_all (B, R, V) -> lam (B, R)."""
    total = lambda lam: torch.minimum(excess, lam[..., None] * m_all).sum(-1)  # noqa: E731
    lo = torch.zeros(excess.shape[:-1], dtype=excess.dtype, device=excess.device)
    hi = torch.ones_like(lo)
    ok = total(hi) <= delta
    for _ in range(steps):
        mid = (lo + hi) / 2
        fits = total(mid) <= delta
        lo, hi = torch.where(fits, mid, lo), torch.where(fits, hi, mid)
    return torch.where(ok, torch.ones_like(lo), lo)


@torch.no_grad()
def speculative_generate(
    model: GPT,
    labels: Tensor,
    config: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    spec: SpeculativeConfig | None = None,
    neighbours: Neighbours | None = None,
    autocast: bool = True,
) -> tuple[Tensor, SpeculativeStats]:
    """Sample code maps (B, *token_shape[, F]) for labels (B,) like ``sampling.generate``, in
    fewer forward passes. Exact mode draws from the same distribution as ``generate`` (and the
    same codes under greedy decoding); ``spec.relaxed="lantern"`` needs ``neighbours``.
    Returns the codes and the pass/acceptance counters.

    The rows of a batch share one KV cache position: each pass starts at the least advanced
    row, and rows further ahead feed their committed codes there again (same cache entries).
    """
    b, n, f, v = labels.shape[0], model.num_tokens, model.factors, model.head.vocab
    config, labels, scales = sampling_inputs(model, labels, config)
    spec = spec or SpeculativeConfig()
    relaxed = spec.relaxed == "lantern" and not _greedy(config) and spec.lantern_delta > 0
    index = model.kind == "index"
    if relaxed and (neighbours is None or (neighbours.table is None) == index):
        raise ValueError(
            f"relaxed acceptance needs the neighbourhoods of the generator's {model.kind!r} "
            "codes: neighbours=Neighbours.from_tokenizer(tokenizer, k)"
        )
    device = model.norm.weight.device
    scales_all = torch.tensor(scales, device=device)
    m = labels.shape[0]
    guided = m > b
    amp = autocast_dtype(device) if autocast else None
    dtype = amp or model.norm.weight.dtype

    target = _Target(model, config, guided, generator)
    drafts = _Drafts(target, b, m, n, model.dim, dtype, device)
    stats = SpeculativeStats(sequences=b, tokens=n, batches=1)
    seq = torch.zeros(b, n, f, dtype=torch.long, device=device)  # committed codes, then drafts
    done = torch.zeros(b, dtype=torch.long, device=device)  # committed count per row
    rows = torch.arange(b, device=device)

    precision = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    with precision:
        model.setup_cache(m, dtype, device)
        cls = model.class_tokens(labels, m).to(dtype)  # (M, 1, D)
        while int(done.min()) < n:
            s = int(done.min())
            t = min(spec.window + 1, n - s)  # predicts positions s .. s + t - 1
            pos = torch.arange(s, s + t, device=device)  # (T,)
            ahead = pos[None] >= done[:, None]  # (B, T) not committed yet
            # Uniform random drafts where a fed position has none yet (SJD's initialisation).
            fill = ahead[:, :-1] & (drafts.kind[:, s : s + t - 1] == NONE)
            if fill.any():
                where = generator.device if generator is not None else device
                rand = torch.randint(v, (b, t - 1, f), generator=generator, device=where)
                seq[:, s : s + t - 1][fill] = rand.to(device)[fill]
                drafts.kind[:, s : s + t - 1][fill] = UNIFORM
            # One pass over [code s-1 (or the class), codes s .. s+t-2]; the cache holds 0..s-1.
            x = model.head.embed(target.rows(seq[:, max(s - 1, 0) : s + t - 1])).to(dtype)
            x = torch.cat([cls, x], dim=1) if s == 0 else x  # (M, T, D)
            h = model.hidden(x, start=s)  # (M, T, D)
            stats.forward_passes += 1

            scale = scales_all[pos].expand(b, t)  # (B, T)
            kind = torch.where(ahead, drafts.kind[:, s : s + t], 0)  # (B, T)
            codes = seq[:, s : s + t]  # (B, T, F)
            tested = kind != NONE
            logp = target.log_prob(h, scale, codes).double()  # (B, T)
            if _greedy(config):
                ok = logp == 0  # the draft is the argmax path
            else:
                logq = drafts.log_prob(drafts.hidden[:, s : s + t], kind, scale, codes)
                if relaxed:
                    gain = _relaxed_mass(
                        target, drafts, h, s, kind, scale, codes, logq, spec, neighbours
                    )
                    logp = torch.logaddexp(logp, gain.clamp_min(1e-300).log())
                ok = _rand((b, t), generator, device).log() < logp - logq
            ok = (ok & tested) | ~ahead  # committed positions pass through
            cols = torch.arange(t, device=device)
            first = torch.where(ok, t, cols).min(-1).values  # (B,) first rejection, t = none
            live = done < n
            first = torch.where(live, first, t)
            reject = live & (first < t)
            accepted = (first - (done - s)).clamp_min(0)
            stats.accepted += int(accepted[live].sum())
            stats.drafted += int(accepted[live].sum())
            stats.drafted += int(tested[rows, first.clamp_max(t - 1)][reject].sum())

            if reject.any():  # the first rejected position: resample from the residual
                col = first.clamp_max(t - 1)
                new = _residual(target, drafts, h, s, kind, scale, col, reject, spec, stats)
                seq[rows[reject], s + col[reject]] = new[reject]
            # Fresh drafts from this pass for every position after the new commit point.
            after = pos[None] > (s + first)[:, None]  # (B, T)
            if after.any():
                fresh = target.sample(h, scale)  # (B, T, F)
                seq[:, s : s + t][after] = fresh[after]
                drafts.kind[:, s : s + t][after] = HIDDEN
                drafts.hidden[:, s : s + t][target.rows(after)] = h[target.rows(after)]
            done = torch.where(live, s + torch.clamp(first + 1, max=t), done)
    model.clear_cache()
    return model.from_sequence(seq), stats


def _relaxed_mass(target, drafts, h, s, kind, scale, codes, logq, spec, nb) -> Tensor:
    """LANTERN's neighbourhood mass m(x) (B, T) of each draft, within the per-token budget."""
    delta = spec.lantern_delta
    if nb.table is not None:  # index codes: everything enumerable
        p = target.probs(h, scale).double()  # (B, T, V)
        table = nb.table.to(p.device)
        m = _lantern_mass_index(p, codes[..., 0], table, delta)  # (B, T)
        q = drafts.probs(drafts.hidden[:, s : s + p.shape[1]], kind, scale)
        excess = (q - p).clamp_min(0)  # (B, T, V)
        # The deviation sum_y min(excess(y), lam m(y)) is evaluated exactly on the codes with the
        # largest excess and bounded by sum(excess) on the rest: a conservative lam, at the cost
        # of (B, T, BUDGET_CODES, k) instead of (B, T, V, k).
        top = min(BUDGET_CODES, p.shape[-1])
        ex_top, y_top = excess.topk(top, dim=-1)  # (B, T, Y)
        rest = excess.sum(-1) - ex_top.sum(-1)  # (B, T)
        nbr = table[y_top]  # (B, T, Y, k)
        pn = p.gather(-1, nbr.flatten(-2)).view(nbr.shape)  # p over each y's neighbours
        m_top = (pn * (pn.cumsum(-1) <= delta)).sum(-1)  # (B, T, Y)
        return m * _budgeted_scale(ex_top, m_top, delta - rest)
    # Group/bit codes: neighbours y = x ^ xor, their probabilities by teacher forcing.
    xor = nb.xor.to(codes.device)  # (K, F)
    bsz, t, f = codes.shape
    k = xor.shape[0]
    nbr = codes[:, :, None] ^ xor  # (B, T, K, F)
    hk = h[:, :, None].expand(-1, -1, k, -1).reshape(h.shape[0], t * k, -1)  # (M, T K, D)
    logp_n = target.log_prob(hk, scale.repeat_interleave(k, -1), nbr.reshape(bsz, t * k, f))
    pn = logp_n.reshape(bsz, t, k).double().exp()  # (B, T, K)
    m = (pn * (pn.cumsum(-1) <= delta)).sum(-1)
    return torch.minimum(m, delta * logq.exp())  # then sum_y min(., m(y)) <= delta


def _residual(target, drafts, h, s, kind, scale, col, reject, spec, stats) -> Tensor:
    """Codes (B, F) drawn from norm(max(0, p - q)) at window column ``col`` (B,) of each row
    (only the rows in ``reject`` are meaningful)."""
    bsz = col.shape[0]
    rows = torch.arange(bsz, device=col.device)
    head = target.model.head
    joint = head.vocab**head.factors
    mrows = _model_rows(rows, bsz, target.guided)
    hp = h[mrows, col.repeat(mrows.shape[0] // bsz)][:, None]  # (M, 1, D) target states
    hq = drafts.hidden_at(s + col)  # (M, 1, D) draft states
    sc, kc = scale[rows, col][:, None], kind[rows, col][:, None]  # (B, 1)
    if _greedy(target.config):
        return target.sample(hp, sc)[:, 0]
    if target.model.kind == "index":
        p = target.probs(hp, sc).double()[:, 0]  # (B, V)
        q = drafts.probs(hq, kc, sc)[:, 0]
        res = (p - q).clamp_min(0)
        res = torch.where(res.sum(-1, keepdim=True) <= 1e-12, p, res)  # p == q up to rounding
        gumbel = -torch.log(-torch.log(_rand(res.shape, target.generator, res.device)))
        return (res.log() + gumbel).argmax(-1, keepdim=True)  # (B, 1)
    out = torch.zeros(bsz, head.factors, dtype=torch.long, device=col.device)
    if joint <= spec.enumerate_codes:  # small joint space: the residual over every code
        digits = torch.arange(joint, device=col.device)[:, None] // head.vocab ** torch.arange(
            head.factors - 1, -1, -1, device=col.device
        )
        codes = (digits % head.vocab)[None]  # (1, C, F)
        idx = reject.nonzero()[:, 0]
        sel = _model_rows(idx, bsz, target.guided)
        r = idx.shape[0]
        sk, kk = sc[idx].expand(-1, joint), kc[idx].expand(-1, joint)  # (R, C)
        p = target.log_prob(hp[sel].expand(-1, joint, -1), sk, codes.expand(r, -1, -1)).exp()
        q = drafts.log_prob(hq[sel].expand(-1, joint, -1), kk, sk, codes.expand(r, -1, -1)).exp()
        res = (p.double() - q).clamp_min(0)
        res = torch.where(res.sum(-1, keepdim=True) <= 1e-12, p.double(), res)
        gumbel = -torch.log(-torch.log(_rand(res.shape, target.generator, res.device)))
        out[idx] = codes[0, (res.log() + gumbel).argmax(-1)]
        return out
    # Exact rejection sampling: y ~ p, kept with probability max(0, 1 - q(y) / p(y)).
    pending = reject.clone()
    tries, per_round = 0, 1  # most rows succeed at once; the few left get more candidates
    while pending.any() and tries < spec.max_residual_tries:
        idx = pending.nonzero()[:, 0]
        sel = _model_rows(idx, bsz, target.guided)
        hpk, hqk = hp[sel].expand(-1, per_round, -1), hq[sel].expand(-1, per_round, -1)
        sk, kk = sc[idx].expand(-1, per_round), kc[idx].expand(-1, per_round)  # (R, K)
        y = target.sample(hpk, sk)  # (R, K, F)
        logp = target.log_prob(hpk, sk, y).double()
        logq = drafts.log_prob(hqk, kk, sk, y)
        keep = (1 - (logq - logp).exp()).clamp_min(0)
        hit = _rand(keep.shape, target.generator, keep.device) < keep  # (R, K)
        got = hit.any(-1)
        out[idx[got]] = y[got, hit.float().argmax(-1)[got]]
        pending[idx[got]] = False
        tries += per_round
        per_round = min(2 * per_round, 1024)
    if pending.any():  # only when p and q (nearly) coincide: fall back to p, and count it
        stats.residual_fallbacks += int(pending.sum())
        out[pending] = target.sample(hp, sc)[:, 0][pending]
    return out
