"""Diffusion generators end to end through the real CLIs: tokenizer -> latents/bits -> DiT
(flow matching) or Bernoulli diffusion -> sample.py -> gFID in results.json.

Training and sampling run as subprocesses (train.py, sample.py); extraction and export call the
functions behind their CLIs (covered as CLIs by tests/test_ar_cli.py) to keep process start-ups
few on a 2-core CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import class_shards, run

from vistok.common.checkpoints import file_sha256, read_checkpoint
from vistok.data.codes import CodeDataModule
from vistok.evaluation.ref_batch import read_ref_batch, write_ref_batch
from vistok.generators.checkpoint import load_generator
from vistok.generators.export import export
from vistok.sample import main as sample_main
from vistok.tokenizers.extract_codes import extract

TINY_CNN = dict(resolution=32, channels=16, num_res_blocks=1, channel_mult=[1, 2, 2])


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Real image shards of two classes, with the gFID weights in place."""
    return class_shards(tmp_path, monkeypatch, per_class=8)


def train_tokenizer(
    tmp_path,
    config: str,
    shards: str,
    *cli: str,
    name: str = "tok",
    steps: int = 10,
    nets: dict | None = None,
    **extra,
) -> str:
    """Train through train.py; ``nets`` replaces the tiny CNN sizes, ``cli`` adds arguments."""
    args = {**(nets if nets is not None else {**TINY_CNN, "num_mid_blocks": 1}), **extra}
    run(
        [
            "train.py",
            "--config",
            config,
            "--config",
            "presets/cpu_small.yaml",
            *[f"--model.init_args.tokenizer.init_args.{k}={v}" for k, v in args.items()],
            "--data.init_args.resolution=32",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0",
            "--trainer.limit_val_batches=1",
            f"--data.init_args.train_shards={shards}",
            f"--data.init_args.val_shards={shards}",
            f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={steps}",
            f"--run_dir={tmp_path / name}",
            *cli,
        ]
    )
    return str(tmp_path / name / "checkpoints" / "last.ckpt")


def extract_splits(tok_ckpt: str, shards: str, out) -> dict:
    extract(tok_ckpt, str(out), shards, "train", flip=True, num_workers=0)
    return extract(tok_ckpt, str(out), shards, "val", num_workers=0)


def train_generator(tmp_path, config: str, tok_ckpt: str, codes, steps: int):
    args = [
        "train.py",
        "--config",
        config,
        f"--model.init_args.tokenizer={tok_ckpt}",
        f"--data.init_args.root={codes}",
        "--model.init_args.preset=tiny",
        "--model.init_args.num_classes=2",
        "--model.init_args.sample_images=2",
        "--model.init_args.sample_steps=4",
        "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0",
        "--trainer.val_check_interval=2",
        f"--trainer.max_steps={steps}",
        f"--run_dir={tmp_path / 'gen'}",
    ]
    run(args)
    return str(tmp_path / "gen" / "checkpoints" / "last.ckpt")


def sample_args(gen: str, out, *extra: str) -> list[str]:
    args = ["--generator", gen, "--num-images", "6", "--batch-size", "4", "--seed", "3"]
    return [*args, *extra, "--out", str(out)]


def sample(gen_ckpt: str, out, shards: str, *extra: str) -> dict:
    run(["sample.py", *sample_args(gen_ckpt, out, *extra), "--ref-shards", shards])
    return json.loads((out / "results.json").read_text())


def check_results(results: dict, out, tok_ckpt: str) -> None:
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (6, 32, 32, 3) and arr.dtype == np.uint8
    assert (out / "grid.png").is_file()
    protocol = results["protocol"]
    assert protocol["tokenizer"]["sha256"] == file_sha256(tok_ckpt)
    assert np.isfinite(results["gfid"]) and results["gfid"] > 0
    assert protocol["fid"]["reference_count"] == 16


@pytest.mark.slow
def test_kl_tokenizer_latents_dit_samples_through_the_real_clis(tmp_path, env):
    shards = env
    tok_ckpt = train_tokenizer(tmp_path, "tokenizer/kl.yaml", shards, latent_channels=4)
    codes = tmp_path / "latents"
    meta = extract_splits(tok_ckpt, shards, codes)
    assert meta["dtype"] == "float32" and meta["code_space"]["kind"] == "continuous"
    stats = meta["splits"]["train"]["latent_stats"]
    assert len(stats["mean"]) == 4 and stats["count"] == 16 * 2 * 8 * 8  # images x views x grid

    # The data module serves float latents; val stats are those of the val latents it serves.
    data = CodeDataModule(str(codes), batch_size=32, num_workers=0)
    val = torch.cat([b["codes"] for b in data.val_dataloader(rank=0, world_size=1)])
    assert val.dtype == torch.float32 and val.shape == (16, 4, 8, 8)
    val_stats = meta["splits"]["val"]["latent_stats"]
    torch.testing.assert_close(
        val.double().mean((0, 2, 3)), torch.tensor(val_stats["mean"], dtype=torch.float64)
    )
    torch.testing.assert_close(
        val.double().std((0, 2, 3), correction=0),
        torch.tensor(val_stats["std"], dtype=torch.float64),
    )

    gen_ckpt = train_generator(tmp_path, "generator/dit_cpu_small.yaml", tok_ckpt, codes, 4)
    state = read_checkpoint(gen_ckpt)
    assert state["global_step"] == 4 and state["state_dict"]["ema.num_updates"] == 4
    # Statistics from meta.json live in the generator's checkpoint.
    torch.testing.assert_close(
        state["state_dict"]["net.latent_mean"], torch.tensor(stats["mean"], dtype=torch.float32)
    )
    assert list((tmp_path / "gen" / "images").glob("samples_*.png"))
    gen = load_generator(gen_ckpt)
    assert gen.model.kind == "flow" and gen.identity["ema"]

    out = tmp_path / "samples"
    extra = ["--steps", "4", "--sampler", "heun", "--cfg", "1.5", "--cfg-interval", "0.1", "1"]
    results = sample(gen_ckpt, out, shards, *extra)
    check_results(results, out, tok_ckpt)
    sampling = results["protocol"]["sampling"]
    assert (sampling["steps"], sampling["sampler"], sampling["cfg_scale"]) == (4, "heun", 1.5)
    assert sampling["cfg_interval"] == [0.1, 1.0]

    # Exported with its tokenizer: the same images from the folder.
    exported = export(gen_ckpt, str(tmp_path / "exported"), ema=True)
    sample_main(sample_args(str(exported), tmp_path / "from_folder", *extra, "--fid", "off"))
    arr = np.load(out / "samples.npz")["arr_0"]
    assert np.array_equal(np.load(tmp_path / "from_folder" / "samples.npz")["arr_0"], arr)

    # Against an ADM-format reference batch of the same 16 images: the same gFID, plus sFID,
    # precision and recall; the samples' npz reads as an ADM batch itself.
    ref = tmp_path / "ref.npz"
    write_ref_batch(ref, shards, 16, 32)
    adm = sample_main(sample_args(str(exported), tmp_path / "adm", *extra, "--ref-batch", str(ref)))
    assert adm["gfid"] == pytest.approx(results["gfid"], rel=1e-3)
    numbers = adm["adm_metrics"]
    assert numbers["sfid"] > 0 and 0 <= numbers["precision"] <= 1 and 0 <= numbers["recall"] <= 1
    assert numbers["inception_score"] is None and adm["protocol"]["fid"]["reference_images"] == 16
    np.testing.assert_array_equal(read_ref_batch(tmp_path / "adm" / "samples.npz").images, arr)
    np.savez(tmp_path / "ref16.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(SystemExit, match="ref16.npz holds 16x16 images, the samples are 32x32"):
        sample_main(sample_args(gen_ckpt, tmp_path / "bad", "--ref-batch", f"{tmp_path}/ref16.npz"))


@pytest.mark.slow
def test_binary_tokenizer_bits_binary_diffusion_samples_through_the_real_clis(tmp_path, env):
    shards = env
    tok_ckpt = train_tokenizer(tmp_path, "tokenizer/binary.yaml", shards, bits=8)
    codes = tmp_path / "bits"
    meta = extract_splits(tok_ckpt, shards, codes)
    assert meta["code_space"]["kind"] == "bits" and meta["dtype"] == "int16"

    gen_ckpt = train_generator(
        tmp_path, "generator/binary_diffusion_cpu_small.yaml", tok_ckpt, codes, 2
    )
    assert load_generator(gen_ckpt).model.kind == "bits"
    out = tmp_path / "samples"
    results = sample(gen_ckpt, out, shards, "--steps", "16", "--temperature", "0.9")
    check_results(results, out, tok_ckpt)
    sampling = results["protocol"]["sampling"]
    assert (sampling["steps"], sampling["sampler"], sampling["temperature"]) == (
        16,
        "posterior",
        0.9,
    )
    with pytest.raises(SystemExit, match="heun applies to flow-matching"):
        sample_main(sample_args(gen_ckpt, tmp_path / "heun", "--sampler", "heun", "--fid", "off"))
