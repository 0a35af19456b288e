"""Decoder post-training (RobusTok): the post_train stage, the source-tokenizer check, and the CPU
pipeline through the real CLIs (pairs -> post-training -> gFID before and after)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import run
from test_ar_cli import image_shards, save_generator, save_tokenizer

from vistok.common.checkpoints import file_sha256, read_checkpoint, submodule_state
from vistok.generators.checkpoint import load_generator
from vistok.generators.export import export
from vistok.losses.tokenizer_loss import TokenizerLoss
from vistok.tokenizers.checkpoint import (
    CODE_PARTS,
    CodeDrift,
    TokenizerMismatch,
    code_hash,
    load_tokenizer_from_checkpoint,
    resolve_tokenizer,
)
from vistok.tokenizers.perturbation import LatentPerturbation
from vistok.tokenizers.training import TokenizerModule

CODE_PREFIXES = tuple(f"{p}." for p in CODE_PARTS)


pytestmark = pytest.mark.usefixtures("one_thread")


def post_module(tok_ckpt) -> TokenizerModule:
    loss = TokenizerLoss(reconstruction="l2", perceptual_weight=0.0)
    return TokenizerModule(loss=loss, stage="post_train", init_from=str(tok_ckpt))


def save_post_trained(module: TokenizerModule, path) -> str:
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return str(path)


def test_post_train_stage_starts_from_the_ema_weights_with_code_parts_frozen(tmp_path):
    save_tokenizer(tmp_path / "tok.ckpt")
    module = post_module(tmp_path / "tok.ckpt")  # the tokenizer is named by checkpoint only
    source = load_tokenizer_from_checkpoint(tmp_path / "tok.ckpt")  # EMA weights
    for (name, p), q in zip(module.tokenizer.state_dict().items(), source.state_dict().values()):
        assert torch.equal(p, q), name
    for name, p in module.tokenizer.named_parameters():
        assert p.requires_grad == (not name.startswith(CODE_PREFIXES)), name
    assert module.source["sha256"] == file_sha256(tmp_path / "tok.ckpt")
    assert module.source["ema"] and module.source["code_hash"] == code_hash(source)

    # Resuming checks the checkpoint post-trains the same source (wherever its file now lives).
    found = {"hyper_parameters": {"tokenizer": module.tokenizer.config}}
    module.on_load_checkpoint({**found, "source_tokenizer": {**module.source, "path": "/moved"}})
    with pytest.raises(ValueError, match="post-trains tokenizer"):
        module.on_load_checkpoint({**found, "source_tokenizer": {**module.source, "sha256": "0"}})

    with torch.no_grad():
        module.tokenizer.quantizer.codebook.add_(1e-3)  # the codebook drifts
    with pytest.raises(CodeDrift, match="changed during post-training"):
        module.on_save_checkpoint({})
    with pytest.raises(ValueError, match="no perturbation"):
        TokenizerModule(
            loss=TokenizerLoss(perceptual_weight=0.0),
            stage="post_train",
            init_from=str(tmp_path / "tok.ckpt"),
            perturbation=LatentPerturbation(),
        )
    with pytest.raises(ValueError, match="no tokenizer given"):
        TokenizerModule(loss=TokenizerLoss(perceptual_weight=0.0))


def test_a_post_trained_tokenizer_is_accepted_for_its_generator_and_a_drifted_one_is_not(
    tmp_path,
):
    save_tokenizer(tmp_path / "tok.ckpt", seed=0)
    save_tokenizer(tmp_path / "other.ckpt", seed=1)
    _, gen = save_generator(tmp_path, tmp_path / "tok.ckpt", ema=False)
    recorded = load_generator(gen).hparams["tokenizer_identity"]

    module = post_module(tmp_path / "tok.ckpt")
    with torch.no_grad():
        for p in module.tokenizer.decoder.parameters():
            p.add_(0.01)  # what post-training changes
    post = save_post_trained(module, tmp_path / "post.ckpt")
    tok = resolve_tokenizer(recorded, post)
    assert torch.equal(
        tok.tokenizer.decoder.conv_out.weight, module.tokenizer.decoder.conv_out.weight
    )
    assert tok.identity["sha256"] == file_sha256(post)

    folder = export(post, str(tmp_path / "exported"), ema=False)  # the export keeps the lineage
    assert json.loads((folder / "config.json").read_text())["source_tokenizer"] == module.source
    resolve_tokenizer(recorded, str(folder))

    # Post-training of a post-trained tokenizer names the original source.
    again = post_module(post)
    assert again.source == module.source

    state = read_checkpoint(post)
    state["state_dict"]["tokenizer.encoder.conv_in.weight"] += 1e-3
    torch.save(state, tmp_path / "drifted.ckpt")
    with pytest.raises(TokenizerMismatch, match="changed during post-training"):
        resolve_tokenizer(recorded, str(tmp_path / "drifted.ckpt"))
    with pytest.raises(TokenizerMismatch):
        resolve_tokenizer(recorded, str(tmp_path / "other.ckpt"))


@pytest.mark.slow
def test_pairs_post_training_and_gfid_before_and_after_through_the_real_clis(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("VISTOK_CACHE", str(tmp_path / "cache"))
    from vistok.evaluation.inception import fid_weights_path

    monkeypatch.setenv("VISTOK_FID_WEIGHTS", fid_weights_path())
    shards = image_shards(tmp_path, 16)  # real photo crops, 4 shards, classes 0..2

    # 1. A tiny VQ tokenizer and a tiny GPT over its codes (their own CLIs are tested in
    # test_ar_cli.py; here they are written directly in their training modules' layout).
    tok_ckpt = str(tmp_path / "tok.ckpt")
    save_tokenizer(tok_ckpt)
    _, gen_ckpt = save_generator(tmp_path, tok_ckpt, ema=True)

    # 2. Pairs, as the user runs it.
    pairs = tmp_path / "pairs"
    run(
        ["-m", "vistok.data.make_posttrain_pairs", "--generator", gen_ckpt, "--tokenizer"]
        + [tok_ckpt, "--shards", shards, "--preservation", "0.7", "--cfg", "6.0", "--out"]
        + [str(pairs), "--batch-size", "8"]
    )
    meta = json.loads((pairs / "meta.json").read_text())
    assert meta["splits"]["train"]["count"] == 16
    assert abs(meta["splits"]["train"]["kept_fraction"] - 0.7) < 0.1

    # 3. Post-training, as the user runs it (shrunk for a CPU).
    post_run = tmp_path / "post"
    run(
        ["train.py", "--config", "posttrain/robustok.yaml", "--model.init_from", tok_ckpt]
        + ["--data.pairs", str(pairs), "--trainer.accelerator=cpu", "--trainer.devices=1"]
        + ["--trainer.precision=32-true", "--trainer.max_steps=3", "--trainer.val_check_interval=3"]
        + ["--trainer.limit_val_batches=1", "--data.batch_size=4", "--data.num_workers=0"]
        + ["--model.lr=1e-3", "--model.loss.init_args.discriminator.init_args.ndf=8"]
        + ["--model.loss.init_args.perceptual_weight=0.1", f"--run_dir={post_run}"]
    )
    post_ckpt = str(post_run / "checkpoints" / "last.ckpt")
    source = load_tokenizer_from_checkpoint(tok_ckpt).state_dict()  # EMA: what made the codes
    after = submodule_state(read_checkpoint(post_ckpt)["state_dict"], "tokenizer")
    frozen = [k for k in source if k.startswith(CODE_PREFIXES)]
    assert any(k.startswith("quantizer.codebook") for k in frozen)
    assert all(torch.equal(after[k], source[k]) for k in frozen)  # bit-identical
    decoder = [k for k in source if k.startswith("decoder.")]
    assert any(not torch.equal(after[k], source[k]) for k in decoder)
    assert read_checkpoint(post_ckpt)["source_tokenizer"]["sha256"] == file_sha256(tok_ckpt)
    history = json.loads((post_run / "results.json").read_text())
    assert "val/generated_psnr" in history[-1]["metrics"]

    # 4. gFID before and after with the same generator, seeds and protocol.
    out = tmp_path / "eval"
    run(
        ["-m", "vistok.evaluation.posttrain", "--generator", gen_ckpt, "--after", post_ckpt]
        + ["--pairs", str(pairs), "--out", str(out), "--num-images", "6", "--batch-size", "3"]
        + ["--cfg", "2.0", "--seed", "1", "--ref-shards", shards]
    )
    results = json.loads((out / "results.json").read_text())
    assert math.isfinite(results["gfid_before"]) and math.isfinite(results["gfid_after"])
    assert results["tokenizer_before"]["sha256"] == file_sha256(tok_ckpt)
    assert results["tokenizer_after"]["sha256"] == file_sha256(post_ckpt)
    assert results["protocol"]["num_images"] == 6 and results["protocol"]["seed"] == 1
    assert results["protocol"]["fid"]["reference_count"] == 16
    assert (out / "side_by_side.png").is_file() and (out / "samples_before_after.png").is_file()
    assert results["pairs"]["images"] == 16
    assert all(math.isfinite(v) for k, v in results["pairs"].items() if k.startswith("psnr_"))
    print(f"gFID before {results['gfid_before']:.2f}, after {results['gfid_after']:.2f}")


def test_before_after_comparison_refuses_runs_that_differ_beyond_the_tokenizer():
    from vistok.evaluation.posttrain import compare

    before = {
        "gfid": 10.0,
        "protocol": {"seed": 0, "tokenizer": {"sha256": "a"}, "fid": {"reference_cached": False}},
    }
    after = json.loads(json.dumps(before))
    after["gfid"], after["protocol"]["tokenizer"] = 8.5, {"sha256": "b"}
    after["protocol"]["fid"]["reference_cached"] = True  # the second run reuses the statistics
    result = compare(before, after)
    assert result["gfid_change"] == -1.5 and "tokenizer" not in result["protocol"]
    assert result["tokenizer_after"] == {"sha256": "b"}
    after["protocol"]["seed"] = 1
    with pytest.raises(ValueError, match="seed"):
        compare(before, after)
