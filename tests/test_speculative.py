"""Speculative Jacobi decoding: exact mode samples plain sampling's distribution (chi-square
against the enumerated distribution of a toy GPT), greedy outputs are identical, and the relaxed
(LANTERN) mode stays within its total-variation budget; for every head (index, groups, bits)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy.stats import chisquare

from vistok.generators.ar import GPT
from vistok.generators.sampling import SamplingConfig, filter_logits, generate
from vistok.generators.speculative import (
    Neighbours,
    SpeculativeConfig,
    _budgeted_scale,
    speculative_generate,
)

# Four codes per token and three tokens: 64 sequences, all enumerable.
TOY = {
    "index": {"kind": "index", "vocab_size": 4, "channels": 4},
    "groups": {"kind": "groups", "vocab_size": 2, "groups": 2, "bits": 2, "channels": 2},
    "bits": {"kind": "bits", "vocab_size": 2, "bits": 2, "channels": 2},
}
CONFIGS = {
    "cfg_linear_temp": SamplingConfig(cfg_scale=2.0, cfg_schedule="linear", temperature=1.3),
    "cfg_topk_topp": SamplingConfig(cfg_scale=1.5, temperature=1.5, top_k=3, top_p=0.9),
}
ALPHA = 1e-3  # significance level of every statistical assertion


pytestmark = pytest.mark.usefixtures("one_thread")


def toy(kind: str, n: int = 3, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(TOY[kind], [n], 3, "tiny", dropout=0.0, token_dropout=0.0, multiple_of=32)
    for p in model.head.parameters():  # peaked, context-dependent distributions
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.3)
    torch.nn.init.normal_(model.class_embed.weight)
    return model.double().eval()


def all_sequences(model: GPT) -> torch.Tensor:
    """Every code map of the toy, (S, N[, F])."""
    head = model.head
    token = list(itertools.product(range(head.vocab), repeat=head.factors))  # codes per token
    seqs = torch.tensor(list(itertools.product(token, repeat=model.num_tokens)))  # (S, N, F)
    return seqs[..., 0] if model.kind == "index" else seqs


def plain_distribution(model: GPT, label: int, config: SamplingConfig) -> torch.Tensor:
    """Probability of each sequence under plain sampling (S,), by teacher forcing: guided
    logits, temperature, top-k/top-p with the sampler's own filter, product over factors."""
    codes = all_sequences(model)
    labels = torch.full((codes.shape[0],), label)
    with torch.no_grad():
        logits = model(codes, labels)  # (S, N, F, V)
        if config.cfg_scale != 1.0:
            uncond = model(codes, torch.full_like(labels, model.null_class))
            n = model.num_tokens
            scale = torch.tensor([config.scale_at(i, n) for i in range(n)], dtype=logits.dtype)
            logits = uncond + scale[:, None, None] * (logits - uncond)
    logp = filter_logits(logits / config.temperature, config.top_k, config.top_p).log_softmax(-1)
    seq = model.to_sequence(codes)
    return logp.gather(-1, seq[..., None]).sum((1, 2, 3)).exp()


def histogram(model: GPT, codes: torch.Tensor) -> torch.Tensor:
    """Counts of each enumerated sequence among sampled codes (S,)."""
    seq = model.to_sequence(codes).flatten(1)  # (B, N F)
    base = model.head.vocab ** torch.arange(seq.shape[1] - 1, -1, -1)
    return torch.bincount((seq * base).sum(-1), minlength=model.head.vocab ** seq.shape[1])


def draw(sampler, model, label, config, count, seed, batch=1000, **kw):
    counts, stats = 0, None
    for i in range(math.ceil(count / batch)):
        labels = torch.full((batch,), label)
        g = torch.Generator().manual_seed(seed * 1000 + i)
        out = sampler(model, labels, config, g, **kw)
        codes, st = out if isinstance(out, tuple) else (out, None)
        counts = counts + histogram(model, codes)
        stats = st if stats is None else stats + st
    return counts, stats


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit; cells expected below 5 are pooled into one."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].sum()[None].double()])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue)


def tv_slack(cells: int, samples: int) -> float:
    """Upper bound on TV(empirical, true) holding with probability 1 - ALPHA: its mean is at
    most sqrt(cells / samples) / 2, and one sample moves it by at most 1 / samples."""
    return 0.5 * math.sqrt(cells / samples) + math.sqrt(math.log(1 / ALPHA) / (2 * samples))


@pytest.mark.parametrize("kind", list(TOY))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_exact_mode_samples_the_plain_distribution(kind, name):
    model, config, label = toy(kind), CONFIGS[name], 1
    probs = plain_distribution(model, label, config)
    assert abs(float(probs.sum()) - 1) < 1e-9
    plain, _ = draw(generate, model, label, config, 3000, seed=1)
    # Bits: the residual by rejection sampling; groups: over the enumerated codes.
    spec = SpeculativeConfig(window=2, enumerate_codes=0 if kind == "bits" else 4096)
    fast, stats = draw(speculative_generate, model, label, config, 3000, seed=2, spec=spec)
    # The reference is what plain sampling draws, and speculative decoding draws the same.
    assert chi2_pvalue(plain, probs) > ALPHA
    assert chi2_pvalue(fast, probs) > ALPHA
    assert stats.residual_fallbacks == 0
    assert 0 < stats.acceptance_rate < 1  # drafts were both accepted and rejected
    assert stats.forward_passes <= 3 * model.num_tokens  # never more passes than plain


def test_the_goodness_of_fit_test_detects_a_different_distribution():
    model, label = toy("index"), 1
    config = CONFIGS["cfg_linear_temp"]
    probs = plain_distribution(model, label, config)
    hotter = SamplingConfig(cfg_scale=2.0, cfg_schedule="linear", temperature=1.6)
    counts, _ = draw(generate, model, label, hotter, 3000, seed=3)
    assert chi2_pvalue(counts, probs) < ALPHA


@pytest.mark.parametrize("kind", list(TOY))
@pytest.mark.parametrize("window", [1, 4])
def test_greedy_speculative_decoding_gives_the_plain_greedy_codes(kind, window):
    model = toy(kind, n=7)
    labels = torch.tensor([0, 1, 2, -1, 1])
    for config in (SamplingConfig(cfg_scale=3.0, temperature=0.0), SamplingConfig(top_k=1)):
        plain = generate(model, labels, config, torch.Generator().manual_seed(0))
        fast, stats = speculative_generate(
            model, labels, config, torch.Generator().manual_seed(1), SpeculativeConfig(window)
        )
        assert torch.equal(plain, fast)
        assert stats.forward_passes <= model.num_tokens


@pytest.mark.parametrize("kind", list(TOY))
def test_relaxed_mode_stays_within_its_total_variation_budget(kind):
    model, config, label = toy(kind), CONFIGS["cfg_linear_temp"], 2
    if kind == "index":  # a codebook geometry: four points on a line
        neighbours = Neighbours.from_latents(torch.tensor([[0.0], [1.0], [2.5], [4.0]]), k=2)
    else:
        neighbours = Neighbours.hamming(TOY[kind], k=3)
    delta = 0.03
    samples = 8000 if kind == "index" else 4000  # the factored heads are slower to sample
    probs = plain_distribution(model, label, config)
    exact = SpeculativeConfig(window=2)
    relaxed = SpeculativeConfig(window=2, relaxed="lantern", lantern_k=2, lantern_delta=delta)
    _, st_exact = draw(speculative_generate, model, label, config, samples, seed=4, spec=exact)
    counts, st = draw(
        speculative_generate,
        model,
        label,
        config,
        samples,
        seed=5,
        spec=relaxed,
        neighbours=neighbours,
    )
    tv = 0.5 * float((counts / counts.sum() - probs).abs().sum())
    budget = model.num_tokens * delta  # per-token budget delta, summed over the sequence
    assert tv <= budget + tv_slack(probs.numel(), samples)
    if kind == "index":  # group/bit codes cap the extra mass at delta q(x): a small gain
        assert st.acceptance_rate > st_exact.acceptance_rate


def test_budgeted_scale_is_the_largest_within_the_budget():
    g = torch.Generator().manual_seed(0)
    excess = torch.rand(50, 8, generator=g, dtype=torch.float64) * 0.2
    m_all = torch.rand(50, 8, generator=g, dtype=torch.float64) * 0.1
    m_all[:10] *= 0.1  # these rows fit the budget unscaled
    delta = 0.15
    lam = _budgeted_scale(excess, m_all, delta)
    used = torch.minimum(excess, lam[:, None] * m_all).sum(-1)
    assert (used <= delta + 1e-9).all()
    more = torch.minimum(excess, (lam[:, None] + 1e-3).clamp_max(1) * m_all).sum(-1)
    assert ((lam == 1) | (more > delta)).all()  # cannot grow without breaking the budget
    assert (lam < 1).any() and (lam == 1).any()


def test_hamming_neighbours_flip_one_then_two_latent_bits():
    space = {"kind": "groups", "vocab_size": 8, "groups": 2, "bits": 6, "channels": 6}
    nb = Neighbours.hamming(space, k=10)
    code = torch.tensor([5, 2])
    bits = lambda c: [(int(c[g]) >> i) & 1 for g in range(2) for i in range(3)]  # noqa: E731
    dist = [sum(a != b for a, b in zip(bits(code), bits(code ^ x))) for x in nb.xor]
    assert dist == [1] * 6 + [2] * 4
    assert len({tuple((code ^ x).tolist()) for x in nb.xor}) == 10


def test_relaxed_mode_needs_matching_neighbourhoods():
    model = toy("index")
    relaxed = SpeculativeConfig(relaxed="lantern")
    with pytest.raises(ValueError, match="neighbourhoods"):
        speculative_generate(model, torch.tensor([0]), SamplingConfig(), spec=relaxed)
    wrong = Neighbours.hamming(TOY["bits"], k=2)
    with pytest.raises(ValueError, match="neighbourhoods"):
        speculative_generate(
            model, torch.tensor([0]), SamplingConfig(), spec=relaxed, neighbours=wrong
        )
