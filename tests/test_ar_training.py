"""A GPT trained on CPU learns a synthetic code distribution of known structure.

Each class is a fixed 4x4 map of 16-valued codes; every token is replaced by a uniform random
code with probability 0.1. The true entropy is ~0.565 nats per token (uniform: ln 16 = 2.77), and
samples of class c should match c's template on ~90.6% of positions. The same joint values are
written as an index, as 2 groups of 2 bits' worth (4 values each), and as 4 bits. Independent
Bernoulli bits cannot represent "all four bits replaced together": their best is each bit right
with probability 0.95, i.e. 4 H(0.95) = 0.794 nats and a 0.95^4 = 81.5% match.
"""

from __future__ import annotations

import math

import pytest
import torch

from vistok.generators.ar import GPT
from vistok.generators.sampling import SamplingConfig, generate

SPACES = {
    "index": {"kind": "index", "vocab_size": 16, "channels": 4},
    "groups": {"kind": "groups", "vocab_size": 4, "groups": 2, "bits": 4, "channels": 4},
    "bits": {"kind": "bits", "vocab_size": 2, "bits": 4, "channels": 4},
}
CLASSES, SIDE, NOISE = 4, 4, 0.1
CFG = 2.0  # guidance keeps samples on their class when their own errors pile up


pytestmark = pytest.mark.usefixtures("one_thread")


def best_nll(kind: str) -> tuple[float, float]:
    """(lowest NLL per token the head can reach, its expected template match)."""
    if kind == "bits":
        p = 1 - NOISE / 2
        return -4 * (p * math.log(p) + (1 - p) * math.log(1 - p)), p**4
    hit, miss = 1 - NOISE + NOISE / 16, NOISE / 16
    return -(hit * math.log(hit) + 15 * miss * math.log(miss)), hit


def as_kind(values: torch.Tensor, kind: str) -> torch.Tensor:
    """Joint values (B, h, w) in [0, 16) -> that code space's layout."""
    if kind == "index":
        return values
    if kind == "groups":
        return torch.stack([values % 4, values // 4], dim=-1)  # (B, h, w, 2)
    return torch.stack([(values >> i) & 1 for i in range(4)], dim=-1)  # (B, h, w, 4)


def as_values(codes: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "index":
        return codes
    if kind == "groups":
        return codes[..., 0] + 4 * codes[..., 1]
    return sum(codes[..., i] << i for i in range(4))


def batch(templates: torch.Tensor, n: int, g: torch.Generator):
    labels = torch.randint(CLASSES, (n,), generator=g)
    values = templates[labels].clone()  # (n, h, w)
    noise = torch.rand(values.shape, generator=g) < NOISE
    values[noise] = torch.randint(16, (int(noise.sum()),), generator=g)
    return values, labels


@pytest.mark.parametrize("kind", list(SPACES))
def test_gpt_learns_class_templates_and_samples_them(kind):
    g = torch.Generator().manual_seed(0)
    templates = torch.randint(16, (CLASSES, SIDE, SIDE), generator=g)
    torch.manual_seed(0)
    model = GPT(
        SPACES[kind],
        [SIDE, SIDE],
        CLASSES,
        preset="tiny",
        dropout=0.0,
        token_dropout=0.0,
        label_dropout=0.1,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(250):
        values, labels = batch(templates, 64, g)
        loss, _ = model.loss(as_kind(values, kind), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.eval()
    values, labels = batch(templates, 512, g)
    with torch.no_grad():
        _, stats = model.loss(as_kind(values, kind), labels)
    nll = stats["nll_per_token"].item()
    floor, expected_match = best_nll(kind)
    assert nll < floor + 0.2, (nll, floor)  # uniform would be ln 16 = 2.77

    labels = torch.arange(64) % CLASSES
    codes = generate(model, labels, SamplingConfig(cfg_scale=CFG), torch.Generator().manual_seed(1))
    sampled = as_values(codes, kind)  # (64, h, w)
    match = (sampled == templates[labels]).float().mean().item()
    # Bits lose more while sampling: their own independent bit errors make prefixes unlike the
    # data (where a token is either all template or all noise). Chance level is 1/16.
    margin = 0.15 if kind == "bits" else 0.07
    assert match > expected_match - margin, (match, expected_match)
    # Every sample is closest to its own class's template.
    dist = (sampled[:, None] != templates[None]).sum(dim=(-1, -2))  # (64, C)
    assert torch.equal(dist.argmin(1), labels)
