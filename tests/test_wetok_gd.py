"""WeTok stage 2: the generative decoder starts from stage 1 and trains with the encoder frozen."""

import pytest
import torch
from helpers import TINY

from vistok.common.checkpoints import read_checkpoint
from vistok.common.cli import VistokCLI

BASE = [
    "--config",
    "tokenizer/wetok.yaml",
    "--config",
    "presets/cpu_small.yaml",
    *TINY,
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.enable_progress_bar=false",
]


@pytest.mark.slow
def test_generative_decoder_stage_starts_from_stage_one(tmp_path):
    stage1 = VistokCLI([*BASE, "--run_dir", str(tmp_path / "s1")])
    stage1.trainer.fit(stage1.model, datamodule=stage1.datamodule)
    ckpt = tmp_path / "s1" / "checkpoints" / "last.ckpt"

    gd = VistokCLI(
        [
            *BASE,
            "--config",
            "tokenizer/wetok_gd.yaml",
            f"--model.init_from={ckpt}",
            "--run_dir",
            str(tmp_path / "s2"),
        ]
    )
    tok, ref = gd.model.tokenizer.eval(), stage1.model.tokenizer.eval()
    assert tok.decoder.noise_channels > 0
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        # Zero-initialised noise inputs: at the start the GD decoder is the stage-1 decoder (up
        # to float summation order: the first conv has more, all-zero, input channels).
        g = torch.Generator().manual_seed(0)
        torch.testing.assert_close(tok(images, generator=g)[0], ref(images)[0], rtol=0, atol=1e-5)
    frozen = {
        k: v.clone()
        for k, v in tok.state_dict().items()
        if k.startswith(("encoder.", "proj_in.", "quantizer."))
    }
    decoder = {k: v.clone() for k, v in tok.state_dict().items() if k.startswith("decoder.")}

    gd.trainer.fit(gd.model, datamodule=gd.datamodule)
    after = read_checkpoint(tmp_path / "s2" / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(after[f"tokenizer.{k}"], v) for k, v in frozen.items())
    assert any(not torch.equal(after[f"tokenizer.{k}"], v) for k, v in decoder.items())
    # Noise is seedable: same generator, same image; another seed, another image.
    tok = gd.model.tokenizer.eval()
    codes = tok.encode(images)
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (1, 1, 2))
    assert torch.equal(tok.detokenize(codes, g1), tok.detokenize(codes, g2))
    assert not torch.equal(tok.detokenize(codes, g1), tok.detokenize(codes, g3))


def test_stage_two_refuses_a_checkpoint_of_another_family(tmp_path):
    vq = VistokCLI(["--config", "tokenizer/vq.yaml", *BASE[2:], "--run_dir", str(tmp_path / "vq")])
    torch.save(
        {"hyper_parameters": {"tokenizer": vq.model.tokenizer.config}, "state_dict": {}},
        tmp_path / "vq.ckpt",
    )
    with pytest.raises(ValueError, match="VQTokenizer"):
        VistokCLI(
            [
                *BASE,
                "--config",
                "tokenizer/wetok_gd.yaml",
                f"--model.init_from={tmp_path / 'vq.ckpt'}",
                "--run_dir",
                str(tmp_path / "s2"),
            ]
        )
