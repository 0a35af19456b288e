"""1D tokenizers: code space and layout, prefix decoding, causal latents, generator pairing."""

import pytest
import torch

from vistok.generators.ar import GPT
from vistok.tokenizers.titok import (
    TOKENIZER_1D_PRESETS,
    Tokenizer1D,
    prefix_lengths,
    sample_num_tokens,
)

SMALL = dict(resolution=32, channels=32, num_res_blocks=1, patch_size=8)


def _images(n=2, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("preset", sorted(TOKENIZER_1D_PRESETS))
def test_codes_have_the_declared_layout_and_round_trip(preset):
    torch.manual_seed(0)
    tok = Tokenizer1D(preset, **SMALL).eval()
    k = TOKENIZER_1D_PRESETS[preset]["num_latents"]
    space = tok.code_space
    assert tok.token_shape == (k,)
    codes = tok.encode(_images())
    if space.kind == "index":
        assert codes.shape == (2, k) and codes.dtype == torch.long
        assert 0 <= codes.min() and codes.max() < space.vocab_size
    elif space.kind == "bits":
        assert codes.shape == (2, k, space.bits) and set(codes.unique().tolist()) <= {0, 1}
    else:
        assert space.kind == "continuous" and codes.shape == (2, space.channels, k)
    # detokenize(codes) is exactly the eval-mode reconstruction.
    with torch.no_grad():
        recon, _ = tok(_images())
    torch.testing.assert_close(tok.detokenize(codes), recon)
    assert tok.describe()["token_shape"] == [k]


@pytest.mark.parametrize("preset", ["titok_l32", "binary_b128"])
def test_ar_generator_trains_on_the_codes_with_1d_positions(preset):
    torch.manual_seed(0)
    tok = Tokenizer1D(preset, **SMALL).eval()
    codes = tok.encode(_images())
    gpt = GPT(
        code_space=tok.code_space.to_dict(),
        token_shape=list(tok.token_shape),
        num_classes=10,
        preset="B",
        depth=1,
        dim=32,
        heads=2,
    )
    loss, _ = gpt.loss(codes, torch.tensor([1, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert gpt.from_sequence(gpt.to_sequence(codes)).equal(codes)


def test_prefix_decoding_ignores_every_token_after_k():
    torch.manual_seed(0)
    tok = Tokenizer1D("flextok_b256", **SMALL, num_latents=16).eval()
    with torch.no_grad():
        latents = tok.quantize(_images()).quantized  # (B, C, K)
        other = latents.clone()
        other[:, :, 4:] = tok.quantizer.codes_to_latents(
            torch.randint(0, tok.code_space.vocab_size, (2, 12))
        )
        for k in (1, 4):
            a, b = tok.decode(latents, num_tokens=k), tok.decode(other, num_tokens=k)
            torch.testing.assert_close(a, b)
        assert not torch.allclose(tok.decode(latents), tok.decode(other))
        # Per-image prefix lengths: each image as if decoded alone with its own k.
        mixed = tok.decode(latents, num_tokens=torch.tensor([2, 16]))
        torch.testing.assert_close(mixed[:1], tok.decode(latents[:1], num_tokens=2))
        torch.testing.assert_close(mixed[1:], tok.decode(latents[1:], num_tokens=16))
    with pytest.raises(ValueError, match="num_tokens"):
        tok.decode(latents, num_tokens=17)


def test_causal_latents_do_not_depend_on_later_latent_queries():
    torch.manual_seed(0)
    causal = Tokenizer1D("flextok_b256", **SMALL, num_latents=8).eval()
    full = Tokenizer1D("titok_b64", **SMALL, num_latents=8).eval()
    x = _images()
    for tok, expect_causal in [(causal, True), (full, False)]:
        with torch.no_grad():
            before = tok.pre_quant(x)
            # Random (not constant: LayerNorm ignores a shift) change to latent queries 5..7.
            tok.encoder.latents[5:] += torch.randn(3, tok.encoder.latents.shape[1])
            after = tok.pre_quant(x)
        assert torch.allclose(before[..., :5], after[..., :5]) == expect_causal
        assert not torch.allclose(before[..., 5:], after[..., 5:])


def test_nested_dropout_samples_prefixes_in_training_only():
    torch.manual_seed(0)
    assert prefix_lengths(16) == [1, 2, 4, 8, 16] and prefix_lengths(12) == [1, 2, 4, 8, 12]
    pow2 = sample_num_tokens(4000, 12, "pow2")
    assert set(pow2.tolist()) == {1, 2, 4, 8, 12}
    uniform = sample_num_tokens(4000, 12, "uniform")
    assert set(uniform.tolist()) == set(range(1, 13))
    assert sample_num_tokens(4, 12, "none") is None
    with pytest.raises(ValueError, match="nested_dropout"):
        sample_num_tokens(4, 12, "sometimes")

    tok = Tokenizer1D("flextok_b256", **SMALL, num_latents=16)
    latents = tok.quantize(_images(8)).quantized.detach()
    tok.train()
    torch.manual_seed(1)
    a = tok.decode(latents)
    torch.manual_seed(2)
    b = tok.decode(latents)
    assert not torch.allclose(a, b)  # different prefixes were drawn
    tok.eval()
    torch.testing.assert_close(tok.decode(latents), tok.decode(latents, num_tokens=16))


@pytest.mark.parametrize("preset", sorted(TOKENIZER_1D_PRESETS))
def test_every_parameter_learns_in_training_mode(preset):
    torch.manual_seed(0)
    tok = Tokenizer1D(preset, **SMALL).train()
    x = _images(8)
    recon, q = tok(x)
    ((recon - x).abs().mean() + q.loss).backward()
    assert torch.isfinite(recon).all()
    missing = {n for n, p in tok.named_parameters() if p.grad is None or not p.grad.any()}
    # The stand-in for dropped latents only plays when nested dropout drops some.
    unused = set() if tok.nested_dropout != "none" else {"decoder.dropped_token"}
    if tok.masks_patches:  # MAETok's mask token plays when TokenizerModule draws a patch mask
        unused.add("encoder.mask_token")
    assert missing == unused
