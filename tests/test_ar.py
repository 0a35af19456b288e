"""AR generator properties: KV cache == recomputation, greedy == argmax of full logits, CFG,
filters that never emit filtered tokens, presets, for every head (index, groups, bits)."""

from __future__ import annotations

import math

import pytest
import torch

from vistok.generators.ar import GPT, GPT_PRESETS
from vistok.generators.sampling import (
    Picker,
    SamplingConfig,
    filter_logits,
    generate,
    sample_logits,
)

SPACES = {
    "index": {"kind": "index", "vocab_size": 32, "channels": 8},
    "groups": {"kind": "groups", "vocab_size": 8, "groups": 3, "bits": 9, "channels": 9},
    "bits": {"kind": "bits", "vocab_size": 2, "bits": 5, "channels": 5},
}
KINDS = list(SPACES)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(kind: str, token_shape=(3, 4), num_classes: int = 5, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(
        SPACES[kind], list(token_shape), num_classes, preset="tiny", dropout=0.0, token_dropout=0.0
    )
    # The output layers start at zero (uniform logits); randomise them so argmaxes mean something.
    for p in model.head.parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.15)
    torch.nn.init.normal_(model.class_embed.weight)  # classes that differ: guidance matters
    return model.double().eval()


def random_codes(model: GPT, batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    high = model.head.vocab
    shape = (batch, *model.token_shape) + (() if model.kind == "index" else (model.factors,))
    return torch.randint(high, shape, generator=g)


def guided_full_logits(model: GPT, codes, labels, scale: float) -> torch.Tensor:
    """Teacher-forced guided logits (B, N, F, V) by brute force: two full passes."""
    cond = model(codes, labels)
    if scale == 1.0:
        return cond
    uncond = model(codes, torch.full_like(labels, model.null_class))
    return uncond + scale * (cond - uncond)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("token_shape", [(3, 4), (7,)])
def test_kv_cache_logits_equal_full_recomputation(kind, token_shape):
    model = tiny(kind, token_shape)
    codes, labels = random_codes(model, 3), torch.tensor([0, 4, -1])
    full = model(codes, labels)  # (B, N, F, V)
    seq = model.to_sequence(codes)
    n = model.num_tokens
    model.setup_cache(3, torch.float64)
    # A prefill of several tokens at once (masked path), then one token per step.
    k = 3
    h = model.hidden(model.input_sequence(seq[:, :k], labels), start=0)  # (B, k + 1, D)
    steps = [model.head.logits(h[:, i : i + 1], seq[:, i : i + 1]) for i in range(k + 1)]
    for i in range(k + 1, n):
        x = model.head.embed(seq[:, i - 1 : i])
        h = model.hidden(x, start=i)
        steps.append(model.head.logits(h, seq[:, i : i + 1]))
    cached = torch.cat(steps, dim=1)
    assert cached.shape == full.shape
    torch.testing.assert_close(cached, full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_and_recomputed_sampling_draw_the_same_codes(kind):
    model = tiny(kind)
    labels = torch.tensor([1, 2, 3])
    config = SamplingConfig(cfg_scale=2.5, cfg_schedule="linear", temperature=1.3, top_p=0.9)
    a = generate(model, labels, config, torch.Generator().manual_seed(7), use_cache=True)
    b = generate(model, labels, config, torch.Generator().manual_seed(7), use_cache=False)
    c = generate(model, labels, config, torch.Generator().manual_seed(8), use_cache=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the seed matters, so the equality above is not vacuous


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_greedy_decoding_is_the_argmax_of_full_logits(kind, scale):
    model = tiny(kind)
    labels = torch.tensor([0, 3, -1, 2])
    greedy = SamplingConfig(cfg_scale=scale, temperature=0.0)
    codes = generate(model, labels, greedy, torch.Generator().manual_seed(0))
    again = generate(model, labels, greedy, torch.Generator().manual_seed(123))
    top1 = generate(
        model, labels, SamplingConfig(cfg_scale=scale, top_k=1), torch.Generator().manual_seed(5)
    )
    assert torch.equal(codes, again) and torch.equal(codes, top1)
    logits = guided_full_logits(model, codes, labels, scale)
    assert torch.equal(logits.argmax(-1), model.to_sequence(codes))


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_codes_stay_inside_the_top_k_and_top_p_sets(kind):
    model = tiny(kind)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    for config in (
        SamplingConfig(cfg_scale=2.0, top_k=2, temperature=2.0),
        SamplingConfig(cfg_scale=2.0, top_p=0.6, temperature=2.0),
    ):
        for seed in range(3):
            codes = generate(model, labels, config, torch.Generator().manual_seed(seed))
            logits = guided_full_logits(model, codes, labels, 2.0) / config.temperature
            allowed = reference_allowed(logits, config.top_k, config.top_p)  # (B, N, F, V)
            seq = model.to_sequence(codes)
            assert allowed.gather(-1, seq[..., None]).all()
            if config.top_k < model.head.vocab:  # the filter had something to remove
                assert not allowed.all()


def reference_allowed(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Brute force, one row at a time: which tokens top-k then top-p keep."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.zeros_like(flat, dtype=torch.bool)
    for r, row in enumerate(flat.tolist()):
        order = sorted(range(len(row)), key=lambda i: -row[i])
        keep = order[:top_k] if top_k else order
        m = max(row[i] for i in keep)
        probs = {i: math.exp(row[i] - m) for i in keep}
        total = sum(probs.values())
        mass, chosen = 0.0, []
        for i in keep:
            if mass >= top_p:
                break
            chosen.append(i)
            mass += probs[i] / total
        out[r, chosen] = True
    return out.reshape(logits.shape)


def test_filter_keeps_exactly_the_reference_sets():
    logits = torch.randn(200, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for k, p in [(3, 1.0), (0, 0.5), (5, 0.8), (0, 0.999), (1, 0.3)]:
        kept = torch.isfinite(filter_logits(logits, k, p))
        assert torch.equal(kept, reference_allowed(logits, k, p)), (k, p)


def test_sampling_follows_the_softmax_and_never_draws_filtered_tokens():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).expand(40000, 5)
    g = torch.Generator().manual_seed(0)
    draws = sample_logits(logits, temperature=1.0, generator=g)
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    torch.testing.assert_close(freq, logits[0].double().softmax(-1), atol=0.01, rtol=0)
    filtered = sample_logits(logits, temperature=5.0, top_k=2, generator=g)
    assert set(filtered.unique().tolist()) == {0, 1}


def test_bits_are_bernoulli_with_guided_logits():
    # Two-way logits [0, l]: the sampler must draw 1 with probability sigmoid(u + s (c - u)).
    cond, uncond, scale = 0.8, -0.4, 1.5
    m = 20000
    logits = torch.zeros(2 * m, 1, 2)
    logits[:m, 0, 1], logits[m:, 0, 1] = cond, uncond
    picker = Picker(SamplingConfig(cfg_scale=scale), True, torch.Generator().manual_seed(0))
    picker.scale = scale
    bits = picker(logits)  # (2M, 1), both halves identical
    assert torch.equal(bits[:m], bits[m:])
    expected = torch.sigmoid(torch.tensor(uncond + scale * (cond - uncond))).item()
    assert abs(bits[:m].double().mean().item() - expected) < 0.015


@pytest.mark.parametrize("kind", KINDS)
def test_guidance_of_scale_one_is_the_conditional_model(kind):
    """Guidance only on the second half of the tokens: the first half goes through the doubled
    (conditional + null) batch with scale 1 and must equal plain conditional sampling."""
    model = tiny(kind, (4, 4))
    labels = torch.tensor([0, 1, 2])
    plain = generate(
        model, labels, SamplingConfig(temperature=1.0), torch.Generator().manual_seed(3)
    )
    half = SamplingConfig(cfg_scale=30.0, cfg_interval=(0.5, 1.0), temperature=1.0)
    guided = generate(model, labels, half, torch.Generator().manual_seed(3))
    a, b = model.to_sequence(plain), model.to_sequence(guided)
    assert torch.equal(a[:, :8], b[:, :8])
    assert not torch.equal(a[:, 8:], b[:, 8:])  # guidance does act on the second half
    # And the combination itself: scale 1 returns the conditional logits exactly.
    logits = torch.randn(6, 2, 7, dtype=torch.float64)
    picker = Picker(SamplingConfig(), True, None)
    torch.testing.assert_close(picker.guide(logits), logits[:3])


def test_label_dropout_uses_the_null_class_and_unlabelled_means_null():
    model = GPT(SPACES["index"], [2, 2], num_classes=5, preset="tiny", label_dropout=1.0)
    null = model.class_embed.weight[model.null_class]
    model.train()
    assert torch.equal(model.class_tokens(torch.tensor([0, 3]), 2)[:, 0], null.expand(2, -1))
    model.eval()
    out = model.class_tokens(torch.tensor([-1, 3]), 2)[:, 0]
    assert torch.equal(out[0], null) and torch.equal(out[1], model.class_embed.weight[3])


def test_the_cache_is_allocated_once_and_reused():
    model = tiny("index")
    model.setup_cache(8, torch.float64)
    first = model.blocks[0].attn.cache
    generate(model, torch.tensor([0, 1]), SamplingConfig(cfg_scale=2.0))  # needs 4 <= 8 rows
    assert model.blocks[0].attn.cache is first
    model.setup_cache(16, torch.float64)
    assert model.blocks[0].attn.cache is not first


@pytest.mark.parametrize("preset, millions", [("B", 111), ("L", 343), ("XL", 775)])
def test_presets_match_llamagen_sizes(preset, millions):
    with torch.device("meta"):
        model = GPT({"kind": "index", "vocab_size": 16384, "channels": 8}, [16, 16], 1000, preset)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.01, count
    assert set(GPT_PRESETS) >= {"B", "L", "XL"}


def test_continuous_codes_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="continuous"):
        GPT({"kind": "continuous", "channels": 4}, [2, 2], preset="tiny")


def test_training_step_reaches_every_parameter():
    for kind in KINDS:
        model = tiny(kind).float().train()
        loss, stats = model.loss(random_codes(model, 4).long(), torch.tensor([0, 1, -1, 4]))
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, (kind, missing)
        assert torch.isfinite(loss) and stats["nll_per_token"] > 0


def test_pow_cosine_guidance_is_rars_ramp():
    """RAR's power-cosine schedule (RobusTok's pairs): (s-1)(1-cos(pi (i/N)^p))/2 + 1."""
    config = SamplingConfig(cfg_scale=6.0, cfg_schedule="pow-cosine", cfg_power=1.15)
    n = 256
    scales = [config.scale_at(i, n) for i in range(n)]
    for i in (0, 1, 64, 128, 200, 255):
        expected = 5.0 * (1 - math.cos(math.pi * (i / n) ** 1.15)) / 2 + 1
        assert scales[i] == pytest.approx(expected, abs=1e-12)
    assert scales[0] == 1.0 and all(a < b for a, b in zip(scales, scales[1:]))
    assert 5.99 < scales[-1] < 6.0
    assert sum(scales) / n == pytest.approx(3.29, abs=0.01)  # about half the constant's guidance
    # p = 1 is the plain cosine ramp, symmetric around the middle.
    cosine = SamplingConfig(cfg_scale=3.0, cfg_schedule="pow-cosine", cfg_power=1.0)
    assert cosine.scale_at(128, 256) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="cfg_power"):
        SamplingConfig(cfg_schedule="pow-cosine", cfg_power=0.0)
