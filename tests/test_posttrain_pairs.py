"""Post-training pairs: what make_posttrain_pairs stores, resuming, process count, DataModule."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from helpers import ROOT, run
from PIL import Image
from test_ar_cli import image_shards, save_generator, save_tokenizer

from vistok.common.checkpoints import file_sha256
from vistok.common.images import to_uint8
from vistok.data.codes import decode_codes
from vistok.data.datamodule import ImageDataModule
from vistok.data.pairs import PairDataModule
from vistok.generators.posttrain_pairs import main as make_pairs
from vistok.tokenizers.checkpoint import load_tokenizer_from_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup(tmp_path):
    save_tokenizer(tmp_path / "tok.ckpt")
    spec = image_shards(tmp_path, 12)  # 3 shards of 5, 5, 2 images, classes 0..2
    _, gen = save_generator(tmp_path, tmp_path / "tok.ckpt", ema=False)
    return tmp_path, spec, gen


def pairs_args(gen, spec, out, *extra) -> list[str]:
    return ["--generator", gen, "--shards", spec, "--out", str(out), *extra]


def read_pairs(folder) -> dict[str, dict]:
    """Every sample of every shard, decoded: {key: {member: value}}."""
    samples: dict[str, dict] = {}
    for shard in sorted(folder.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, kind = member.name.partition(".")
                data = tar.extractfile(member).read()
                if kind == "png":
                    value = np.array(Image.open(io.BytesIO(data)))
                elif kind.endswith("npy"):
                    value = decode_codes(data)
                else:
                    value = int(data)
                samples.setdefault(key, {})[kind] = value
    return samples


def test_pairs_hold_the_real_pixels_their_codes_and_the_regeneration(setup):
    tmp, spec, gen = setup
    meta = make_pairs(pairs_args(gen, spec, tmp / "pairs", "--preservation", "0.5"))
    info = meta["splits"]["train"]
    assert info["complete"] and info["count"] == 12 and len(info["shards"]) == 3
    assert meta["tokenizer"]["sha256"] == file_sha256(tmp / "tok.ckpt")
    assert meta["generator"]["sha256"] == file_sha256(gen)
    assert meta["code_source"] == meta["tokenizer"]  # not a post-trained tokenizer
    assert meta["protocol"]["preservation"] == 0.5
    assert meta["protocol"]["sampling"]["cfg_scale"] == 6.0  # RobusTok's defaults
    assert meta["protocol"]["sampling"]["temperature"] == 1.02
    # RobusTok's guidance: 6.0 is the peak of RAR's power-cosine ramp, not a constant.
    assert meta["protocol"]["sampling"]["cfg_schedule"] == "pow-cosine"
    assert meta["protocol"]["sampling"]["cfg_power"] == 1.15

    tok = load_tokenizer_from_checkpoint(tmp / "tok.ckpt")  # EMA weights, as the codes used
    crops = ImageDataModule(val_shards=spec, resolution=32, val_batch_size=12, num_workers=0)
    batch = next(iter(crops.val_dataloader(rank=0, world_size=1)))
    expected = dict(zip(batch["key"], to_uint8(batch["image"])))
    samples = read_pairs(tmp / "pairs")
    assert sorted(samples) == sorted(expected)
    kept_total = 0
    for key, s in sorted(samples.items()):
        assert np.array_equal(s["png"], expected[key])  # lossless: the pixels that were encoded
        image = torch.from_numpy(s["png"]).permute(2, 0, 1)[None].float() / 127.5 - 1
        assert np.array_equal(s["real.npy"], tok.encode(image)[0].numpy())
        kept = s["kept.npy"]
        assert kept.shape == (8, 8) and kept.dtype == bool
        assert np.array_equal(s["codes.npy"][kept], s["real.npy"][kept])
        assert s["cls"] == int(key[3:]) % 3
        kept_total += kept.sum()
    assert info["kept_fraction"] == pytest.approx(kept_total / (12 * 64))
    assert 0.35 < info["kept_fraction"] < 0.65 and info["changed_fraction"] > 0.2


def test_preservation_one_stores_the_ground_truth(setup):
    tmp, spec, gen = setup
    meta = make_pairs(pairs_args(gen, spec, tmp / "pairs", "--preservation", "1.0"))
    assert meta["splits"]["train"]["changed_fraction"] == 0.0
    for s in read_pairs(tmp / "pairs").values():
        assert np.array_equal(s["codes.npy"], s["real.npy"]) and s["kept.npy"].all()


def test_resuming_skips_finished_shards_and_batch_size_changes_nothing(setup):
    tmp, spec, gen = setup
    out = tmp / "pairs"
    make_pairs(pairs_args(gen, spec, out, "--batch-size", "5"))
    first = read_pairs(out)
    done = out / "train-000000.tar"
    stamp = done.stat().st_mtime_ns
    (out / "train-000001.tar").unlink()  # as if interrupted
    (out / "train-000002.tar").rename(out / "train-000002.tar.partial")
    meta = make_pairs(pairs_args(gen, spec, out, "--batch-size", "3"))
    assert done.stat().st_mtime_ns == stamp  # finished shards are not redone
    assert meta["splits"]["train"]["complete"] and not list(out.glob("*.partial"))
    again = read_pairs(out)
    assert sorted(again) == sorted(first)
    for key, s in first.items():  # per-sample seeds: other batches, same pairs
        assert np.array_equal(again[key]["codes.npy"], s["codes.npy"]), key

    with pytest.raises(SystemExit, match="another protocol"):
        make_pairs(pairs_args(gen, spec, out, "--preservation", "0.5"))
    with pytest.raises(SystemExit, match="not of"):
        make_pairs(pairs_args(gen, spec.replace("000002", "000001"), out))


def test_pair_datamodule_batches_images_with_their_generated_codes(setup):
    tmp, spec, gen = setup
    make_pairs(pairs_args(gen, spec, tmp / "pairs"))
    stored = read_pairs(tmp / "pairs")
    data = PairDataModule(str(tmp / "pairs"), batch_size=4, num_workers=0, batches_per_epoch=5)
    assert data.tokenizer_identity["sha256"] == file_sha256(tmp / "tok.ckpt")
    seen = set()
    for batch in data.train_dataloader(rank=0, world_size=1):
        assert batch["image"].shape == (4, 3, 32, 32) and batch["codes"].shape == (4, 8, 8)
        for key, image, codes in zip(batch["key"], batch["image"], batch["codes"]):
            assert np.array_equal(to_uint8(image[None])[0], stored[key]["png"])
            assert np.array_equal(codes.numpy(), stored[key]["codes.npy"])
            seen.add(key)
    assert len(seen) > 4
    val = [k for b in data.val_dataloader(rank=0, world_size=1) for k in b["key"]]
    assert sorted(val) == sorted(stored)  # read once

    meta = json.loads((tmp / "pairs" / "meta.json").read_text())
    meta["splits"]["train"]["complete"] = False
    (tmp / "pairs" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unfinished"):
        PairDataModule(str(tmp / "pairs"))


@pytest.mark.slow
def test_two_processes_make_the_same_pairs_as_one(setup):
    tmp, spec, gen = setup
    make_pairs(pairs_args(gen, spec, tmp / "one"))
    args = pairs_args(gen, spec, tmp / "two")
    run(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + ["-m", "vistok.data.make_posttrain_pairs", *args],
        cwd=ROOT,
    )
    one, two = read_pairs(tmp / "one"), read_pairs(tmp / "two")
    assert sorted(one) == sorted(two)
    for key in one:
        assert np.array_equal(one[key]["codes.npy"], two[key]["codes.npy"]), key
    meta = json.loads((tmp / "two" / "meta.json").read_text())
    assert meta["splits"]["train"]["complete"] and meta["splits"]["train"]["count"] == 12


def test_continuous_pairs_partially_noise_and_denoise_and_post_train(tmp_path):
    """KL tokenizer + flow-matching generator: float latents in place of code ids."""
    import pytorch_lightning as pl

    from vistok.generators.diffusion_training import DiffusionModule
    from vistok.losses.tokenizer_loss import TokenizerLoss
    from vistok.tokenizers.checkpoint import CODE_PARTS
    from vistok.tokenizers.gaussian import KLTokenizer
    from vistok.tokenizers.training import TokenizerModule

    torch.manual_seed(0)
    kl = KLTokenizer(resolution=32, channels=16, num_res_blocks=1, channel_mult=[1, 2, 2])
    state = {f"tokenizer.{k}": v for k, v in kl.state_dict().items()}
    torch.save(
        {"hyper_parameters": {"tokenizer": kl.config, "stage": "main"}, "state_dict": state},
        tmp_path / "kl.ckpt",
    )
    flow = DiffusionModule(str(tmp_path / "kl.ckpt"), preset="tiny", num_classes=3, ema_decay=None)
    gen = tmp_path / "flow.ckpt"
    torch.save({"hyper_parameters": dict(flow.hparams), "state_dict": flow.state_dict()}, gen)
    spec = image_shards(tmp_path, 6)
    metas = {}
    for t in ("0.2", "0.9"):
        args = pairs_args(
            str(gen), spec, tmp_path / f"pairs{t}", "--noise-level", t, "--steps", "3"
        )
        metas[t] = make_pairs(args)
    meta = metas["0.2"]
    assert meta["protocol"]["mode"] == "partial_noising" and meta["dtype"] == "float32"
    assert (
        metas["0.2"]["splits"]["train"]["latent_mse"]
        < metas["0.9"]["splits"]["train"]["latent_mse"]
    )
    samples = read_pairs(tmp_path / "pairs0.2")
    tok = load_tokenizer_from_checkpoint(tmp_path / "kl.ckpt")
    for s in samples.values():
        image = torch.from_numpy(s["png"]).permute(2, 0, 1)[None].float() / 127.5 - 1
        assert s["codes.npy"].dtype == np.float32 and s["codes.npy"].shape == (4, 8, 8)
        torch.testing.assert_close(torch.from_numpy(s["real.npy"]), tok.encode(image)[0])
        assert not np.allclose(s["codes.npy"], s["real.npy"]) and "kept.npy" not in s

    # One post-training step on the latents: the decoder moves, the encoder does not.
    module = TokenizerModule(
        loss=TokenizerLoss(reconstruction="l2", perceptual_weight=0.0),
        stage="post_train",
        init_from=str(tmp_path / "kl.ckpt"),
        lr=1e-2,
    )
    before = {k: v.clone() for k, v in module.tokenizer.state_dict().items()}
    data = PairDataModule(str(tmp_path / "pairs0.2"), batch_size=3, num_workers=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    after = module.tokenizer.state_dict()
    code = [k for k in before if k.startswith(tuple(f"{p}." for p in CODE_PARTS))]
    assert all(torch.equal(after[k], before[k]) for k in code)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("decoder."))
