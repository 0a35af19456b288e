"""LlamaGen parity: its VQ tokenizer and c2i GPT, converted with ``python -m vistok.convert`` and
loaded through the public API, compute LlamaGen's functions (fixtures made by LlamaGen's own code
in ``<repo>/../shared/parity``); the paper-scale configs are LlamaGen's models; a converted pair
runs through extract_codes, sample.py and post-training pairs; bad checkpoints are refused with
a way out."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import ROOT, photo_crops, run

import vistok
from vistok.common.checkpoints import file_sha256
from vistok.common.configurable import instantiate
from vistok.convert.__main__ import main as convert_main
from vistok.convert.common import ConversionError, rename
from vistok.convert.llamagen import (
    GPT_IGNORED,
    GPT_RULES,
    VQ_FRESH,
    convert_gpt,
    convert_vq,
    map_vq_state,
    vq_architecture,
)
from vistok.data.make_shards import shard_pattern, write_shards
from vistok.generators.ar import GPT
from vistok.generators.posttrain_pairs import main as make_pairs
from vistok.generators.sampling import SamplingConfig, generate
from vistok.tokenizers.extract_codes import main as extract_codes

PARITY = ROOT.parent / "shared" / "parity"
TOL = 1e-4  # absolute, fp32

pytestmark = pytest.mark.usefixtures("one_thread")


def fixture(name: str) -> Path:
    folder = PARITY / name
    if not (folder / "case.pt").is_file():
        pytest.fail(
            f"parity fixtures not found at {folder}: clone the shared fixtures next to the repo "
            "(<repo>/../shared/parity, as in CI)"
        )
    return folder


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def convert(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The real CLI, in a subprocess."""
    if check:
        return run(["-m", "vistok.convert", *args])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "vistok.convert", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """The VQ at the fixture's 128 px (8 x 8 tokens, the GPT's grid) and the GPT on top of it."""
    out = tmp_path_factory.mktemp("converted")
    vq = fixture("llamagen_vq")
    gpt = fixture("llamagen_gpt")
    meta = json.loads((vq / "meta.json").read_text())
    vq_args = [str(vq / meta["checkpoint_file"]), "--resolution", "128"]
    convert("llamagen-vq", *vq_args, "--out", str(out / "vq"))
    ckpt = gpt / json.loads((gpt / "meta.json").read_text())["checkpoint_file"]
    convert("llamagen-gpt", str(ckpt), "--tokenizer", str(out / "vq"), "--out", str(out / "gpt"))
    return {"vq": out / "vq", "gpt": out / "gpt"}


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Parity


def test_vq_codes_latents_and_reconstructions_match_llamagen(converted):
    case = load(fixture("llamagen_vq") / "case.pt")
    tok = vistok.load_tokenizer(str(converted["vq"]))
    with torch.no_grad():
        out = tok.quantize(case["images"])
        recon = tok.decode(out.quantized)
        from_codes = tok.detokenize(case["codes"])
    assert torch.equal(out.codes, case["codes"])
    assert torch.equal(tok.encode(case["images"]), case["codes"])
    errors = {
        "quantized": max_abs(out.quantized, case["quantized"]),
        "reconstruction": max_abs(recon, case["reconstruction"]),
        "reconstruction_from_codes": max_abs(from_codes, case["reconstruction_from_codes"]),
    }
    print("llamagen-vq max abs errors:", errors)
    assert all(e <= TOL for e in errors.values()), errors


def test_gpt_logits_and_greedy_samples_match_llamagen(converted):
    case = load(fixture("llamagen_gpt") / "case.pt")
    gpt, tok = vistok.load_generator(str(converted["gpt"]))
    assert gpt.token_shape == tuple(case["codes"].shape[1:]) == tuple(tok.token_shape)
    labels = case["labels"]
    with torch.no_grad():
        logits = gpt(case["codes"], labels)[:, :, 0]  # (B, N, V): position i predicts code i
        null = gpt(case["codes"], torch.full_like(labels, gpt.null_class))[:, :, 0]
    errors = {
        "logits": max_abs(logits, case["logits"]),
        "null_class_logits": max_abs(null, case["null_class_logits"]),
    }
    print("llamagen-gpt max abs errors:", errors)
    assert all(e <= TOL for e in errors.values()), errors
    for key, scale in (("greedy_codes", 1.0), ("greedy_codes_cfg4", 4.0)):
        codes = generate(gpt, labels, SamplingConfig(cfg_scale=scale, top_k=1))
        assert torch.equal(codes, case[key].long()), key
        # The cache-free path is the same function.
        again = generate(gpt, labels, SamplingConfig(cfg_scale=scale, top_k=1), use_cache=False)
        assert torch.equal(again, codes), key


def test_converted_folders_are_ordinary_exports(converted):
    vq_cfg = json.loads((converted["vq"] / "config.json").read_text())
    ckpt = fixture("llamagen_vq") / "vq_tiny.pt"
    assert vq_cfg["kind"] == "tokenizer" and vq_cfg["source_sha256"] == file_sha256(ckpt)
    assert "VQTokenizer" in (converted["vq"] / "README.md").read_text()
    gen_cfg = json.loads((converted["gpt"] / "config.json").read_text())
    assert gen_cfg["tokenizer_identity"]["sha256"] == file_sha256(ckpt)
    assert gen_cfg["model"]["init_args"]["class_rope"] == "zero"
    assert (converted["gpt"] / "tokenizer" / "model.safetensors").is_file()
    assert "sample.py --generator" in (converted["gpt"] / "README.md").read_text()


# ---------------------------------------------------------------------------------------------
# Paper-scale configs are LlamaGen's models


def _config(name: str) -> dict:
    """A generator/tokenizer YAML with its ``# base:`` file underneath (as the CLI stacks it)."""
    text = (ROOT / "configs" / name).read_text()
    cfg = yaml.safe_load(text)
    if text.startswith("# base: "):
        base = _config(text.split("\n", 1)[0][len("# base: ") :].strip())
        base["model"]["init_args"].update(cfg["model"]["init_args"])
        return base
    return cfg


def _meta_state(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_vq_config_is_llamagen_vq16_and_its_recipe():
    official = json.loads((fixture("llamagen_vq") / "official_shapes.json").read_text())
    cfg = _config("tokenizer/vq.yaml")["model"]["init_args"]
    with torch.device("meta"):
        tok = instantiate(cfg["tokenizer"])
    state = _meta_state(official["VQ-16"])
    mapped, _ = map_vq_state(state, "VQ-16")
    own = {k: tuple(v.shape) for k, v in tok.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {
        k: s for k, s in own.items() if not k.endswith(VQ_FRESH)
    }
    params = sum(math.prod(s) for k, s in official["VQ-16"].items() if "codebook_used" not in k)
    assert _count(tok) == params == 71_883_403
    # The architecture read from the released shapes is the preset's.
    arch = vq_architecture(state, "VQ-16")
    preset = cfg["tokenizer"]["init_args"]["preset"]
    from vistok.tokenizers.vq import VQ_PRESETS

    assert {k: VQ_PRESETS[preset].get(k, v) for k, v in arch.items()} == arch
    loss = cfg["loss"]["init_args"]
    assert loss["reconstruction"] == "l2" and loss["gan_weight"] == 0.5
    assert not loss["adaptive_gan_weight"] and loss["disc_start"] == 20000
    assert cfg["lr"] == 1e-4 and cfg["betas"] == [0.9, 0.95] and cfg["grad_clip"] == 1.0


@pytest.mark.parametrize(
    "config, name, count",
    [
        ("generator/ar.yaml", "GPT-B", 110_888_448),
        ("generator/ar_L.yaml", "GPT-L", 342_910_976),
        ("generator/ar_XL.yaml", "GPT-XL", 774_699_520),
    ],
)
def test_gpt_configs_are_llamagen_gpts(config, name, count):
    official = json.loads((fixture("llamagen_gpt") / "official_shapes.json").read_text())[name]
    init = _config(config)["model"]["init_args"]
    space = {"kind": "index", "channels": 8, "vocab_size": 16384}
    with torch.device("meta"):
        gpt = GPT(space, [16, 16], init["num_classes"], init["preset"], **init["gpt"])
    mapped, _ = rename(_meta_state(official), GPT_RULES, GPT_IGNORED, name, "llamagen-gpt")
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {
        k: tuple(v.shape) for k, v in gpt.state_dict().items()
    }
    assert _count(gpt) == count == sum(math.prod(s) for s in official.values())
    assert init["gpt"] == {
        "dropout": 0.1,
        "attn_dropout": 0.0,
        "token_dropout": 0.1,
        "label_dropout": 0.1,
        "class_rope": "zero",
    }
    assert init["lr"] == 1e-4 and init["weight_decay"] == 0.05 and init["betas"] == [0.9, 0.95]


# ---------------------------------------------------------------------------------------------
# End to end: extract codes and sample with the converted pair


def test_converted_pair_extracts_codes_and_samples(converted, tmp_path):
    crops = photo_crops(tmp_path / "photos", 4, size=128)
    samples = (
        {"__key__": f"img{i}", "png": p.read_bytes(), "cls": i % 2} for i, p in enumerate(crops)
    )
    shards = shard_pattern(write_shards(samples, tmp_path / "shards", "img", shard_size=4))
    vq_ckpt = fixture("llamagen_vq") / "vq_tiny.pt"

    codes = tmp_path / "codes"
    extract = ["--tokenizer", str(converted["vq"]), "--out", str(codes), "--shards", shards]
    extract_codes([*extract, "--num-workers", "0"])
    meta = json.loads((codes / "meta.json").read_text())
    assert meta["tokenizer"]["sha256"] == file_sha256(vq_ckpt)
    assert meta["token_shape"] == [8, 8] and meta["splits"]["train"]["count"] == 4

    out = tmp_path / "samples"
    sample = ["sample.py", "--generator", str(converted["gpt"]), "--num-images", "2"]
    run([*sample, "--cfg", "4.0", "--top-k", "1", "--fid", "off", "--out", str(out)])
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (2, 128, 128, 3) and arr.dtype == np.uint8
    protocol = json.loads((out / "results.json").read_text())["protocol"]
    assert protocol["tokenizer"]["sha256"] == file_sha256(vq_ckpt)
    # Greedy decoding with CFG 4 for classes 0, 1: the images decode LlamaGen's own samples.
    gpt, tok = vistok.load_generator(str(converted["gpt"]))
    labels = torch.tensor([0, 1])
    codes_ref = generate(gpt, labels, SamplingConfig(cfg_scale=4.0, top_k=1))
    expected = ((tok.detokenize(codes_ref).clamp(-1, 1) + 1) * 127.5).round()
    got = torch.from_numpy(arr).permute(0, 3, 1, 2).float()
    assert (got - expected).abs().max() <= 1

    # Post-training pairs from the converted pair, with RobusTok's default guidance.
    pairs = ["--generator", str(converted["gpt"]), "--shards", shards, "--out", str(tmp_path / "p")]
    meta = make_pairs(pairs)
    assert meta["splits"]["train"]["count"] == 4
    assert meta["tokenizer"]["sha256"] == file_sha256(vq_ckpt)
    assert meta["protocol"]["sampling"]["cfg_schedule"] == "pow-cosine"


# ---------------------------------------------------------------------------------------------
# Bad input


def refused(*args: str) -> str:
    """The CLI's error message (in-process; the subprocess path is checked once below)."""
    with pytest.raises(SystemExit) as done:
        convert_main(list(args))
    assert str(done.value).startswith("error: ")
    return str(done.value)


def test_truncated_checkpoint_is_refused(tmp_path):
    data = (fixture("llamagen_vq") / "vq_tiny.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    message = refused("llamagen-vq", str(tmp_path / "cut.pt"), "--out", str(tmp_path / "o"))
    assert "truncated" in message and "Download it again" in message
    assert not (tmp_path / "o").exists()


def test_checkpoint_of_another_format_is_refused(tmp_path):
    wetok = fixture("wetok") / "wetok_tiny.ckpt"
    proc = convert("llamagen-vq", str(wetok), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode != 0
    assert "not a llamagen-vq checkpoint" in proc.stderr and "format wetok" in proc.stderr
    gpt = fixture("llamagen_gpt") / "gpt_tiny.pt"
    message = refused("llamagen-vq", str(gpt), "--out", str(tmp_path / "o"))
    assert "has no encoder.conv_in.weight" in message and "Choose the format" in message


def test_gpt_whose_vocabulary_differs_from_the_tokenizer_is_refused(converted, tmp_path):
    state = load(fixture("llamagen_vq") / "vq_tiny.pt")["model"]
    state["quantize.embedding.weight"] = state["quantize.embedding.weight"][:512].clone()
    torch.save({"model": state}, tmp_path / "vq512.pt")
    convert_vq(str(tmp_path / "vq512.pt"), str(tmp_path / "vq512"), resolution=128)
    gpt = fixture("llamagen_gpt") / "gpt_tiny.pt"
    args = ["llamagen-gpt", str(gpt), "--tokenizer", str(tmp_path / "vq512")]
    message = refused(*args, "--out", str(tmp_path / "o"))
    assert "predicts 1024 codes" in message and "512" in message
    assert "same codebook size" in message
    with pytest.raises(ConversionError, match="needs --tokenizer"):
        convert_gpt(str(gpt), str(tmp_path / "o2"))


def test_unknown_keys_and_shapes_are_named(tmp_path):
    state = load(fixture("llamagen_vq") / "vq_tiny.pt")["model"]
    extra = {**state, "encoder.extra.weight": torch.zeros(3)}
    torch.save({"model": extra}, tmp_path / "extra.pt")
    with pytest.raises(ConversionError, match=r"encoder\.extra\.weight \(3,\) fits no supported"):
        convert_vq(str(tmp_path / "extra.pt"), str(tmp_path / "o"))
    wrong = dict(state)
    wrong["decoder.conv_out.weight"] = torch.zeros(3, 16, 3, 3)
    torch.save({"model": wrong}, tmp_path / "wrong.pt")
    with pytest.raises(
        ConversionError, match=r"decoder\.conv_out\.weight has shape \(3, 16, 3, 3\)"
    ):
        convert_vq(str(tmp_path / "wrong.pt"), str(tmp_path / "o"))
    missing = {k: v for k, v in state.items() if k != "post_quant_conv.bias"}
    torch.save({"model": missing}, tmp_path / "missing.pt")
    with pytest.raises(ConversionError, match=r"no weights for proj_out\.bias"):
        convert_vq(str(tmp_path / "missing.pt"), str(tmp_path / "o"))
    ckpt = fixture("llamagen_vq") / "vq_tiny.pt"
    with pytest.raises(ConversionError, match="has no 'ema' weights"):
        convert_vq(str(ckpt), str(tmp_path / "o"), ema=True)
    # Without --resolution: the reference's 256 px.
    assert vistok.load_tokenizer(str(convert_vq(str(ckpt), str(tmp_path / "o")))).resolution == 256
