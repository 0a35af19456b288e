"""The tokenizer benchmark: two families under one protocol, through the real CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import run
from PIL import Image
from test_pfid import _write_split

from vistok import load_tokenizer
from vistok.common.hub import save_pretrained
from vistok.data.datamodule import ImageDataModule
from vistok.evaluation.benchmark import provenance
from vistok.tokenizers.gaussian import KLTokenizer
from vistok.tokenizers.vq import VQTokenizer

SMALL = dict(channels=16, num_res_blocks=1, num_mid_blocks=1, resolution=32)


def test_benchmark_two_families_and_a_broken_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.manual_seed(0)
    folders = {}
    for name, cls in (("vq", VQTokenizer), ("kl", KLTokenizer)):
        tok = cls(**SMALL).eval()
        trained = {"global_step": 123, "weights": "ema"} if name == "vq" else {}
        folders[name] = save_pretrained(
            tok, tmp_path / name, "tokenizer", {"info": tok.describe(), **trained}
        )
    shards = _write_split(tmp_path / "shards", 8)
    out = tmp_path / "bench"
    missing = str(tmp_path / "nowhere")
    proc = run(
        ["-m", "vistok.evaluation.benchmark", "--tokenizers", str(folders["vq"]), missing,
         str(folders["kl"]), "--data", shards, "--num-images", "8", "--batch-size", "4",
         "--num-workers", "0", "--fid-feature", "64", "--pfid-strengths", "0.5", "1.0",
         "--timing-batches", "1", "--out", str(out), "--stats-dir", str(tmp_path / "stats")]
    )  # fmt: skip
    results = json.loads((out / "benchmark.json").read_text())
    rows = {r["name"]: r for r in results["results"]}
    assert sorted(rows) == ["kl", "vq"]
    (failure,) = results["failed"]
    assert failure["tokenizer"] == missing and "nowhere" in failure["error"]

    vq, kl = rows["vq"], rows["kl"]
    space = load_tokenizer(str(folders["vq"])).code_space
    assert vq["tokens"] == 4 and vq["bits_per_token"] == math.log2(space.vocab_size)
    assert vq["compression_ratio"] == pytest.approx(24 * 32 * 32 / (4 * vq["bits_per_token"]))
    assert list(vq["pfid_curve"]) == ["0", "0.5", "1"] and vq["pfid_curve"]["0"] == vq["rfid"]
    assert vq["pfid"] == vq["pfid_curve"]["0.5"] and 0 < vq["codebook_usage"] <= 1
    assert kl["pfid"] is None and kl["pfid_curve"] is None and "n/a" in kl["pfid_note"]
    assert kl["bits_per_token"] is None and kl["dimension_ratio"] > 1
    # The protocol names the folder's own training step and weights, not the evaluation's.
    assert (vq["protocol"]["evaluated_at_step"], vq["protocol"]["weights"]) == (123, "ema")
    assert (kl["protocol"]["evaluated_at_step"], kl["protocol"]["weights"]) == (None, None)
    for row in (vq, kl):
        assert row["protocol"]["images"] == 8 and row["rfid"] > 0 and 0 <= row["lpips"] < 1
        assert row["encode_images_per_s"] > 0 and row["decode_images_per_s"] > 0
        assert row["parameters"] == sum(
            p.numel() for p in load_tokenizer(row["tokenizer"]).parameters()
        )

    # PSNR is the mean per-image PSNR of the same reconstructions, computed here independently.
    data = ImageDataModule(val_shards=shards, resolution=32, val_batch_size=8, num_workers=0)
    images = next(iter(data.val_dataloader(rank=0, world_size=1)))["image"]
    with torch.no_grad():
        recon = load_tokenizer(str(folders["vq"]))(images)[0].clamp(-1, 1)
    mse = (recon - images).square().flatten(1).mean(1)
    assert vq["psnr"] == pytest.approx(float((10 * torch.log10(4 / mse)).mean()), rel=1e-4)

    table = (out / "benchmark.md").read_text()
    assert table.strip() in proc.stdout
    best = min((vq, kl), key=lambda r: r["rfid"])
    plots = ", ".join(str(out / p) for p in results["plots"])
    assert proc.stdout.strip().splitlines()[-1] == (
        f"benchmark: 2 of 3 tokenizer(s) evaluated; best rFID {best['rfid']:.3f} ({best['name']})."
        f" Wrote: table {out / 'benchmark.md'}, results {out / 'benchmark.json'}, plots {plots}."
    )
    assert "| vq | VQTokenizer |" in table and "| nowhere | failed: " in table
    for png in results["plots"]:
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_provenance_of_a_run_checkpoint(tmp_path):
    state = {"tokenizer.w": torch.zeros(2)}
    for ema, name in ((False, "raw"), (True, "ema")):
        path = tmp_path / f"{name}.ckpt"
        averages = {"ema.w": torch.ones(2)} if ema else {}
        torch.save({"global_step": 40, "state_dict": {**state, **averages}}, path)
        assert provenance(str(path)) == {"evaluated_at_step": 40, "weights": name}
