"""Bernoulli diffusion: forward marginals, the exact reverse posterior against brute-force Bayes,
CFG, and a CPU-trained model reproducing a structured bit distribution."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vistok.generators.binary_diffusion import BinaryDiffusion, keep_coefficient, posterior_one
from vistok.generators.diffusion import DiffusionSampling

BITS = {"kind": "bits", "channels": 4, "vocab_size": 2, "groups": 1, "bits": 4}
# Two tokens of 4 bits; four joint patterns, so every bit depends on the other token's bits.
PATTERNS = torch.tensor(
    [
        [0, 0, 0, 0, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 1, 0, 1, 0],
        [0, 1, 1, 0, 0, 1, 1, 0],
    ]
)
WEIGHTS = torch.tensor([0.4, 0.3, 0.2, 0.1])


pytestmark = pytest.mark.usefixtures("one_thread")


def seeded(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_forward_process_flips_bits_at_the_rate_of_the_formula(schedule):
    model = BinaryDiffusion(BITS, [8, 8], num_classes=0, preset="tiny", schedule=schedule)
    z0 = torch.randint(2, (4000, 8, 8, 4), generator=seeded(0))  # 1M bits
    for t in (0.0, 0.1, 0.3, 0.5, 0.8, 1.0):
        zt = model.noise(z0, torch.full((len(z0),), t), seeded(1))
        expected = (1 - keep_coefficient(torch.tensor(t), schedule)) / 2
        assert abs((zt != z0).float().mean() - expected) < 2e-3, (t, schedule)
    assert keep_coefficient(torch.tensor(0.0), schedule) == 1
    assert abs(keep_coefficient(torch.tensor(1.0), schedule)) < 1e-6


def test_reverse_posterior_equals_brute_force_bayes():
    # With the true P(z0 = 1 | z_t) under a prior, the step must give the true P(z_s = 1 | z_t).
    prior = 0.3
    for schedule, (s, t) in itertools.product(["linear", "cosine"], [(0.2, 0.5), (0.6, 1.0)]):
        ks, kt = (keep_coefficient(torch.tensor(v), schedule).item() for v in (s, t))

        def q(b, a, k):
            return k * (a == b) + (1 - k) / 2

        for zt in (0, 1):
            kts = kt / ks
            joint = {
                (z0, zs): (prior if z0 else 1 - prior) * q(zs, z0, ks) * q(zt, zs, kts)
                for z0 in (0, 1)
                for zs in (0, 1)
            }
            total = sum(joint.values())
            p0_one = (joint[1, 0] + joint[1, 1]) / total
            ps_one = (joint[0, 1] + joint[1, 1]) / total
            got = posterior_one(torch.tensor([zt]), torch.tensor([p0_one]), kt, ks)
            assert abs(got.item() - ps_one) < 1e-6, (schedule, s, t, zt)


def test_cfg_scale_one_is_the_conditional_model():
    torch.manual_seed(0)
    model = BinaryDiffusion(BITS, [3, 3], num_classes=4, preset="tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # adaLN-Zero would make every logit 0
    zt, labels, t = torch.randint(2, (3, 3, 3, 4)), torch.tensor([0, 2, 3]), 0.6
    cond = model(zt, torch.full((3,), t), labels)
    uncond = model(zt, torch.full((3,), t), None)
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(model.flip_logits(zt, t, labels, 1.0), cond)
    guided = model.flip_logits(zt, t, labels, 2.5)
    torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond))
    bits = model.generate(labels, DiffusionSampling(steps=16, cfg_scale=2.0), seeded())
    assert bits.shape == (3, 3, 3, 4) and set(bits.unique().tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="posterior"):
        model.generate(labels, DiffusionSampling(steps=4, sampler="heun"))


def test_refuses_non_binary_codes():
    with pytest.raises(ValueError, match="models bits"):
        BinaryDiffusion({**BITS, "kind": "continuous"}, [4, 4], preset="tiny")
    with pytest.raises(ValueError, match="schedule"):
        BinaryDiffusion(BITS, [4, 4], preset="tiny", schedule="sqrt")


@pytest.fixture(scope="module")
def toy() -> BinaryDiffusion:
    """A tiny model trained on CPU (~20 s) on the four patterns."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BinaryDiffusion(BITS, [2], num_classes=0, preset="tiny")
    g, steps = seeded(0), 500
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    for _ in range(steps):
        k = torch.multinomial(WEIGHTS, 256, replacement=True, generator=g)
        loss, _ = model.loss(PATTERNS[k].reshape(256, 2, 4), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@pytest.mark.parametrize("steps", [16, 64])
def test_samples_reproduce_the_pattern_distribution(toy, steps):
    n = 2000
    bits = toy.generate(torch.full((n,), -1), DiffusionSampling(steps=steps), seeded())
    match = (bits.reshape(n, 1, 8) == PATTERNS[None]).all(-1)  # (n, 4)
    assert match.any(1).float().mean() > 0.97  # almost every sample is one of the patterns
    torch.testing.assert_close(match.float().mean(0), WEIGHTS, atol=0.04, rtol=0)
