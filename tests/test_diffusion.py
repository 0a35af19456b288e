"""Flow matching: the DiT on 2D grids and 1D token sets, the samplers against diffusers and each
other, CFG, latent normalisation, and a CPU-trained model reproducing a Gaussian mixture."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from vistok.generators.diffusion import DIT_PRESETS, DiffusionSampling, DiT, FlowMatching

LATENT = {"kind": "continuous", "channels": 2, "vocab_size": 0, "groups": 1, "bits": 0}
MEANS = torch.tensor([[-2.0, -2.0], [2.0, -1.0], [0.0, 2.5]])
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
STD = 0.3


pytestmark = pytest.mark.usefixtures("one_thread")


def space(channels: int) -> dict:
    return {**LATENT, "channels": channels}


def randomised(model: FlowMatching, seed: int = 0) -> FlowMatching:
    """adaLN-Zero starts as the zero map; random weights make equalities meaningful."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def mixture(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (n, 2 channels, 1 token) of the 3-component mixture, and their components."""
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
    return (MEANS[k] + STD * torch.randn(n, 2, generator=g))[:, :, None], k


@pytest.fixture(scope="module")
def toy() -> FlowMatching:
    """A tiny DiT trained on CPU (~20 s) on the mixture, class = component, 30% label dropout."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = FlowMatching(LATENT, [1], num_classes=3, preset="tiny", label_dropout=0.3)
    g = torch.Generator().manual_seed(0)
    x, _ = mixture(10000, g)
    model.set_latent_stats(x.mean((0, 2)), x.std((0, 2)))
    steps = 700
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    for _ in range(steps):
        x, k = mixture(256, g)
        loss, _ = model.loss(x, k, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def seeded(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the net -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,patch,tokens", [([8, 8], 2, 16), ([8, 8], 1, 64), ([12], 1, 12), ([12], 3, 4)]
)
def test_dit_takes_2d_grids_and_1d_token_sets(shape, patch, tokens):
    net = DiT(4, 6, tuple(shape), patch, 3, dim=32, depth=1, heads=2)
    x = torch.randn(2, 4, *shape)
    assert net.patchify(x).shape == (2, tokens, 4 * patch ** len(shape))
    out = torch.randn(2, 6, *shape)
    torch.testing.assert_close(net.unpatchify(net.patchify(out)), out)  # exact inverse
    assert net(x, torch.rand(2), torch.tensor([0, -1])).shape == (2, 6, *shape)


def test_flow_matching_defaults_and_refusals():
    assert FlowMatching(space(4), [8, 8], preset="tiny").net.patch == 2  # DiT-x/2 on grids
    assert FlowMatching(space(21), [16], preset="tiny").net.patch == 1  # token sets
    with pytest.raises(ValueError, match="continuous latents"):
        FlowMatching({**LATENT, "kind": "bits", "bits": 8}, [4, 4], preset="tiny")
    with pytest.raises(ValueError, match="does not divide"):
        FlowMatching(space(4), [5, 5], preset="tiny")
    with pytest.raises(ValueError, match="unknown DiT preset"):
        FlowMatching(space(4), [8, 8], preset="XXL")


def test_dit_s_has_the_papers_parameter_count():
    # DiT-S/2 over 4-channel 32x32 latents: 33M parameters (Peebles & Xie 2023, Table 1).
    assert set(DIT_PRESETS) >= {"S", "B", "L", "XL"}
    model = FlowMatching(space(4), [32, 32], num_classes=1000, preset="S")
    assert 32.5e6 < sum(p.numel() for p in model.parameters()) < 33.5e6


def test_adaln_zero_starts_every_block_as_the_identity():
    model = FlowMatching(space(4), [4, 4], num_classes=2, preset="tiny")
    x = torch.randn(3, 4, 4, 4)
    assert torch.count_nonzero(model(x, torch.rand(3), torch.tensor([0, 1, -1]))) == 0
    loss, _ = model.loss(x)
    loss.backward()  # the zero-initialised output and gates are what learn first
    assert model.net.final.linear.weight.grad.abs().sum() > 0


# --- normalisation, samplers, CFG --------------------------------------------------------------


def test_latent_normalisation_round_trips_and_is_saved():
    model = FlowMatching(space(3), [2, 2], preset="tiny")
    mean, std = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 0.5, 3.0])
    model.set_latent_stats(mean, std)
    x = mean[None, :, None, None] + std[None, :, None, None] * torch.randn(4000, 3, 2, 2)
    z = model.normalize(x)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(3), atol=0.05, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3)), torch.ones(3), atol=0.05, rtol=0)
    torch.testing.assert_close(model.denormalize(z), x)
    state = model.state_dict()
    assert bool(state["has_stats"]) and torch.equal(state["latent_std"], std)
    with pytest.raises(ValueError, match="> 0"):
        model.set_latent_stats(mean, torch.tensor([1.0, 0.0, 1.0]))


def test_euler_equals_diffusers_flow_match_euler_scheduler():
    model = randomised(FlowMatching(space(2), [4], num_classes=2, preset="tiny"))
    labels, steps = torch.tensor([0, 1, -1]), 6
    x = torch.randn(3, 2, 4)
    ours = model.integrate(x, labels, DiffusionSampling(steps=steps))
    scheduler = FlowMatchEulerDiscreteScheduler()  # sigma = t, 1 = noise: our convention
    scheduler.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1)[:-1].tolist())
    ref = x.clone()
    for sigma, timestep in zip(scheduler.sigmas[:-1], scheduler.timesteps):
        v = model(ref, sigma.expand(3), labels)
        ref = scheduler.step(v, timestep, ref, return_dict=False)[0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_cfg_scale_one_is_the_conditional_model_and_guidance_is_u_plus_s_c_minus_u():
    model = randomised(FlowMatching(space(2), [3], num_classes=4, preset="tiny"))
    labels = torch.tensor([0, 3, 1])
    # Reference: a plain Euler loop over the conditional model alone.
    x = torch.randn(3, 2, 3, generator=seeded(7))
    ts = torch.linspace(1, 0, 9)
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * model(x, t.expand(3), labels)
    sample = model.generate(labels, DiffusionSampling(steps=8, cfg_scale=1.0), seeded(7))
    torch.testing.assert_close(sample, x)  # stats are identity: raw == normalised here

    z, t = torch.randn(3, 2, 3), 0.4
    cond = model(z, torch.full((3,), t), labels)
    uncond = model(z, torch.full((3,), t), torch.full((3,), -1))
    torch.testing.assert_close(model.velocity(z, t, labels, 3.0), uncond + 3.0 * (cond - uncond))


def test_cfg_interval_switches_guidance_by_progress_from_noise():
    config = DiffusionSampling(cfg_scale=4.0, cfg_interval=(0.25, 0.75))
    assert [config.scale_at(t) for t in (1.0, 0.8, 0.5, 0.3, 0.1)] == [1, 1, 4, 4, 1]
    with pytest.raises(ValueError, match="cfg_interval"):
        DiffusionSampling(cfg_interval=(0.5, 0.2))


# --- trained on a toy ----------------------------------------------------------------------------


def components(samples: torch.Tensor) -> torch.Tensor:
    return torch.cdist(samples[:, :, 0], MEANS).argmin(1)


def test_unconditional_samples_reproduce_the_mixture(toy):
    n = 2000
    x = toy.generate(torch.full((n,), -1), DiffusionSampling(steps=10, sampler="heun"), seeded())
    k = components(x)
    torch.testing.assert_close(torch.bincount(k, minlength=3) / n, WEIGHTS, atol=0.05, rtol=0)
    for c in range(3):
        mine = x[k == c, :, 0]
        torch.testing.assert_close(mine.mean(0), MEANS[c], atol=0.15, rtol=0)
        torch.testing.assert_close(mine.std(0), torch.full((2,), STD), atol=0.1, rtol=0)


def test_label_dropout_model_samples_each_class_conditionally(toy):
    for c in range(3):
        x = toy.generate(torch.full((300,), c), DiffusionSampling(steps=10, sampler="heun"))
        assert (components(x) == c).float().mean() > 0.95
        torch.testing.assert_close(x[:, :, 0].mean(0), MEANS[c], atol=0.2, rtol=0)


def test_heun_with_few_steps_agrees_with_euler_with_many(toy):
    labels = torch.full((500,), -1)
    euler_200 = toy.generate(labels, DiffusionSampling(steps=200), seeded(5))
    euler_10 = toy.generate(labels, DiffusionSampling(steps=10), seeded(5))
    heun_10 = toy.generate(labels, DiffusionSampling(steps=10, sampler="heun"), seeded(5))
    heun_err = (heun_10 - euler_200).abs().mean()
    assert heun_err < 0.08 and heun_err < 0.6 * (euler_10 - euler_200).abs().mean()


def test_denoise_from_keeps_what_little_noise_leaves_and_resamples_at_t_one(toy):
    x, k = mixture(500, seeded(9))
    near = toy.denoise_from(x, 0.1, steps=5, generator=seeded(2))
    assert (near - x).abs().mean() < 0.15 and (components(near) == k).float().mean() > 0.97
    fresh = toy.denoise_from(x, 1.0, steps=10, generator=seeded(2), sampler="heun")
    assert (components(fresh) == k).float().mean() < 0.7  # t = 1 forgets the input
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        toy.denoise_from(x, 0.0)
