"""WeTok parity: the reference fixture converted through the CLI computes the reference's outputs,
and the paper-scale configs build WeTok's released models key for key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, run

import vistok
from vistok.common.configurable import instantiate
from vistok.convert.__main__ import main
from vistok.convert.common import fit_state
from vistok.convert.wetok import vistok_key

PARITY = ROOT.parent / "shared" / "parity"
RATIOS = ["compratio24", "compratio48", "compratio192", "compratio768"]
CONFIGS = {
    "compratio24": "wetok_ratio24.yaml",
    "compratio48": "wetok_ratio48.yaml",
    "compratio192": "wetok.yaml",
    "compratio768": "wetok_ratio768.yaml",
}


def fixture(name: str) -> Path:
    path = PARITY / "wetok" / name
    if not path.is_file():
        pytest.fail(
            f"parity fixture {path} is missing: the reference fixtures live in <repo root>/../"
            "shared/parity (clone the shared folder beside the repository)"
        )
    return path


def convert(tmp_path: Path, ckpt: Path, *extra: str):
    """The CLI's entry point in this process (the subprocess run is the parity test's)."""
    main(["wetok", str(ckpt), "--out", str(tmp_path / "out"), *extra])
    return vistok.load_tokenizer(str(tmp_path / "out"))


def refused(tmp_path: Path, ckpt: Path, capsys, *extra: str) -> str:
    """The CLI's error message for a refused checkpoint (an error exit, no traceback)."""
    with pytest.raises(SystemExit) as done:
        main(["wetok", str(ckpt), "--out", str(tmp_path / "out"), *extra])
    assert str(done.value).startswith("error: ")
    return str(done.value)


def test_converted_fixture_matches_reference(tmp_path):
    meta = json.loads(fixture("meta.json").read_text())
    case = torch.load(fixture("case.pt"), weights_only=True)
    ckpt = fixture(meta["checkpoint_file"])
    run(["-m", "vistok.convert", "wetok", str(ckpt), "--out", str(tmp_path), "--resolution", "64"])
    tok = vistok.load_tokenizer(str(tmp_path))
    images = case["images"]
    with torch.no_grad():
        z = tok.encoder(images)
        out = tok.quantizer(tok.proj_in(z))
        recon = tok.decode(out.quantized)
        codes = tok.tokenize(images)
        from_codes = tok.detokenize(codes)
    torch.testing.assert_close(z, case["encoder_output"], rtol=0, atol=1e-4)
    assert torch.equal(out.quantized, case["quantized"])  # signs, exactly +-1
    assert torch.equal(codes, case["codes"])  # (B, h, w, groups), bit i weighs 2**i
    torch.testing.assert_close(recon, case["reconstruction"], rtol=0, atol=1e-4)
    torch.testing.assert_close(from_codes, case["reconstruction"], rtol=0, atol=1e-4)
    assert tok.code_space.groups == meta["constructor"]["num_codebooks"]
    assert tok.code_space.vocab_size == meta["constructor"]["n_embed"]


def test_ema_weights_are_litema_shadows(tmp_path):
    """``--ema`` reads LitEma's buffers (parameter name without dots); loss.* is ignored."""
    ckpt = torch.load(fixture("wetok_tiny.ckpt"), weights_only=True)
    state = ckpt["state_dict"]
    shadows = {f"model_ema.{k.replace('.', '')}": v * 0.5 + 0.01 for k, v in state.items()}
    trained = {
        **state,
        **shadows,
        "model_ema.decay": torch.tensor(0.999),
        "model_ema.num_updates": torch.tensor(10, dtype=torch.int),
        "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
    }
    path = tmp_path / "trained.ckpt"
    torch.save({"state_dict": trained, "global_step": 10}, path)
    tok = convert(tmp_path, path, "--ema")
    got = tok.state_dict()
    assert torch.equal(got["decoder.levels.0.norm.to_scale.weight"],
                       shadows["model_ema.decoderadaptive4gammaweight"])  # fmt: skip
    assert torch.equal(got["encoder.levels.2.blocks.0.shortcut.weight"],
                       shadows["model_ema.encoderdown2block0nin_shortcutweight"])  # fmt: skip
    assert json.loads((tmp_path / "out" / "config.json").read_text())["weights"] == "ema"
    raw = convert(tmp_path / "raw", path)
    assert torch.equal(raw.state_dict()["encoder.conv_in.weight"], state["encoder.conv_in.weight"])


def _config_tokenizer(ratio: str) -> dict:
    """The tokenizer config the stacked YAML files give (wetok.yaml, then the ratio's file)."""
    tok: dict = {}
    for name in dict.fromkeys(["wetok.yaml", CONFIGS[ratio]]):
        cfg = yaml.safe_load((ROOT / "configs" / "tokenizer" / name).read_text())
        part = cfg["model"]["init_args"]["tokenizer"]
        tok = {**tok, **part, "init_args": {**tok.get("init_args", {}), **part["init_args"]}}
    return tok


@pytest.mark.parametrize("ratio", RATIOS)
def test_config_is_the_released_model(ratio):
    """A converted release of this ratio fills the config's model: no key missing or left over,
    every shape equal; and the parameter count is the release's."""
    official = json.loads(fixture("official_shapes.json").read_text())[ratio]
    with torch.device("meta"):
        tok = instantiate(_config_tokenizer(ratio))
        source = {k: torch.empty(s) for k, s in official.items()}
    levels = len(tok.encoder.levels)
    fit_state(tok, source, lambda k: vistok_key(k, levels), "wetok", ratio)  # raises on misfit
    assert sum(p.numel() for p in tok.parameters()) == sum(math.prod(s) for s in official.values())


def test_workflow_recipe_is_wetoks():
    cfg = yaml.safe_load((ROOT / "configs" / "tokenizer" / "wetok.yaml").read_text())
    args = cfg["model"]["init_args"]
    assert args["grad_clip"] is None and args["ema_decay"] == 0.999
    assert args["lr"] == 1e-4 and args["betas"] == [0.5, 0.9]
    loss = args["loss"]["init_args"]
    assert (loss["reconstruction"], loss["gan_weight"], loss["lecam_weight"]) == ("l1", 0.1, 0.05)


def test_truncated_checkpoint_is_refused(tmp_path, capsys):
    data = fixture("wetok_tiny.ckpt").read_bytes()
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    err = refused(tmp_path, bad, capsys)
    assert "truncated or corrupt" in err and "download it again" in err


def test_other_format_is_refused(tmp_path, capsys):
    vq = PARITY / "llamagen_vq" / "vq_tiny.pt"
    if not vq.is_file():
        pytest.fail(f"parity fixture {vq} is missing")
    err = refused(tmp_path, vq, capsys)
    assert "no 'state_dict': not a WeTok Lightning checkpoint" in err
    # A Lightning-shaped file whose tensors are not WeTok's is refused naming the first misfit.
    state = torch.load(fixture("wetok_tiny.ckpt"), weights_only=True)["state_dict"]
    state["decoder.up.1.block.0.conv1.weight"] = torch.zeros(32, 64, 1, 1)
    torch.save({"state_dict": state}, tmp_path / "odd.ckpt")
    err = refused(tmp_path, tmp_path / "odd.ckpt", capsys)
    assert "'decoder.up.1.block.0.conv1.weight' has shape (32, 64, 1, 1)" in err
    assert not (tmp_path / "out").exists()  # nothing written for a refused checkpoint


def test_ema_refused_without_ema_weights(tmp_path, capsys):
    assert "convert without --ema" in refused(tmp_path, fixture("wetok_tiny.ckpt"), capsys, "--ema")
