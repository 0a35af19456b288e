"""MAETok end to end through the real CLIs: mask-modeling training -> decoder fine-tuning (stage 2,
encoder bit-identical) -> export without the auxiliary decoders -> latents -> DiT -> sample.py ->
gFID in results.json."""

from __future__ import annotations

import pytest
import torch
from helpers import class_shards
from safetensors.torch import load_file
from test_diffusion_cli import (
    check_results,
    extract_splits,
    sample,
    train_generator,
    train_tokenizer,
)

from vistok.common.checkpoints import read_checkpoint, submodule_state
from vistok.generators.export import export
from vistok.tokenizers.checkpoint import SOURCE_KEY, code_hash, read_tokenizer

# A tiny MAETok at 32 px: 4x4 patches of 8 px, 16 latent tokens of 4 channels.
TINY_MAETOK = dict(
    resolution=32, patch_size=8, num_latents=16, code_dim=4, channels=16, num_res_blocks=1
)


@pytest.fixture
def env(tmp_path, monkeypatch):
    return class_shards(tmp_path, monkeypatch, per_class=8)


def train_maetok(tmp_path, shards: str, config: str, name: str, steps: int, *cli: str) -> str:
    no_lpips = "--model.init_args.loss.init_args.perceptual_weight=0"
    return train_tokenizer(
        tmp_path, config, shards, no_lpips, *cli, name=name, steps=steps, nets=TINY_MAETOK
    )


@pytest.mark.slow
def test_maetok_two_stages_latents_dit_samples_through_the_real_clis(tmp_path, env):
    shards = env
    stage1 = train_maetok(
        tmp_path,
        shards,
        "tokenizer/maetok.yaml",
        "stage1",
        6,
        "--model.init_args.mask_modeling.init_args.depth=1",
    )
    state1 = read_checkpoint(stage1)["state_dict"]
    aux = submodule_state(state1, "mask_modeling")
    assert aux and any(k.startswith("decoders.0.") for k in aux)  # the HOG decoder trained
    assert "tokenizer.encoder.mask_token" in state1

    # Exported: exactly the tokenizer's tensors, none of the auxiliary decoders'.
    folder = export(stage1, str(tmp_path / "exported"), ema=True)
    exported = load_file(str(folder / "model.safetensors"))
    assert set(exported) == set(submodule_state(state1, "tokenizer"))
    assert not any(k.startswith(("mask_modeling", "decoders")) for k in exported)

    # Stage 2: masking off, encoder frozen; it starts from stage 1's EMA weights.
    stage2 = train_maetok(
        tmp_path,
        shards,
        "tokenizer/maetok_decoder.yaml",
        "stage2",
        4,
        f"--model.init_from={stage1}",
    )
    ckpt2 = read_checkpoint(stage2)
    assert ckpt2["hyper_parameters"]["stage"] == "decoder_finetune"
    assert not submodule_state(ckpt2["state_dict"], "mask_modeling")
    before = read_tokenizer(stage1, ema=True).tokenizer.state_dict()
    after = submodule_state(ckpt2["state_dict"], "tokenizer")
    for name in before:
        if name.startswith(("encoder.", "proj_in.", "quantizer.")):
            assert torch.equal(before[name], after[name]), name  # bit-identical
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("decoder.")), (
        "the decoder did not train in stage 2"
    )
    fine = read_tokenizer(stage2, ema=True).tokenizer
    assert ckpt2[SOURCE_KEY]["code_hash"] == code_hash(fine)

    # The fine-tuned tokenizer's latents -> DiT -> samples -> gFID.
    codes = tmp_path / "latents"
    meta = extract_splits(stage2, shards, codes)
    assert meta["code_space"]["kind"] == "continuous" and meta["code_space"]["channels"] == 4
    assert meta["token_shape"] == [16]
    gen_ckpt = train_generator(tmp_path, "generator/dit_cpu_small.yaml", stage2, codes, 4)
    out = tmp_path / "samples"
    results = sample(gen_ckpt, out, shards, "--steps", "4")
    check_results(results, out, stage2)
