"""Teacher-forced regeneration (RobusTok post-training pairs) on tiny GPTs of every head type."""

from __future__ import annotations

import pytest
import torch

from vistok.generators.ar import GPT
from vistok.generators.sampling import SamplingConfig, generate
from vistok.generators.teacher_forcing import (
    partially_denoised,
    sample_from_uniforms,
    teacher_forced,
)

SPACES = {
    "index": {"kind": "index", "channels": 8, "vocab_size": 32, "groups": 1, "bits": 0},
    "groups": {"kind": "groups", "channels": 6, "vocab_size": 8, "groups": 2, "bits": 6},
    "bits": {"kind": "bits", "channels": 5, "vocab_size": 2, "groups": 1, "bits": 5},
}
PAPER = SamplingConfig(cfg_scale=6.0, temperature=1.02)  # RobusTok's sampling protocol


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt(kind: str, side: int = 4) -> GPT:
    torch.manual_seed(0)
    gpt = GPT(
        SPACES[kind], [side, side], num_classes=3, preset="tiny", dropout=0.0, token_dropout=0.0
    )
    with torch.no_grad():  # output heads start at zero (uniform logits): give them a shape
        for p in gpt.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return gpt.eval()


def random_codes(gpt: GPT, batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(gpt.head.vocab, (batch, gpt.num_tokens, gpt.factors), generator=g)
    return gpt.from_sequence(seq)


def labels_for(batch: int) -> torch.Tensor:
    return torch.arange(batch) % 3


@pytest.mark.parametrize("kind", sorted(SPACES))
def test_preservation_one_returns_the_ground_truth_exactly(kind):
    gpt = tiny_gpt(kind)
    codes = random_codes(gpt, 4)
    out = teacher_forced(gpt, codes, labels_for(4), 1.0, [0, 1, 2, 3], PAPER)
    assert torch.equal(out.codes, codes) and bool(out.kept.all())
    assert out.kept.shape == (4, 4, 4)


@pytest.mark.parametrize("kind", sorted(SPACES))
def test_preservation_zero_is_pure_generation(kind):
    gpt = tiny_gpt(kind)
    labels, seeds = labels_for(4), [5, 6, 7, 8]
    a = teacher_forced(gpt, random_codes(gpt, 4, 1), labels, 0.0, seeds, PAPER)
    b = teacher_forced(gpt, random_codes(gpt, 4, 2), labels, 0.0, seeds, PAPER)
    assert not a.kept.any()
    assert torch.equal(a.codes, b.codes)  # the ground truth plays no part
    # Greedy decoding draws nothing: exactly what the sampler generates from scratch.
    greedy = SamplingConfig(cfg_scale=3.0, temperature=0.0)
    tf = teacher_forced(gpt, random_codes(gpt, 4), labels, 0.0, seeds, greedy)
    assert torch.equal(tf.codes, generate(gpt, labels, greedy))


@pytest.mark.parametrize("kind", sorted(SPACES))
def test_regenerated_positions_follow_the_mixed_prefix(kind):
    """Greedy with guidance: every regenerated code is the argmax of the guided logits of one
    full (uncached) forward pass over the result, every kept code is the ground truth."""
    gpt = tiny_gpt(kind)
    codes, labels = random_codes(gpt, 6), labels_for(6)
    cfg = SamplingConfig(cfg_scale=4.0, temperature=0.0)
    out = teacher_forced(gpt, codes, labels, 0.5, list(range(6)), cfg)
    seq, gt = gpt.to_sequence(out.codes), gpt.to_sequence(codes)  # (B, N, F)
    kept = out.kept.reshape(6, -1)  # (B, N)
    assert 0 < kept.float().mean() < 1
    assert torch.equal(seq[kept], gt[kept])
    with torch.no_grad():
        cond = gpt(out.codes, labels).double()
        uncond = gpt(out.codes, torch.full_like(labels, -1)).double()
    expected = (uncond + 4.0 * (cond - uncond)).argmax(-1)  # (B, N, F)
    assert torch.equal(seq[~kept], expected[~kept])
    assert (seq[~kept] != gt[~kept]).any()  # the generator did change something


@pytest.mark.parametrize("kind", sorted(SPACES))
def test_kv_cache_equals_recomputation_and_samples_are_independent_of_the_batch(kind):
    gpt = tiny_gpt(kind)
    codes, labels, seeds = random_codes(gpt, 4), labels_for(4), [11, 12, 13, 14]
    cfg = SamplingConfig(cfg_scale=6.0, temperature=1.02, top_k=6, top_p=0.9)
    cached = teacher_forced(gpt, codes, labels, 0.7, seeds, cfg)
    recomputed = teacher_forced(gpt, codes, labels, 0.7, seeds, cfg, use_cache=False)
    assert torch.equal(cached.codes, recomputed.codes)
    assert torch.equal(cached.kept, recomputed.kept)
    alone = teacher_forced(gpt, codes[2:3], labels[2:3], 0.7, seeds[2:3], cfg)
    assert torch.equal(alone.codes[0], cached.codes[2])
    other_seed = teacher_forced(gpt, codes, labels, 0.7, [21, 22, 23, 24], cfg)
    assert not torch.equal(other_seed.codes, cached.codes)


def test_measured_kept_fraction_matches_the_preservation_ratio():
    gpt = tiny_gpt("index", side=8)
    batch = 32
    codes = random_codes(gpt, batch)
    for sigma in (0.3, 0.7):
        out = teacher_forced(gpt, codes, labels_for(batch), sigma, list(range(batch)), PAPER)
        kept = out.kept.float().mean().item()
        # 2048 Bernoulli(sigma) draws: standard deviation about 0.01.
        assert abs(kept - sigma) < 0.04, (sigma, kept)
        changed = (out.codes != codes).float().mean().item()
        assert 0 < changed <= 1 - kept  # a regenerated position may draw its own code again


def test_inverse_cdf_draws_the_filtered_distribution():
    torch.manual_seed(0)
    logits = torch.randn(3, 10)
    k = 20000
    u = (torch.arange(k) + 0.5) / k  # an even grid over [0, 1): counts = k * probs, up to 1
    for top_k, top_p in ((0, 1.0), (4, 1.0), (0, 0.7)):
        idx = sample_from_uniforms(
            logits[:, None].expand(3, k, 10), u.expand(3, k), 1.3, top_k, top_p
        )
        from vistok.generators.sampling import filter_logits

        probs = filter_logits(logits.double() / 1.3, top_k, top_p).softmax(-1)  # (3, 10)
        counts = torch.stack([torch.bincount(r, minlength=10) for r in idx]).double()
        assert (counts - k * probs).abs().max() <= 1.0
        assert counts[probs == 0].sum() == 0  # filtered tokens are never drawn
    assert torch.equal(sample_from_uniforms(logits, torch.rand(3), 0.0), logits.argmax(-1))


def test_bad_inputs_are_refused_with_the_problem_named():
    gpt = tiny_gpt("index")
    codes = random_codes(gpt, 2)
    with pytest.raises(ValueError, match="preservation ratio"):
        teacher_forced(gpt, codes, labels_for(2), 1.5, [0, 1])
    with pytest.raises(ValueError, match="do not fit"):
        teacher_forced(gpt, codes[:, :2], labels_for(2), 0.5, [0, 1])
    with pytest.raises(ValueError, match="one seed"):
        teacher_forced(gpt, codes, labels_for(2), 0.5, [0])
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 32\)"):
        teacher_forced(gpt, codes + 40, labels_for(2), 0.5, [0, 1])


# --- the continuous analogue: partial noising and flow-matching denoising -------------------------


def tiny_flow():
    from vistok.generators.diffusion import FlowMatching

    torch.manual_seed(0)
    space = {"kind": "continuous", "channels": 4, "vocab_size": 0, "groups": 1, "bits": 0}
    model = FlowMatching(space, [4, 4], num_classes=3, preset="tiny")
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: give it a shape
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.set_latent_stats(torch.full((4,), 0.5), torch.full((4,), 2.0))
    return model.eval()


def test_partial_denoising_is_denoise_from_with_per_sample_noise():
    model = tiny_flow()
    latents, labels, seeds = torch.randn(3, 4, 4, 4) * 2, torch.tensor([0, 1, 2]), [4, 5, 6]
    out = partially_denoised(model, latents, labels, 0.4, seeds, steps=5, cfg_scale=3.0)
    for i in range(3):
        g = torch.Generator().manual_seed(seeds[i])
        ref = model.denoise_from(latents[i : i + 1], 0.4, labels[i : i + 1], 5, 3.0, g)
        torch.testing.assert_close(out[i : i + 1], ref, rtol=1e-5, atol=1e-5)
    alone = partially_denoised(model, latents[1:2], labels[1:2], 0.4, seeds[1:2], 5, 3.0)
    torch.testing.assert_close(alone[0], out[1], rtol=1e-5, atol=1e-5)
    # Less noise, closer to the real latent.
    dist = [
        (partially_denoised(model, latents, labels, t, seeds, 5) - latents).square().mean()
        for t in (0.05, 0.5, 1.0)
    ]
    assert dist[0] < dist[1] < dist[2]
    with pytest.raises(ValueError, match="t must be in"):
        partially_denoised(model, latents, labels, 0.0, seeds)
