"""MAETok: patch masking in the ViT encoder, HOG against scikit-image, teacher targets, the
auxiliary losses on exactly the masked patches, and the training stages (masking only in main,
encoder bit-identical in decoder_finetune)."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import save_file
from skimage import data
from skimage.feature import hog

from vistok.common.checkpoints import read_checkpoint
from vistok.losses.feature_targets import HOGTarget, TeacherTarget, hog_features
from vistok.losses.tokenizer_loss import TokenizerLoss
from vistok.tokenizers.checkpoint import code_hash
from vistok.tokenizers.mask_modeling import MaskModeling, masked_mse
from vistok.tokenizers.nets.vit import sample_patch_mask
from vistok.tokenizers.titok import Tokenizer1D
from vistok.tokenizers.training import TokenizerModule

# 32 px, 8 px patches (16 patches), 8 latent tokens of 4 channels.
TINY = dict(resolution=32, patch_size=8, channels=32, num_res_blocks=1, num_latents=8, code_dim=4)


def _tok(**extra) -> Tokenizer1D:
    torch.manual_seed(0)
    return Tokenizer1D("maetok_b128", **{**TINY, **extra})


def _images(n=4, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- masking -------------------------------------------------------------------------------------


def test_mask_ratio_is_drawn_per_batch_in_range_and_positions_per_image():
    gen = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(200):
        mask = sample_patch_mask(8, 64, (0.4, 0.6), generator=gen)  # (B, N)
        counts = mask.sum(1)
        assert (counts == counts[0]).all()  # one ratio for the whole batch
        ratios.append(counts[0].item() / 64)
        assert len({tuple(row.nonzero().flatten().tolist()) for row in mask}) > 1
    assert 0.4 <= min(ratios) and max(ratios) <= 0.6
    assert len(set(ratios)) > 5 and np.mean(ratios) == pytest.approx(0.5, abs=0.02)
    # Every position is masked about equally often.
    gen = torch.Generator().manual_seed(1)
    freq = torch.stack([sample_patch_mask(8, 16, (0.5, 0.5), gen) for _ in range(200)]).float()
    assert freq.mean((0, 1)).sub(0.5).abs().max() < 0.06


def test_masked_patches_do_not_reach_the_latents():
    tok = _tok().eval()
    images = _images(2)
    mask = tok.sample_patch_mask(2, generator=torch.Generator().manual_seed(0))
    pixel_mask = mask.reshape(2, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)
    other = torch.where(pixel_mask, -images, images)  # only masked patches change
    with torch.no_grad():
        z = tok.pre_quant(images, patch_mask=mask)
        torch.testing.assert_close(tok.pre_quant(other, patch_mask=mask), z, rtol=0, atol=0)
        assert not torch.allclose(tok.pre_quant(other), tok.pre_quant(images))


def test_encoder_without_mask_ratio_refuses_a_mask_and_keeps_its_state_dict():
    tok = Tokenizer1D("titok_b64", **TINY)
    assert not tok.masks_patches and "encoder.mask_token" not in tok.state_dict()
    with pytest.raises(ValueError, match="without mask_ratio"):
        tok.pre_quant(_images(1), patch_mask=torch.ones(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_ratio"):
        _tok(mask_ratio=[0.6, 0.4])


# --- targets -------------------------------------------------------------------------------------


def _skimage_hog(image: np.ndarray, cell: int, orientations: int) -> np.ndarray:
    return hog(
        image,
        orientations=orientations,
        pixels_per_cell=(cell, cell),
        cells_per_block=(1, 1),
        block_norm="L2",
        feature_vector=False,
        channel_axis=-1,
    )[:, :, 0, 0]  # (cells_y, cells_x, orientations)


@pytest.mark.parametrize("cell, orientations", [(8, 9), (4, 6)])
def test_hog_equals_scikit_image_on_the_same_cells(cell, orientations):
    photo = data.astronaut()[100:164, 180:244].astype(np.float64)  # (64, 64, 3)
    # The 0-255 photo, and the [-1, 1] image the tokenizer sees (rounding moves some gradients
    # across bin edges, so each is compared with scikit-image on the same array).
    for image in (photo, photo / 127.5 - 1, np.random.default_rng(0).random((64, 64, 3))):
        ours = hog_features(torch.from_numpy(image).permute(2, 0, 1)[None], cell, orientations)
        np.testing.assert_allclose(
            ours[0].numpy(), _skimage_hog(image, cell, orientations), atol=1e-5
        )


def test_hog_target_lays_cells_out_per_patch():
    images = _images(2).double()
    target = HOGTarget(patch_size=16, cell_size=8, orientations=9)
    feats = target(images)  # (B, 4 patches, 4 cells x 9)
    cells = hog_features(images, 8, 9)  # (B, 4, 4, 9)
    assert feats.shape == (2, 4, 36)
    torch.testing.assert_close(feats[:, 1], cells[:, 0:2, 2:4].reshape(2, 36).float())


def test_teacher_loads_a_local_weight_file_and_stays_out_of_the_state_dict(tmp_path):
    args = dict(model="vit_tiny_patch16_224", img_size=32, depth=1, grid=4)
    with pytest.warns(UserWarning, match="randomly initialised"):
        random = TeacherTarget(**args)
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in random.net.state_dict().items()}, str(path))
    loaded = TeacherTarget(weights=str(path), **args)
    images = _images(2)
    feats = loaded(images)
    assert feats.shape == (2, 16, 192)  # 2x2 teacher patches resized to the 4x4 grid
    torch.testing.assert_close(feats, random(images))
    torch.save(random.net.state_dict(), tmp_path / "teacher.pt")
    torch.testing.assert_close(
        TeacherTarget(weights=str(tmp_path / "teacher.pt"), **args)(images), feats
    )
    assert loaded.state_dict() == {}
    with pytest.raises(ValueError, match="does not fit"):
        TeacherTarget(weights=str(path), **{**args, "depth": 2})


# --- auxiliary losses ----------------------------------------------------------------------------


def test_auxiliary_losses_score_exactly_the_masked_patches():
    tok = _tok()
    teacher = dict(model="vit_tiny_patch16_224", img_size=32, depth=1, weight=0.5)
    with pytest.warns(UserWarning):
        aux = MaskModeling(hog_weight=2.0, teachers=[teacher], depth=1).bind(tok)
    assert aux.names == ["hog", "teacher0_vit_tiny_patch16_224"] and aux.weights == [2.0, 0.5]
    images = _images(2)
    latents = tok.quantize(images).quantized  # (B, C, K)
    mask = tok.sample_patch_mask(2, generator=torch.Generator().manual_seed(3))
    total, logs = aux(images, latents, mask)
    # By hand: each decoder's prediction against its target, averaged over masked patches.
    expected = 0.0
    for weight, target, decoder in zip(aux.weights, aux.targets, aux.decoders):
        goal = target(images)
        if isinstance(target, TeacherTarget):
            goal = torch.nn.functional.layer_norm(goal, goal.shape[-1:])
        err = (decoder.features(latents) - goal).pow(2).mean(-1)  # (B, N)
        expected = expected + weight * err[mask].mean()
    torch.testing.assert_close(total, expected)
    assert logs["mask_ratio"] == mask.float().mean()
    # Unmasked patches do not count; every masked one does.
    pred, goal = torch.randn(2, 16, 5), torch.randn(2, 16, 5)
    moved = goal.clone()
    moved[~mask] += 10
    assert masked_mse(pred, moved, mask) == masked_mse(pred, goal, mask)
    moved[mask] += 1
    assert masked_mse(pred, moved, mask) != masked_mse(pred, goal, mask)
    total.backward()
    for name, p in aux.decoders.named_parameters():  # (no nested dropout: no dropped token)
        assert (p.grad is not None) == ("dropped_token" not in name), name
    assert tok.encoder.latents.grad is not None  # the auxiliary losses shape the latents
    # None of it belongs to the tokenizer.
    assert not any("decoders" in k for k in tok.state_dict())


def test_mask_modeling_needs_a_masking_1d_tokenizer_and_a_target():
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskModeling().bind(Tokenizer1D("titok_b64", **TINY))
    with pytest.raises(ValueError, match="needs a target"):
        MaskModeling(hog_weight=0.0)


# --- training stages -----------------------------------------------------------------------------


class _Spy:
    """Records what the training step passed to the encoder and the auxiliary losses."""

    def __init__(self, module: TokenizerModule):
        self.sampled, self.encoded, self.scored = [], [], []
        tok = module.tokenizer
        sample, encode = tok.sample_patch_mask, tok.encoder.forward

        def sample_spy(*a, **k):
            self.sampled.append(sample(*a, **k))
            return self.sampled[-1]

        def encode_spy(x, patch_mask=None):
            self.encoded.append(patch_mask)
            return encode(x, patch_mask=patch_mask)

        tok.sample_patch_mask, tok.encoder.forward = sample_spy, encode_spy
        if module.mask_modeling is not None:
            score = module.mask_modeling.forward

            def score_spy(images, latents, mask):
                self.scored.append(mask)
                return score(images, latents, mask)

            module.mask_modeling.forward = score_spy


def _fit(module: TokenizerModule, steps: int, tmp_path) -> None:
    batches = [{"image": _images(4, seed=i)} for i in range(steps)]
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))


def _module(**kwargs) -> TokenizerModule:
    loss = TokenizerLoss(perceptual_weight=0.0)
    return TokenizerModule(tokenizer=_tok(), loss=loss, lr=1e-3, ema_decay=0.9, **kwargs)


def test_main_stage_masks_and_decoder_finetune_does_not_and_keeps_the_encoder(tmp_path):
    module = _module(mask_modeling=MaskModeling(depth=1))
    spy = _Spy(module)
    _fit(module, 3, tmp_path)
    assert len(spy.sampled) == 3
    for sampled, encoded, scored in zip(spy.sampled, spy.encoded, spy.scored):
        assert encoded is sampled and scored is sampled  # the very same masked set
        assert 0.4 <= sampled.float().mean().item() <= 0.6
    ckpt = tmp_path / "stage1.ckpt"
    module.trainer.save_checkpoint(ckpt)
    state = read_checkpoint(ckpt)["state_dict"]
    assert any(k.startswith("mask_modeling.decoders.") for k in state)

    with pytest.raises(ValueError, match="mask_modeling to null"):
        _module(stage="decoder_finetune", init_from=str(ckpt), mask_modeling=MaskModeling())
    stage2 = _module(stage="decoder_finetune", init_from=str(ckpt))
    start = {k: v.clone() for k, v in stage2.tokenizer.state_dict().items()}
    spy = _Spy(stage2)
    _fit(stage2, 3, tmp_path / "stage2")
    assert spy.sampled == [] and spy.encoded == [None] * 3
    end = stage2.tokenizer.state_dict()
    frozen = [n for n in start if n.startswith(("encoder.", "proj_in.", "quantizer."))]
    assert "encoder.mask_token" in frozen
    assert all(torch.equal(start[n], end[n]) for n in frozen)  # bit-identical
    assert not torch.equal(start["decoder.head.weight"], end["decoder.head.weight"])
    assert stage2.source["code_hash"] == code_hash(stage2.tokenizer)
