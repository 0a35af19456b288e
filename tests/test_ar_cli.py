"""Code extraction, generator checkpoints and sample.py: the tokenizer identity is checked at every
hand-over, and the real CLIs run end to end (tokenizer -> codes -> GPT -> samples + gFID)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import ROOT, class_shards, photo_crops, run

from vistok.common.checkpoints import file_sha256, read_checkpoint
from vistok.data.codes import CodeDataModule, CodeStream
from vistok.data.datamodule import ImageDataModule
from vistok.data.make_shards import shard_pattern, write_shards
from vistok.generators.ar_training import ARModule
from vistok.generators.checkpoint import load_generator
from vistok.generators.training import check_codes_match
from vistok.sample import main as sample_main
from vistok.tokenizers.checkpoint import load_tokenizer_from_checkpoint
from vistok.tokenizers.extract_codes import extract
from vistok.tokenizers.vq import VQTokenizer

TINY_VQ = dict(
    resolution=32,
    channels=16,
    num_res_blocks=1,
    channel_mult=[1, 2, 2],
    codebook_size=64,
    num_mid_blocks=1,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def save_tokenizer(path, seed: int = 0, ema: bool = True) -> VQTokenizer:
    """A checkpoint in ``TokenizerModule``'s layout; EMA shadows differ from the live weights."""
    torch.manual_seed(seed)
    tok = VQTokenizer(**TINY_VQ)
    state = {f"tokenizer.{k}": v for k, v in tok.state_dict().items()}
    if ema:
        for name, p in tok.named_parameters():
            state[f"ema.{name}"] = p.detach() * 0.9 + 0.01
    hparams = {"tokenizer": tok.config, "stage": "main"}
    torch.save({"hyper_parameters": hparams, "state_dict": state}, path)
    return tok


def image_shards(folder, count: int = 12) -> str:
    crops = photo_crops(folder / "photos", count)
    samples = (
        {"__key__": f"img{i:03d}", "png": p.read_bytes(), "cls": i % 3} for i, p in enumerate(crops)
    )
    return shard_pattern(write_shards(samples, folder / "shards", "img", shard_size=5))


def test_tokenizer_is_rebuilt_strictly_with_its_ema_weights(tmp_path):
    live = save_tokenizer(tmp_path / "tok.ckpt")
    ema = load_tokenizer_from_checkpoint(tmp_path / "tok.ckpt", ema=True)
    raw = load_tokenizer_from_checkpoint(tmp_path / "tok.ckpt", ema=False)
    for (name, p), q, r in zip(live.named_parameters(), ema.parameters(), raw.parameters()):
        torch.testing.assert_close(q, p * 0.9 + 0.01, msg=name)
        torch.testing.assert_close(r, p, msg=name)
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    bad = read_checkpoint(tmp_path / "tok.ckpt")
    bad["state_dict"].pop("tokenizer.proj_in.weight")
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="proj_in.weight"):
        load_tokenizer_from_checkpoint(tmp_path / "bad.ckpt")


def test_extracted_codes_are_the_tokenizer_codes_of_each_image_and_its_mirror(tmp_path):
    save_tokenizer(tmp_path / "tok.ckpt")
    spec = image_shards(tmp_path)
    meta = extract(
        str(tmp_path / "tok.ckpt"),
        str(tmp_path / "codes"),
        spec,
        "train",
        flip=True,
        batch_size=5,
        num_workers=0,
    )
    info = meta["splits"]["train"]
    assert (info["count"], info["views"], info["num_classes"]) == (12, 2, 3)
    assert meta["tokenizer"]["sha256"] == file_sha256(tmp_path / "tok.ckpt")
    assert meta["tokenizer"]["ema"] and meta["dtype"] == "int16"

    tok = load_tokenizer_from_checkpoint(tmp_path / "tok.ckpt")
    images = ImageDataModule(val_shards=spec, resolution=32, val_batch_size=12, num_workers=0)
    batch = next(iter(images.val_dataloader(rank=0, world_size=1)))
    expected = {
        k: (tok.encode(x[None])[0], tok.encode(x[None].flip(-1))[0])
        for k, x in zip(batch["key"], batch["image"])
    }
    data = CodeDataModule(
        str(tmp_path / "codes"), val_split="train", batch_size=4, num_workers=0, batches_per_epoch=6
    )
    seen = {}
    for b in data.val_dataloader(rank=0, world_size=1):
        for key, codes, label in zip(b["key"], b["codes"], b["label"]):
            assert torch.equal(codes, expected[key][0])  # validation reads view 0
            seen[key] = label.item()
    assert sorted(seen) == sorted(expected)
    assert seen == {f"img{i:03d}": i % 3 for i in range(12)}
    views = set()
    for b in data.train_dataloader(rank=0, world_size=1):
        assert b["codes"].shape == (4, *tok.token_shape)
        for key, codes in zip(b["key"], b["codes"]):
            match = [torch.equal(codes, v) for v in expected[key]]
            assert any(match)
            views.add(match.index(True))
    assert views == {0, 1}  # training picks both the image and its mirror


def test_codes_of_another_tokenizer_are_refused(tmp_path):
    save_tokenizer(tmp_path / "a.ckpt", seed=0)
    save_tokenizer(tmp_path / "b.ckpt", seed=1)
    spec = image_shards(tmp_path, 5)
    meta = extract(str(tmp_path / "a.ckpt"), str(tmp_path / "codes"), spec, num_workers=0)
    with pytest.raises(SystemExit, match="holds codes of tokenizer"):
        extract(str(tmp_path / "b.ckpt"), str(tmp_path / "codes"), spec, "val", num_workers=0)
    module = ARModule(str(tmp_path / "b.ckpt"), preset="tiny", num_classes=3)
    with pytest.raises(ValueError, match="extracted with tokenizer"):
        check_codes_match(meta, module.identity, module.net)
    same = ARModule(str(tmp_path / "a.ckpt"), preset="tiny", num_classes=3)
    check_codes_match(meta, same.identity, same.net)
    with pytest.raises(ValueError, match="num_classes"):
        few = ARModule(str(tmp_path / "a.ckpt"), preset="tiny", num_classes=2)
        check_codes_match(meta, few.identity, few.net)


def test_unreadable_code_shards_stop_training_with_their_names(tmp_path):
    stream = CodeStream([str(tmp_path / "gone.tar")], batch_size=2, train=True)
    with pytest.warns(UserWarning, match="gone.tar"):
        with pytest.raises(RuntimeError, match="none of these code shards"):
            next(iter(stream))


def save_generator(tmp_path, tokenizer_path, ema: bool) -> tuple[ARModule, str]:
    module = ARModule(
        str(tokenizer_path), preset="tiny", num_classes=3, ema_decay=0.5 if ema else None
    )
    if ema:
        with torch.no_grad():
            for p in module.net.parameters():
                p.add_(torch.randn_like(p))
            module.ema.update()  # shadows now differ from the live weights
    path = str(tmp_path / "gen.ckpt")
    ckpt = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)  # adds the EMA weights, as training checkpoints do
    torch.save(ckpt, path)
    return module, path


def test_generator_checkpoint_rebuilds_the_gpt_with_ema_weights(tmp_path):
    save_tokenizer(tmp_path / "tok.ckpt")
    module, path = save_generator(tmp_path, tmp_path / "tok.ckpt", ema=True)
    codes = torch.randint(64, (2, 8, 8))
    labels = torch.tensor([0, 2])
    live = load_generator(path, ema=False).gpt
    torch.testing.assert_close(live(codes, labels), module.net.eval()(codes, labels))
    averaged = load_generator(path).gpt  # EMA by default when present
    module.ema.swap()
    torch.testing.assert_close(averaged(codes, labels), module.net(codes, labels))


def test_sample_refuses_a_tokenizer_other_than_the_generators(tmp_path, capsys):
    save_tokenizer(tmp_path / "tok.ckpt", seed=0)
    save_tokenizer(tmp_path / "other.ckpt", seed=1)
    _, gen = save_generator(tmp_path, tmp_path / "tok.ckpt", ema=False)
    args = ["--generator", gen, "--num-images", "2", "--fid", "off", "--out", str(tmp_path / "s")]
    with pytest.raises(SystemExit, match="is not the one this generator was trained on"):
        sample_main([*args, "--tokenizer", str(tmp_path / "other.ckpt")])
    save_tokenizer(tmp_path / "tok.ckpt", seed=2)  # the recorded file was overwritten
    with pytest.raises(SystemExit, match="is not the one"):
        sample_main(args)
    assert not (tmp_path / "s" / "samples.npz").exists()


@pytest.mark.slow
def test_tokenizer_codes_generator_samples_through_the_real_clis(tmp_path, monkeypatch):
    shards = class_shards(tmp_path, monkeypatch, per_class=12)

    tok_run = tmp_path / "tok"
    run(
        [
            "train.py",
            "--config",
            "tokenizer/vq.yaml",
            "--config",
            "presets/cpu_small.yaml",
            *[f"--model.init_args.tokenizer.init_args.{k}={v}" for k, v in TINY_VQ.items()],
            "--data.init_args.resolution=32",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0",
            "--trainer.limit_val_batches=1",
            f"--data.init_args.train_shards={shards}",
            f"--data.init_args.val_shards={shards}",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            f"--run_dir={tok_run}",
        ]
    )
    tok_ckpt = str(tok_run / "checkpoints" / "last.ckpt")

    codes = tmp_path / "codes"
    for split, extra in (("train", ["--flip"]), ("val", [])):
        run(
            [
                "-m",
                "vistok.data.extract_codes",
                "--tokenizer",
                tok_ckpt,
                "--shards",
                shards,
                "--out",
                str(codes),
                "--split",
                split,
                "--num-workers",
                "0",
                *extra,
            ]
        )
    meta = json.loads((codes / "meta.json").read_text())
    assert meta["tokenizer"]["ema"]  # cpu_small trains with EMA; the codes used it
    assert meta["splits"]["train"]["num_classes"] == 2

    gen_run = tmp_path / "gen"
    train_gpt = [
        "train.py",
        "--config",
        "generator/ar_cpu_small.yaml",
        f"--model.init_args.tokenizer={tok_ckpt}",
        f"--data.init_args.root={codes}",
        "--model.init_args.preset=tiny",
        "--model.init_args.num_classes=2",
        "--model.init_args.ema_decay=0.9",
        "--model.init_args.sample_images=2",
        "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0",
        "--trainer.val_check_interval=2",
        f"--run_dir={gen_run}",
    ]
    run([*train_gpt, "--trainer.max_steps=2"])
    run([*train_gpt, "--trainer.max_steps=4", "--ckpt_path=last"])  # resume
    gen_ckpt = str(gen_run / "checkpoints" / "last.ckpt")
    state = read_checkpoint(gen_ckpt)
    # Every optimizer step updated the EMA, the ones before the resume included.
    assert state["global_step"] == 4 and state["state_dict"]["ema.num_updates"] == 4
    assert not any(k.startswith("tokenizer.") for k in state["state_dict"])
    history = json.loads((gen_run / "results.json").read_text())
    assert [h["step"] for h in history] == [2, 4] and "val/loss" in history[-1]["metrics"]
    assert list((gen_run / "images").glob("samples_*.png"))

    out = tmp_path / "samples"
    sample = [
        "sample.py",
        "--generator",
        gen_ckpt,
        "--num-images",
        "6",
        "--batch-size",
        "4",
        "--cfg",
        "2.0",
        "--top-k",
        "20",
        "--seed",
        "3",
    ]
    run([*sample, "--out", str(out), "--ref-shards", shards])
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (6, 32, 32, 3) and arr.dtype == np.uint8
    assert len(list((out / "images").glob("*.png"))) == 6 and (out / "grid.png").is_file()
    results = json.loads((out / "results.json").read_text())
    protocol = results["protocol"]
    assert protocol["tokenizer"]["sha256"] == file_sha256(tok_ckpt)
    assert protocol["generator"]["ema"] and protocol["sampling"]["top_k"] == 20
    assert isinstance(results["gfid"], float) and results["gfid"] > 0
    assert protocol["fid"]["reference_count"] == 24

    # Two processes: disjoint batches, per-rank parts merged by rank 0; the same images.
    run(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "sample.py"),
            *sample[1:],
            "--fid",
            "off",
            "--out",
            str(tmp_path / "ddp"),
        ]
    )
    assert np.array_equal(np.load(tmp_path / "ddp" / "samples.npz")["arr_0"], arr)
    assert not (tmp_path / "ddp" / "parts").exists() and not (out / "parts").exists()

    # Exported (generator + its tokenizer in one folder): sample.py gives the same images.
    exported = tmp_path / "exported"
    run(["export.py", "--ckpt", gen_ckpt, "--out", str(exported), "--ema"])
    assert (exported / "tokenizer" / "model.safetensors").is_file()
    from_folder = [*sample[:2], str(exported), *sample[3:], "--fid", "off"]
    run([*from_folder, "--out", str(tmp_path / "from_folder")])
    assert np.array_equal(np.load(tmp_path / "from_folder" / "samples.npz")["arr_0"], arr)
    # Codes extracted with the exported tokenizer keep the checkpoint's identity.
    run(
        [
            "-m",
            "vistok.data.extract_codes",
            "--tokenizer",
            str(exported / "tokenizer"),
            "--shards",
            shards,
            "--out",
            str(tmp_path / "codes2"),
            "--split",
            "val",
            "--num-workers",
            "0",
        ]
    )
    meta2 = json.loads((tmp_path / "codes2" / "meta.json").read_text())
    assert meta2["tokenizer"]["sha256"] == file_sha256(tok_ckpt)
