"""Property tests for every quantizer: round trips, brute-force references, invariants."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from vistok.common.configurable import instantiate
from vistok.tokenizers.quantizers import (
    FSQ,
    LFQ,
    BernoulliQuantizer,
    DiagonalGaussian,
    Identity,
    Perturbation,
    VectorQuantizer,
)
from vistok.tokenizers.quantizers.lfq import entropy_terms

FACTORIES = {
    "vq": lambda: VectorQuantizer(dim=8, codebook_size=32),
    "vq_l2_ema_restart": lambda: VectorQuantizer(
        dim=8,
        codebook_size=32,
        l2_normalize=True,
        ema_decay=0.9,
        dead_code_threshold=0.5,
        restart_every=1,
    ),
    "lfq": lambda: LFQ(bits=6),
    "gq": lambda: LFQ(bits=8, groups=4),
    "gq_pooled": lambda: LFQ(bits=8, groups=2, pooled_marginal=True, factorize=2),
    "fsq": lambda: FSQ(levels=[8, 5, 3]),
    "bernoulli": lambda: BernoulliQuantizer(bits=6),
    "gaussian": lambda: DiagonalGaussian(channels=4),
    "identity": lambda: Identity(channels=4),
}
SHAPES = {"2d": (3, 4, 5), "1d": (3, 7)}  # (B, *spatial); channels come from the quantizer
DISCRETE = ["vq", "lfq", "gq", "fsq", "bernoulli"]


def make_input(q, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, *spatial = shape
    return torch.randn(b, q.in_channels, *spatial, generator=g)


def check_codes(q, codes, batch_and_spatial):
    cs = q.code_space
    if cs.kind == "index":
        assert codes.shape == batch_and_spatial and codes.dtype == torch.long
        assert 0 <= codes.min() and codes.max() < cs.vocab_size
    elif cs.kind == "groups":
        assert codes.shape == (*batch_and_spatial, cs.groups) and codes.dtype == torch.long
        assert 0 <= codes.min() and codes.max() < cs.vocab_size == 2 ** (cs.bits // cs.groups)
    elif cs.kind == "bits":
        assert codes.shape == (*batch_and_spatial, cs.bits) and codes.dtype == torch.long
        assert set(codes.unique().tolist()) <= {0, 1}
    else:
        b, *spatial = batch_and_spatial
        assert codes.shape == (b, cs.channels, *spatial) and codes.is_floating_point()


# ---- every quantizer, 1D and 2D -----------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_round_trip_ranges_gradients(name, shape, training):
    torch.manual_seed(0)
    q = FACTORIES[name]().train(training)
    z = make_input(q, shape).requires_grad_()
    out = q(z)
    assert out.quantized.shape == (shape[0], q.code_space.channels, *shape[1:])
    check_codes(q, out.codes, shape)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert all(torch.isfinite(v) and not v.requires_grad for v in out.stats.values())
    # EMA and restarts change the codebook after this step's assignment: compare in eval only.
    if not (training and name == "vq_l2_ema_restart"):
        torch.testing.assert_close(q.codes_to_latents(out.codes), out.quantized, rtol=0, atol=0)
    w = torch.randn_like(out.quantized)
    ((out.quantized * w).sum() + out.loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    rebuilt = instantiate(q.config)
    assert type(rebuilt) is type(q) and rebuilt.code_space == q.code_space


@pytest.mark.parametrize("name", FACTORIES)
def test_bf16_autocast(name):
    torch.manual_seed(0)
    q = FACTORIES[name]().train()
    proj = torch.nn.Conv2d(5, q.in_channels, 1)
    x = torch.randn(2, 5, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = proj(x)  # bf16, as an encoder under autocast would give
        assert z.dtype == torch.bfloat16
        out = q(z)
    assert out.quantized.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    check_codes(q, out.codes, (2, 4, 4))
    if name != "vq_l2_ema_restart":
        latents = q.codes_to_latents(out.codes).to(torch.bfloat16)
        torch.testing.assert_close(latents, out.quantized, rtol=0, atol=0)
    ((out.quantized.float() ** 2).sum() + out.loss).backward()
    assert torch.isfinite(proj.weight.grad).all() and proj.weight.grad.abs().sum() > 0


def test_straight_through_is_identity_gradient():
    for q in [VectorQuantizer(8, 32), LFQ(8, groups=2, entropy_weight=0.0)]:
        z = torch.randn(2, 8, 3, 3, requires_grad=True)
        out = q.eval()(z)
        w = torch.randn_like(out.quantized)
        (out.quantized * w).sum().backward()
        torch.testing.assert_close(z.grad, w)


# ---- LFQ / GQ entropy ---------------------------------------------------------------------------


def brute_force_entropies(x, groups, temperature, pooled):
    """Explicit enumeration: x (M, D) float64 -> (per-sample, codebook) entropies."""
    m, d_total = x.shape
    d = d_total // groups
    codebook = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=x.dtype)
    per_sample, probs = [], []
    for g in range(groups):
        xg = x[:, g * d : (g + 1) * d]
        # softmax over -||x - c||^2 / T, the distance form, independent of the code's layout
        dist = ((xg[:, None, :] - codebook[None]) ** 2).sum(-1)
        p = torch.softmax(-dist / temperature, dim=-1)  # (M, 2**d)
        per_sample.append(-(p * p.log()).sum(-1).mean())
        probs.append(p)
    h = lambda p: -(p * p.clamp_min(1e-300).log()).sum()
    if pooled:
        cb = h(torch.stack(probs).mean(dim=(0, 1)))
    else:
        cb = torch.stack([h(p.mean(0)) for p in probs]).mean()
    return torch.stack(per_sample).mean(), cb


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_gq_entropy_matches_brute_force(groups, pooled, temperature):
    torch.manual_seed(groups)
    q = LFQ(bits=6, groups=groups, temperature=temperature, pooled_marginal=pooled).train()
    z = torch.randn(2, 6, 3, 4) * 0.3
    out = q(z)
    x = z.permute(0, 2, 3, 1).reshape(-1, 6).double()
    ps, cb = brute_force_entropies(x, groups, temperature, pooled)
    torch.testing.assert_close(out.stats["per_sample_entropy"], ps.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.stats["codebook_entropy"], cb.float(), rtol=1e-4, atol=1e-5)
    expected = 0.25 * F.mse_loss(z, z.sign()) + 0.1 * (ps - cb).float()
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-5)


def test_pooled_and_per_group_marginals():
    cb = LFQ(bits=4, groups=2).codebook  # (4, 2)
    # Every token confidently picks entry 0 in group 0 and entry 3 in group 1.
    x = torch.stack([cb[0], cb[3]])[None].repeat(16, 1, 1) * 5  # (M, G, d)
    _, per_group = entropy_terms(x, cb, 0.01, pooled_marginal=False)
    _, pooled = entropy_terms(x, cb, 0.01, pooled_marginal=True)
    assert per_group < 1e-4  # each group's marginal is one entry
    torch.testing.assert_close(pooled, torch.tensor(math.log(2)))  # two entries overall
    # Where every group has the same marginal, pooling changes nothing.
    y = torch.randn(32, 1, 2).repeat(1, 2, 1)
    a = entropy_terms(y, cb, 0.5, pooled_marginal=False)
    b = entropy_terms(y, cb, 0.5, pooled_marginal=True)
    torch.testing.assert_close(a, b)


def test_gq_entropy_memory_scales_with_groups(monkeypatch):
    sizes = []
    real = torch.einsum

    def spy(eq, *ops):
        res = real(eq, *ops)
        sizes.append(res.numel())
        return res

    monkeypatch.setattr(torch, "einsum", spy)
    LFQ(bits=16, groups=4).train()(torch.randn(1, 16, 2, 2))
    assert max(sizes) == 4 * 4 * 2**4  # tokens * G * 2**(D/G), never tokens * 2**D


def test_factorized_sub_codes_round_trip():
    q = LFQ(bits=12, groups=2, factorize=3)
    assert q.sub_vocab_size == 4
    codes = torch.randint(0, 64, (2, 5, 2))
    sub = q.split_codes(codes)
    assert sub.shape == (2, 5, 2, 3) and sub.max() < 4
    assert torch.equal(q.join_codes(sub), codes)
    assert q.split_codes(torch.tensor([0b110110])).tolist() == [[0b10, 0b01, 0b11]]


# ---- Bernoulli ----------------------------------------------------------------------------------


def test_bernoulli_eval_deterministic_and_sampling_frequency():
    q = BernoulliQuantizer(bits=4, temperature=2.0).eval()
    logits = torch.tensor([-3.0, -0.5, 0.5, 3.0])[None, :, None].expand(1, 4, 20000)
    a, b = q(logits), q(logits)
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.codes[0, 0], (logits[0, :, 0] > 0).long())
    torch.manual_seed(0)
    freq = q.train()(logits).codes.float().mean(dim=(0, 1))  # (4,)
    p = torch.sigmoid(logits[0, :, 0] / 2.0)
    sigma = (p * (1 - p) / 20000).sqrt()
    assert ((freq - p).abs() < 5 * sigma).all(), (freq, p)


def test_bernoulli_temperature_anneals_and_resumes():
    q = BernoulliQuantizer(bits=2, temperature=1.0, temperature_end=0.1, anneal_steps=10).train()
    z = torch.randn(1, 2, 3)
    schedule = lambda s: 1.0 + (0.1 - 1.0) * min(s / 10, 1.0)
    for step in range(4):
        assert q(z).stats["temperature"].item() == pytest.approx(schedule(step))
    q.eval()(z)  # eval does not advance the schedule
    resumed = BernoulliQuantizer(**q.config["init_args"])
    resumed.load_state_dict(q.state_dict())
    assert resumed.temperature == pytest.approx(schedule(4))
    resumed.train()
    for _ in range(10):
        resumed(z)
    assert resumed.temperature == pytest.approx(0.1)


# ---- VQ codebook maintenance --------------------------------------------------------------------


def test_vq_ema_moves_codes_to_assigned_means():
    torch.manual_seed(0)
    q = VectorQuantizer(dim=4, codebook_size=8, ema_decay=0.0).train()
    before = q.codebook.clone()
    z = torch.randn(4, 4, 16)
    out = q(z)
    x, idx = z.permute(0, 2, 1).reshape(-1, 4), out.codes.reshape(-1)
    for k in idx.unique():
        torch.testing.assert_close(q.codebook[k], x[idx == k].mean(0), rtol=1e-3, atol=1e-4)
    # With decay, a code moves part of the way, so it gets closer to its assigned mean.
    q2 = VectorQuantizer(dim=4, codebook_size=8, ema_decay=0.5).train()
    q2.codebook.copy_(before)
    q2.ema_embed_sum.copy_(before)
    idx2 = q2(z).codes.reshape(-1)
    for k in idx2.unique():
        mean = x[idx2 == k].mean(0)
        assert (q2.codebook[k] - mean).norm() < (before[k] - mean).norm()


@pytest.mark.parametrize("ema", [None, 0.99])
def test_vq_dead_code_restart(ema):
    torch.manual_seed(0)
    q = VectorQuantizer(
        4, 16, ema_decay=ema, dead_code_threshold=0.5, restart_every=2, usage_decay=0.0
    ).train()
    with torch.no_grad():
        q.codebook[8:] += 100.0  # out of reach of the data: never used
        if ema is not None:
            q.ema_embed_sum.copy_(q.codebook)
    # Every live code gets 8 tokens per step, so only codes 8.. are dead.
    tokens = q.codebook[:8].detach().repeat(8, 1) + 0.01 * torch.randn(64, 4)
    z = tokens.t()[None]  # (1, 4, 64)
    q(z)
    assert (q.codebook[8:] > 50).all()  # not due yet at step 1
    live = q.codebook[:8].clone()
    q(z)
    for row in q.codebook[8:]:  # every dead code is now one of the encoder outputs
        assert (tokens - row).abs().sum(-1).min() < 1e-6
    if ema is None:
        assert torch.equal(q.codebook[:8], live)
    assert (q.usage_ema[8:] == 0.5).all()


def test_vq_l2_normalized_codes_are_unit_norm():
    q = VectorQuantizer(8, 32, l2_normalize=True)
    out = q(torch.randn(2, 8, 5) * 7)
    torch.testing.assert_close(out.quantized.norm(dim=1), torch.ones(2, 5))
    all_codes = q.codes_to_latents(torch.arange(32)[None])  # (1, 8, 32)
    torch.testing.assert_close(all_codes.norm(dim=1), torch.ones(1, 32))


def _restart_rank(rank, path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}/store", rank=rank, world_size=2)
    torch.manual_seed(0)  # same initial codebook on both ranks
    q = VectorQuantizer(4, 16, ema_decay=0.9, dead_code_threshold=0.5, restart_every=1).train()
    with torch.no_grad():
        q.codebook[8:] += 100.0
        q.ema_embed_sum.copy_(q.codebook)
    torch.manual_seed(1 + rank)  # different data per rank
    z = torch.randn(1, 4, 3 + rank)
    q(z)
    torch.save({"codebook": q.codebook, "z": z}, f"{path}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_vq_restart_identical_across_ranks(tmp_path):
    torch.multiprocessing.spawn(_restart_rank, args=(str(tmp_path),), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(r0["codebook"], r1["codebook"])
    tokens = torch.cat([r["z"][0].t() for r in (r0, r1)])  # both ranks' encoder outputs
    assert all((tokens - row).abs().sum(-1).min() < 1e-6 for row in r0["codebook"][8:])


# ---- perturbation -------------------------------------------------------------------------------

PERTURB = {  # explicit Perturbation(alpha=0.6, delta=4): change rate alpha * (delta - 1) / delta
    "vq": lambda: VectorQuantizer(8, 64),
    "gq": lambda: LFQ(8, groups=2),
    "fsq": lambda: FSQ([8, 5, 3]),
    "bernoulli": lambda: BernoulliQuantizer(8),
}


def changed(a, b):
    return (a != b).reshape(a.shape[0] * a.shape[1], -1).any(-1)  # per token


@pytest.mark.parametrize("name", PERTURB)
@pytest.mark.parametrize("use_latents", [True, False], ids=["latents", "no_latents"])
def test_perturbation_rate_validity_seed(name, use_latents):
    torch.manual_seed(0)
    delta = 4
    q = PERTURB[name]().eval()
    call = lambda q, c, g, z: q.perturb_with(c, Perturbation(0.6, delta, g, z))
    z = torch.randn(2, q.in_channels, 4000)
    out = q(z)
    lat = z if use_latents else None
    g = lambda s: torch.Generator().manual_seed(s)
    new = call(q, out.codes, g(1), lat)
    check_codes(q, new, (2, 4000))
    rate = changed(new, out.codes).float().mean().item()
    expected = 0.6 * (delta - 1) / delta
    assert abs(rate - expected) < 5 * math.sqrt(expected * (1 - expected) / 8000), rate
    assert torch.equal(new, call(q, out.codes, g(1), lat))
    assert not torch.equal(new, call(q, out.codes, g(2), lat))
    assert torch.equal(q.perturb(out.codes, 0.0, g(3), lat), out.codes)
    strong = q.perturb(out.codes, 1.0, g(3), lat)
    check_codes(q, strong, (2, 4000))
    assert changed(strong, out.codes).float().mean() > 0.5


def test_vq_perturbation_picks_among_nearest():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 64).eval()
    z = torch.randn(1, 8, 2000)
    out = q(z)
    new = q.perturb_with(out.codes, Perturbation(1.0, 5, torch.Generator().manual_seed(0), z))
    x = z[0].t()  # (M, D)
    dist = torch.cdist(x, q.codebook)  # (M, K)
    rank = dist.argsort(-1).argsort(-1)  # rank of every code per token, 0 = own code
    picked = rank.gather(1, new[0][:, None]).squeeze(1)
    assert picked.max() < 5
    counts = torch.bincount(picked, minlength=5).float()  # uniform over the 5 nearest
    assert ((counts - 400).abs() < 5 * math.sqrt(2000 * 0.2 * 0.8)).all(), counts


def test_bit_perturbation_flips_least_confident_only():
    torch.manual_seed(0)
    q = LFQ(8, groups=2)
    z = torch.randn(1, 8, 2000)
    out = q(z)
    new = q.perturb_with(out.codes, Perturbation(1.0, 8, torch.Generator().manual_seed(0), z))
    flipped = q.codes_to_bits(new) != q.codes_to_bits(out.codes)  # (1, M, 8)
    weakest = z.abs()[0].t().argsort(-1)[:, :3]  # (M, 3)
    allowed = torch.zeros(2000, 8, dtype=torch.bool).scatter_(1, weakest, True)
    assert not (flipped[0] & ~allowed).any()
    rate = flipped[0][allowed].float().mean()  # each weak bit flips half the time
    assert abs(rate - 0.5) < 5 * math.sqrt(0.25 / 6000), rate


def test_fsq_perturbation_moves_one_level_towards_second_nearest():
    torch.manual_seed(0)
    q = FSQ([8, 5, 3])
    z = torch.randn(1, 3, 500)
    out = q(z)
    new = q.perturb_with(out.codes, Perturbation(1.0, 4, torch.Generator().manual_seed(0), z))
    step = q.codes_to_digits(new) - q.codes_to_digits(out.codes)  # (1, M, 3)
    assert step.abs().max() == 1 and (step != 0).sum(-1).max() <= 2
    bounded = q.bound(z[0].t())
    towards = (bounded - bounded.round()).sign().long()  # (M, 3)
    moved = step[0] != 0
    assert torch.equal(step[0][moved], towards[moved])


@pytest.mark.parametrize("name", DISCRETE)
def test_perturbed_latents_keep_encoder_gradient(name):
    torch.manual_seed(0)
    q = FACTORIES[name]().eval()
    z = torch.randn(2, q.in_channels, 6, requires_grad=True)
    out = q(z)
    w = torch.randn_like(out.quantized)
    (ref,) = torch.autograd.grad((out.quantized * w).sum(), z, retain_graph=True)
    codes = q.perturb(out.codes, 1.0, torch.Generator().manual_seed(0), z.detach())
    pert = q.perturbed_latents(out, codes)
    assert torch.equal(pert, q.codes_to_latents(codes))  # value: the perturbed codes
    (grad,) = torch.autograd.grad((pert * w).sum(), z)
    torch.testing.assert_close(grad, ref)  # gradient: the unperturbed straight-through path


@pytest.mark.parametrize("name", ["gaussian", "identity"])
def test_continuous_cannot_perturb(name):
    q = FACTORIES[name]()
    with pytest.raises(NotImplementedError):
        q.perturb(torch.zeros(1, 4, 2), 0.5)


# ---- diagonal Gaussian --------------------------------------------------------------------------


def test_kl_closed_form_and_mode():
    torch.manual_seed(0)
    q = DiagonalGaussian(channels=3, kl_weight=0.5)
    z = torch.randn(2, 6, 4, 4)
    mean, logvar = z.chunk(2, dim=1)
    post = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(post, prior).sum() / 2
    out = q.train()(z)
    torch.testing.assert_close(out.stats["kl"], expected)
    torch.testing.assert_close(out.loss, 0.5 * expected)
    assert not torch.equal(out.quantized, mean)  # training samples
    q.eval()
    assert torch.equal(q(z).quantized, mean) and torch.equal(q(z).quantized, q(z).quantized)
    assert torch.equal(q.mode(z), mean)
    assert torch.equal(q.train()(z, sample=False).quantized, mean)
    a = q(z, sample=True, generator=torch.Generator().manual_seed(3)).quantized
    b = q(z, sample=True, generator=torch.Generator().manual_seed(3)).quantized
    assert torch.equal(a, b) and not torch.equal(a, mean)


# ---- FSQ ----------------------------------------------------------------------------------------


def test_fsq_index_code_bijection_and_full_usage():
    q = FSQ([8, 5, 3])
    codes = torch.arange(q.vocab_size)[None]  # (1, 120)
    latents = q.codes_to_latents(codes)  # (1, 3, 120)
    assert latents.unique(dim=2).shape[2] == 120 and latents.abs().max() <= 1
    assert torch.equal(q.digits_to_codes(q.codes_to_digits(codes)), codes)
    # Re-quantizing the grid points (pre-images through atanh) gives back the same codes.
    half = torch.tensor([4.0, 2.0, 1.0])[None, :, None]
    grid = latents * half * 0.99  # the extreme levels are open ends of the bounded range
    lv = torch.tensor([8.0, 5.0, 3.0])[None, :, None]
    half_l = (lv - 1) * (1 - q.eps) / 2
    offset = torch.where(lv % 2 == 0, 0.5, 0.0)
    pre = torch.atanh((grid + offset) / half_l) - torch.atanh(offset / half_l)
    assert torch.equal(q(pre).codes, codes)
    assert q(torch.randn(1, 3, 4000) * 3).stats["usage"] == 1.0
