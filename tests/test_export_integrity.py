"""Exported folders: the weights' SHA-256 and a copy of config.json inside the safetensors make
every edit visible; files that are not safetensors are named for what they are."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vistok.common.hub import HASH_KEY, META_KEY, load_pretrained, save_pretrained
from vistok.tokenizers.wetok import WeTok

SMALL = dict(channels=16, num_res_blocks=1, num_mid_blocks=1, resolution=32)


@pytest.fixture
def exported(tmp_path) -> Path:
    tok = WeTok(preset="compratio192", **SMALL)
    return save_pretrained(tok, tmp_path / "wetok", "tokenizer", {"info": tok.describe()})


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _write_config(folder: Path, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def test_export_records_the_hash_and_a_copy_of_the_config(exported):
    config = _config(exported)
    assert len(config[HASH_KEY]) == 64
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        copy = json.loads(f.metadata()[META_KEY])
    assert copy == {k: v for k, v in config.items() if k != HASH_KEY}
    load_pretrained(exported)  # untouched: loads


def test_one_flipped_byte_of_tensor_data_is_refused(exported):
    path = exported / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # inside the last tensor: shapes and keys unchanged
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors has SHA-256 .* modified or corrupt"):
        load_pretrained(exported)


def test_a_code_space_argument_edited_in_config_json_is_refused_by_name(exported):
    # WeTok's groups: 4 -> 8 changes no tensor shape, but 256 codes per group become 16.
    config = _config(exported)
    args = config["model"]["init_args"]
    groups = WeTok(preset="compratio192", **SMALL).quantizer.groups
    args["groups"] = groups * 2
    _write_config(exported, config)
    with pytest.raises(ValueError, match=r"edited after export.*model\.init_args\.groups"):
        load_pretrained(exported)


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda c: c["info"].update(resolution=64), "info.resolution"),
        (lambda c: c.pop("kind") and c.update(kind="tokenizer", extra=1), "extra"),
        (lambda c: c.pop(HASH_KEY), HASH_KEY),
    ],
)
def test_other_config_edits_are_refused(exported, edit, field):
    config = _config(exported)
    edit(config)
    _write_config(exported, config)
    with pytest.raises(ValueError, match=field):
        load_pretrained(exported)


def test_files_that_are_not_safetensors_are_named_for_what_they_are(exported):
    path = exported / "model.safetensors"
    state = {"w": torch.zeros(2)}
    torch.save(state, path)
    with pytest.raises(ValueError, match="zip archive .*not safetensors; re-export it"):
        load_pretrained(exported)
    path.write_bytes(pickle.dumps(state, protocol=4))
    with pytest.raises(ValueError, match="is a pickle file, not safetensors"):
        load_pretrained(exported)
    path.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    with pytest.raises(ValueError, match="Git LFS pointer"):
        load_pretrained(exported)
    path.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_pretrained(exported)


def test_a_format_1_folder_loads_with_a_warning(exported):
    # Folders exported before hashing (format 1) carry neither record: they load, unverified.
    from safetensors.torch import load_file, save_file

    path = exported / "model.safetensors"
    save_file(load_file(str(path)), str(path), metadata={"format": "pt"})
    config = _config(exported)
    config.pop(HASH_KEY)
    config["format_version"] = 1
    _write_config(exported, config)
    with pytest.warns(UserWarning, match="cannot be checked"):
        load_pretrained(exported)
