"""A generator pushed to the Hub is usable from the Hub: every file of the exported folder,
``tokenizer/`` included, is downloaded. The Hub is played by a stand-in for ``snapshot_download``
that serves a local folder laid out as a repo snapshot and applies ``allow_patterns`` with
huggingface_hub's own filter, recording what was asked for."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub.utils import filter_repo_objects
from test_ar_cli import save_generator, save_tokenizer

import vistok
from vistok.common.hub import DOWNLOAD_PATTERNS
from vistok.generators.export import export
from vistok.generators.inference import sample
from vistok.generators.sample_cli import parse_args

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeHub:
    """``snapshot_download`` over local repos: ``repos[repo_id]`` is the uploaded folder."""

    def __init__(self, root: Path):
        self.root, self.repos, self.calls = root, {}, []

    def __call__(self, repo_id: str, allow_patterns=None, **kwargs) -> str:
        self.calls.append({"repo_id": repo_id, "allow_patterns": allow_patterns, **kwargs})
        src = self.repos[repo_id]
        files = [p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()]
        snapshot = self.root / repo_id.replace("/", "--")
        shutil.rmtree(snapshot, ignore_errors=True)
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / name, snapshot / name)
        return str(snapshot)


def test_generator_round_trips_through_the_hub(tmp_path, monkeypatch):
    save_tokenizer(tmp_path / "tok.ckpt")
    _, gen_ckpt = save_generator(tmp_path, tmp_path / "tok.ckpt", ema=True)
    folder = export(gen_ckpt, str(tmp_path / "export"), ema=True)
    hub = FakeHub(tmp_path / "hub_cache")
    hub.repos["user/tiny-gpt"] = folder
    monkeypatch.setattr("vistok.common.hub.snapshot_download", hub)

    gpt, tok = vistok.load_generator("user/tiny-gpt")
    local_gpt, local_tok = vistok.load_generator(str(folder))
    for a, b in zip(gpt.state_dict().values(), local_gpt.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy())
    for a, b in zip(tok.state_dict().values(), local_tok.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy())
    snapshot = Path(hub(repo_id="user/tiny-gpt", allow_patterns=DOWNLOAD_PATTERNS))
    uploaded = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    downloaded = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*"))
    assert "tokenizer/model.safetensors" in downloaded
    assert set(uploaded) <= set(d for d in downloaded)

    # sample.py's options with the repo id: same images as with the local folder.
    common = ["--num-images", "2", "--batch-size", "2", "--fid", "off", "--seed", "1"]
    sample(parse_args(["--generator", "user/tiny-gpt", *common, "--out", str(tmp_path / "hub")]))
    sample(parse_args(["--generator", str(folder), *common, "--out", str(tmp_path / "local")]))
    hub_images = np.load(tmp_path / "hub" / "samples.npz")["arr_0"]
    assert np.array_equal(hub_images, np.load(tmp_path / "local" / "samples.npz")["arr_0"])
    assert all(c["repo_id"] == "user/tiny-gpt" for c in hub.calls)
