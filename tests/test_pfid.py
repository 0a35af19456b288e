"""pFID as defined in ``evaluation/pfid.py``.

Without Inception: per-image draws that ignore batching and order (what makes 2 processes equal
1; the 2-process run itself is in ``test_eval_callbacks.py``), strength 0 decoding exactly the
reconstruction, seeded decoder noise. With Inception, through Lightning: on a tokenizer whose
reconstructions are real (VQ over a fitted colour palette, so no training run is needed),
pFID@0 = rFID and pFID grows with the strength.
"""

from __future__ import annotations

import io

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vistok.data.datamodule import ImageDataModule
from vistok.data.make_shards import shard_pattern, write_shards
from vistok.evaluation.callbacks import ReconstructionEval
from vistok.evaluation.pfid import (
    decoder_noise,
    image_seed,
    perturb_codes,
    reconstruct_with_perturbations,
)
from vistok.tokenizers.binary import BinaryTokenizer
from vistok.tokenizers.quantizers.vq import VectorQuantizer
from vistok.tokenizers.tokenizer import Tokenizer
from vistok.tokenizers.vq import VQTokenizer
from vistok.tokenizers.wetok import WeTok

NETS = dict(resolution=32, channels=16, num_res_blocks=1, num_mid_blocks=1)
FACTORIES = {
    "vq": lambda: VQTokenizer(codebook_size=256, **NETS),
    "wetok": lambda: WeTok(**NETS),
    "wetok_gd": lambda: WeTok(generative=True, **NETS),
    "binary": lambda: BinaryTokenizer(**NETS),
}


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) crops of a real photo, in [-1, 1]."""
    import skimage.data

    photo = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float() / 127.5 - 1
    g = torch.Generator().manual_seed(seed)
    ys = torch.randint(0, photo.shape[1] - size, (n,), generator=g)
    xs = torch.randint(0, photo.shape[2] - size, (n,), generator=g)
    return torch.stack([photo[:, y : y + size, x : x + size] for y, x in zip(ys, xs)])


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Inception on a shared 2-core machine: 1 thread is faster
    yield
    torch.set_num_threads(threads)


def _tokenizer(name: str):
    torch.manual_seed(0)
    return FACTORIES[name]().eval()


def test_image_seed_is_pinned_and_separates_its_inputs():
    # Pinned: a change here silently changes every pFID number recorded so far.
    assert image_seed(0, "0.5", "astronaut_00001") == image_seed(0, "0.5", "astronaut_00001")
    assert image_seed(0, "0.5", "astronaut_00001") == 0x461C218F4A52EF6B
    seeds = {image_seed(s, t, k) for s in (0, 1) for t in ("0.5", "1") for k in ("a", "b")}
    assert len(seeds) == 8
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("name", ["vq", "wetok", "binary"])
def test_perturbation_draws_ignore_batching_and_order(name):
    tok = _tokenizer(name)
    x = _images(6)
    keys = [f"img{i}" for i in range(6)]
    with torch.no_grad():
        latents = tok.pre_quant(x)  # (6, C_q, 2, 2)
        codes = tok.quantizer(latents).codes
    whole = perturb_codes(tok, codes, latents, 1.0, keys, seed=3)
    split = torch.cat(
        [
            perturb_codes(tok, codes[:2], latents[:2], 1.0, keys[:2], seed=3),
            perturb_codes(tok, codes[2:], latents[2:], 1.0, keys[2:], seed=3),
        ]
    )
    order = torch.tensor([5, 3, 0, 1, 4, 2])
    shuffled = perturb_codes(tok, codes[order], latents[order], 1.0, [keys[i] for i in order], 3)
    assert torch.equal(whole, split)
    assert torch.equal(whole[order], shuffled)
    assert not torch.equal(whole, codes)  # strength 1 moves codes
    other_seed = perturb_codes(tok, codes, latents, 1.0, keys, seed=4)
    assert not torch.equal(whole, other_seed)
    assert torch.equal(perturb_codes(tok, codes, latents, 0.0, keys, seed=3), codes)


@pytest.mark.parametrize("name", ["vq", "wetok_gd", "binary"])
def test_strength_zero_decodes_exactly_the_reconstruction(name):
    tok = _tokenizer(name)
    x, keys = _images(4), ["a", "b", "c", "d"]
    recon, perturbed, out = reconstruct_with_perturbations(tok, x, keys, [0.0, 1.0], seed=0)
    assert recon.shape == x.shape and recon.abs().max() <= 1
    assert torch.equal(perturbed[0.0], recon)
    assert not torch.equal(perturbed[1.0], recon)
    again, _, _ = reconstruct_with_perturbations(tok, x, keys, [], seed=0)
    assert torch.equal(again, recon)  # decoder noise (generative decoder) is seeded too


def test_decoder_noise_follows_the_image_key():
    tok = _tokenizer("wetok_gd")
    z = torch.zeros(3, 32, 2, 2)
    noise = decoder_noise(tok, z, ["a", "b", "c"], seed=0)
    assert noise.shape == (3, tok.decoder.noise_channels, 2, 2)
    swapped = decoder_noise(tok, z, ["c", "a", "b"], seed=0)
    assert torch.equal(swapped, noise[[2, 0, 1]])
    assert not torch.equal(decoder_noise(tok, z, ["a", "b", "c"], seed=1), noise)
    assert decoder_noise(_tokenizer("vq"), z, ["a"], seed=0) is None


# ---------------------------------------------------------- a tokenizer with a known codebook
class _Pool(nn.Module):
    """Encoder: the mean colour of each 4 x 4 patch, (B, 3, H, W) -> (B, 3, H/4, W/4)."""

    z_channels, downsample = 3, 4

    def forward(self, x):
        return F.avg_pool2d(x, 4)


class _Mosaic(nn.Module):
    """Decoder: each token's colour painted over its patch."""

    z_channels = 3

    def forward(self, z):
        return F.interpolate(z, scale_factor=4, mode="nearest")


def palette_tokenizer() -> Tokenizer:
    """VQ over a 64-colour palette (4 levels per channel): reconstructs a photo as a colour
    mosaic, and a code moved to a farther palette entry is a visibly wrong colour."""
    levels = torch.tensor([-0.75, -0.25, 0.25, 0.75])
    palette = torch.cartesian_prod(levels, levels, levels)  # (64, 3)
    quantizer = VectorQuantizer(dim=3, codebook_size=64)
    tok = Tokenizer(_Pool(), quantizer, _Mosaic(), resolution=32)
    with torch.no_grad():
        quantizer.codebook.copy_(palette)
        for proj in (tok.proj_in, tok.proj_out):
            proj.weight.copy_(torch.eye(3))
            proj.bias.zero_()
    return tok.eval()


class _Holder(pl.LightningModule):
    """The least a module needs for ReconstructionEval: a ``tokenizer``."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def validation_step(self, batch, batch_idx):
        return None


def _write_split(folder, count: int) -> str:
    """Shards of ``count`` 48 px crops of three photos (keys ``crop_0000`` ...), 4 per shard."""
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    g = torch.Generator().manual_seed(0)

    def samples():
        for i in range(count):
            p = photos[i % len(photos)]
            y = int(torch.randint(0, p.shape[0] - 48, (1,), generator=g))
            x = int(torch.randint(0, p.shape[1] - 48, (1,), generator=g))
            buf = io.BytesIO()
            Image.fromarray(p[y : y + 48, x : x + 48]).save(buf, format="PNG")
            yield {"__key__": f"crop_{i:04d}", "png": buf.getvalue(), "cls": i % len(photos)}

    return shard_pattern(write_shards(samples(), folder, "val", shard_size=4))


def test_pfid_grows_with_strength_on_a_tokenizer_that_reconstructs(tmp_path):
    shards = _write_split(tmp_path / "shards", 16)
    callback = ReconstructionEval(
        num_images=1000,  # the whole 16-image split
        fid_feature=64,
        pfid_strengths=[0.0, 0.25, 0.5, 1.0],
        lpips=False,
        grid_images=0,
        stats_dir=str(tmp_path / "stats"),
    )
    data = ImageDataModule(val_shards=shards, resolution=32, val_batch_size=8, num_workers=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir=str(tmp_path),
    )
    trainer.validate(_Holder(palette_tokenizer()), datamodule=data, verbose=False)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert m["val/psnr_full"] > 18  # a real reconstruction, not noise
    assert m["val/pfid@0"] == pytest.approx(m["val/rfid"], rel=1e-6)
    curve = [m[f"val/pfid@{s}"] for s in ("0", "0.25", "0.5", "1")]
    assert all(a < b for a, b in zip(curve, curve[1:])), curve
    assert curve[-1] > 2 * curve[0], curve
    assert m["val/pfid"] == m["val/pfid@0.5"]
    assert callback.protocol["reconstruction_eval"]["images"] == 16
