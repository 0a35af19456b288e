"""Property tests for the CNN encoder/decoder (tiny widths, CPU)."""

import pytest
import torch

from vistok.common.configurable import instantiate
from vistok.common.nets import num_groups
from vistok.tokenizers.nets.cnn import CHANNEL_MULT, Decoder, Encoder

TINY = dict(channels=16, num_res_blocks=1, z_channels=8, num_mid_blocks=1)


@pytest.mark.parametrize("preset,factor", [("f8", 8), ("f16", 16), ("f32", 32)])
def test_shapes_per_preset(preset, factor):
    torch.manual_seed(0)
    enc = Encoder(channel_mult=CHANNEL_MULT[preset], **TINY)
    dec = Decoder(channel_mult=CHANNEL_MULT[preset], **TINY)
    x = torch.randn(2, 3, 64, 64)
    z = enc(x)
    assert enc.downsample == factor
    assert z.shape == (2, 8, 64 // factor, 64 // factor)
    assert dec(z).shape == x.shape


@pytest.mark.parametrize("upsample", ["nearest", "depth_to_space"])
def test_wetok_decoder_variants(upsample):
    torch.manual_seed(0)
    kw = dict(TINY, channel_mult=CHANNEL_MULT["f8"], mid_attention=False)
    dec = Decoder(adaptive_norm=True, upsample=upsample, **kw)
    z = torch.randn(2, 8, 5, 3)  # non-square grid
    out = dec(z)
    assert out.shape == (2, 3, 40, 24)
    assert torch.isfinite(out).all()


def test_adaptive_norm_conditions_on_latent_stats():
    torch.manual_seed(0)
    dec = Decoder(adaptive_norm=True, channel_mult=[1, 2], **TINY)
    with torch.no_grad():  # move the zero-initialised conditioning away from its neutral start
        for name, p in dec.named_parameters():
            if "to_scale" in name or "to_bias" in name:
                p.normal_(0, 0.5)
    z = torch.randn(1, 8, 4, 4)
    shifted = z + torch.randn(1, 8, 1, 1)  # changes the per-channel means only
    plain = Decoder(adaptive_norm=False, channel_mult=[1, 2], **TINY)
    assert plain.conv_in.weight.shape == dec.conv_in.weight.shape
    assert not torch.allclose(dec(z), dec(shifted), atol=1e-4)


def test_num_groups_divides_and_is_32_at_usual_widths():
    for c in [1, 3, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512]:
        g = num_groups(c)
        assert c % g == 0 and 1 <= g <= 32
    assert [num_groups(c) for c in (128, 256, 512)] == [32, 32, 32]
    assert num_groups(16) == 4


def _gd_decoder(**kw):
    return Decoder(channel_mult=[1, 2], mid_attention=True, **TINY, **kw)


def test_generative_decoding_is_seedable():
    torch.manual_seed(0)
    dec = _gd_decoder(noise_channels=8)
    z = torch.randn(2, 8, 4, 4)
    a = dec(z, generator=torch.Generator().manual_seed(1))
    b = dec(z, generator=torch.Generator().manual_seed(1))
    c = dec(z, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    noise = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(dec(z, noise=noise), a)  # the drawn noise is exactly randn(generator)


def test_noise_rejected_without_noise_channels():
    with pytest.raises(ValueError):
        _gd_decoder()(torch.randn(1, 8, 4, 4), noise=torch.randn(1, 8, 4, 4))


def test_gd_from_stage1_reproduces_stage1():
    torch.manual_seed(0)
    stage1 = _gd_decoder(adaptive_norm=True, upsample="depth_to_space")
    gd = _gd_decoder(adaptive_norm=True, upsample="depth_to_space", noise_channels=8)
    gd.load_stage1(stage1.state_dict())
    z = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        ref = stage1(z)
        for seed in (0, 1):
            out = gd(z, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert torch.count_nonzero(gd.conv_in.weight[:, 8:]) == 0
    with pytest.raises(ValueError):  # a GD state dict is not a stage-1 one
        gd.load_stage1(gd.state_dict())


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    kw = dict(channel_mult=[1, 2], **TINY)
    enc = Encoder(mid_attention=True, **kw)
    dec = Decoder(mid_attention=True, adaptive_norm=True, upsample="depth_to_space",
                  noise_channels=4, **kw)  # fmt: skip
    x = torch.randn(2, 3, 16, 16)
    out = dec(enc(x), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in [*enc.named_parameters(), *dec.named_parameters()]:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert dec.last_layer is dec.conv_out.weight


@pytest.mark.parametrize(
    "cls,kw",
    [
        (Encoder, dict(mid_attention=False, dropout=0.1)),
        (Decoder, dict(adaptive_norm=True, upsample="depth_to_space", noise_channels=8)),
    ],
)
def test_config_rebuilds_identical_module(cls, kw):
    torch.manual_seed(0)
    net = cls(channel_mult=[1, 2], **TINY, **kw).eval()
    rebuilt = instantiate(net.config).eval()
    assert type(rebuilt) is cls and rebuilt.config == net.config
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(1, 3, 16, 16) if cls is Encoder else torch.randn(1, 8, 4, 4)
    extra = {} if cls is Encoder else {"noise": torch.randn(1, 8, 4, 4)}
    assert torch.equal(net(x, **extra), rebuilt(x, **extra))
