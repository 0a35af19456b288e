"""Export -> load gives the same model; tampered folders are refused with the problem named."""

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY, run
from safetensors.torch import load_file, save_file

from vistok import load_tokenizer
from vistok.common.hub import load_pretrained, save_pretrained
from vistok.generators.export import export
from vistok.tokenizers.binary import BINARY_PRESETS, BinaryTokenizer
from vistok.tokenizers.gaussian import KL_PRESETS, KLTokenizer
from vistok.tokenizers.gpstoken import GPSTOKEN_PRESETS, GPSToken
from vistok.tokenizers.titok import TOKENIZER_1D_PRESETS, Tokenizer1D
from vistok.tokenizers.vq import VQ_PRESETS, VQTokenizer
from vistok.tokenizers.wetok import WETOK_PRESETS, WeTok

SMALL = dict(channels=16, num_res_blocks=1, num_mid_blocks=1, resolution=32)
PRESETS = [
    (cls, name)
    for cls, presets in [
        (VQTokenizer, VQ_PRESETS),
        (WeTok, WETOK_PRESETS),
        (BinaryTokenizer, BINARY_PRESETS),
        (KLTokenizer, KL_PRESETS),
        (Tokenizer1D, TOKENIZER_1D_PRESETS),
        (GPSToken, GPSTOKEN_PRESETS),
    ]
    for name in presets
]
# Families whose size arguments differ from the CNN ones.
SMALL_FOR = {
    Tokenizer1D: dict(channels=16, num_res_blocks=1, resolution=32, patch_size=8),
    GPSToken: dict(SMALL, width=32, depth=1),
}


@pytest.mark.parametrize("cls, preset", PRESETS, ids=[f"{c.__name__}-{p}" for c, p in PRESETS])
def test_export_load_round_trip_is_bit_identical(cls, preset, tmp_path):
    torch.manual_seed(0)
    # Frozen like the loaded copy: requires_grad changes which CPU kernels run (last-bit float
    # differences), and bit-identity is the claim.
    tok = cls(preset=preset, **SMALL_FOR.get(cls, SMALL)).eval().requires_grad_(False)
    save_pretrained(tok, tmp_path, "tokenizer", {"info": tok.describe()})
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.config == tok.config
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = tok.encode(images)
    assert torch.equal(loaded.encode(images), codes)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(loaded.detokenize(codes, generator=g1), tok.detokenize(codes, generator=g2))


@pytest.fixture
def exported(tmp_path) -> Path:
    tok = WeTok(preset="compratio192", **SMALL)
    return save_pretrained(tok, tmp_path / "wetok", "tokenizer", {"info": tok.describe()})


def _edit_weights(folder: Path, edit) -> None:
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("decoder.conv_out.bias"), "missing key decoder.conv_out.bias"),
        (lambda s: s.update(extra=torch.zeros(1)), "unexpected key extra"),
        (
            lambda s: s.update({"decoder.conv_in.weight": torch.zeros(3, 3)}),
            "shape mismatch for decoder.conv_in",
        ),
    ],
)
def test_tampered_weights_are_refused_by_name(exported, edit, message):
    _edit_weights(exported, edit)
    with pytest.raises(ValueError, match=message):
        load_pretrained(exported)


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_wrong_family_in_config_is_refused(exported):
    _edit_config(
        exported,
        lambda c: c["model"].update(
            class_path="vistok.tokenizers.vq.VQTokenizer",
            init_args={"preset": "f16_c4096", **SMALL},
        ),
    )
    with pytest.raises(ValueError, match="does not fit its config.json"):
        load_pretrained(exported)


def test_wrong_kind_newer_format_and_foreign_classes_are_refused(exported):
    with pytest.raises(ValueError, match="holds a 'tokenizer', not a 'generator'"):
        load_pretrained(exported, kind="generator")
    _edit_config(exported, lambda c: c["model"].update(class_path="builtins.eval"))
    with pytest.raises(ValueError, match="may only name classes under"):
        load_pretrained(exported)
    _edit_config(exported, lambda c: c.update(format_version=99, vistok_version="9.0"))
    with pytest.raises(ValueError, match="upgrade vistok"):
        load_pretrained(exported)


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls instead of uploading."""

    def __init__(self):
        self.calls = []

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))

    def upload_folder(self, folder_path, **kw):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*"))
        self.calls.append(("upload_folder", {"files": files, **kw}))


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    run(
        [
            "train.py",
            "--config",
            "tokenizer/vq.yaml",
            "--config",
            "presets/cpu_small.yaml",
            *TINY,
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            f"--run_dir={run_dir}",
        ]
    )
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_export_cli_writes_card_and_push_uploads_exactly_the_folder(trained_ckpt, tmp_path):
    out = tmp_path / "exported"
    run(["export.py", "--ckpt", str(trained_ckpt), "--out", str(out), "--ema"])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors", "reconstructions.png"]
    card = (out / "README.md").read_text()
    assert "VQTokenizer" in card and "val/l1" in card and "ema" in card
    # The exported EMA weights equal what the checkpoint loader gives.
    a, b = load_tokenizer(str(out)), load_tokenizer(str(trained_ckpt), ema=True)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(
        a.decode(a.quantize(images).quantized), b.decode(b.quantize(images).quantized)
    )
    assert "discriminator" not in json.dumps(json.loads((out / "config.json").read_text()))
    assert not any("discriminator" in k for k in load_file(str(out / "model.safetensors")))

    api = RecordingApi()
    export(
        str(trained_ckpt),
        str(tmp_path / "pushed"),
        ema=False,
        push=True,
        repo_id="user/vq-tiny",
        private=True,
        api=api,
    )
    (create, kw1), (upload, kw2) = api.calls
    assert create == "create_repo" and kw1["repo_id"] == "user/vq-tiny" and kw1["private"]
    assert upload == "upload_folder" and kw2["files"] == sorted(
        p.name for p in (tmp_path / "pushed").iterdir()
    )
