"""What commands tell their user: the closing paragraph (figures + paths) and the progress bars of
feature passes, which show only where someone watches."""

from __future__ import annotations

import functools
import io
import re

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from test_parity_llamagen import fixture
from test_pfid import _write_split

from vistok.common import summary
from vistok.common.hub import WEIGHTS, parameter_count
from vistok.common.summary import batch_progress, closing_summary
from vistok.convert.__main__ import main as convert_main
from vistok.evaluation.ref_batch import main as ref_batch_main


def test_closing_summary_lists_figures_and_paths_and_skips_missing_ones():
    text = closing_summary("did it", {"psnr": 21.23456, "usage": None, "n": 3}, {"out": "a/b.png"})
    assert text == "did it; psnr 21.23, n 3. Wrote: out a/b.png."
    assert closing_summary("nothing", {"x": None}, {}) == "nothing."


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_batch_progress_counts_images_on_a_terminal_only(monkeypatch):
    # Redraw at every update (tqdm's default waits 0.1 s between draws).
    monkeypatch.setattr(summary, "tqdm", functools.partial(summary.tqdm, mininterval=0, miniters=1))
    batches = [torch.zeros(4, 3, 2, 2), torch.zeros(3, 3, 2, 2)]
    term = _Terminal()
    assert list(batch_progress(iter(batches), "FID", total=7, file=term)) == batches
    drawn = term.getvalue()
    assert re.search(r"FID:  57%.* 4/7 ", drawn) and re.search(r"FID: 100%.* 7/7 ", drawn)
    # tuples count their first tensor; a pipe or VISTOK_PROGRESS=0 draws nothing.
    pipe = io.StringIO()
    pairs = [(b, ["k"] * len(b)) for b in batches]
    assert list(batch_progress(pairs, "pairs", total=7, file=pipe)) == pairs
    assert pipe.getvalue() == ""
    monkeypatch.setenv("VISTOK_PROGRESS", "0")
    term = _Terminal()
    assert list(batch_progress(batches, "FID", total=7, file=term)) == batches
    assert term.getvalue() == ""


def test_ref_batch_ends_with_its_count_and_path(tmp_path, capsys):
    shards = _write_split(tmp_path / "shards", 6)
    out = tmp_path / "ref" / "batch.npz"
    args = ["--shards", shards, "--out", str(out), "--resolution", "32", "--no-stats"]
    ref_batch_main(args)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"reference batch: 6 images at 32 px, without statistics. Wrote: batch {out}."
    assert np.load(out)["arr_0"].shape == (6, 32, 32, 3)


def test_convert_ends_with_the_folder_its_files_and_parameter_count(tmp_path, capsys):
    ckpt = fixture("llamagen_vq") / "vq_tiny.pt"
    out = tmp_path / "vq"
    convert_main(["llamagen-vq", str(ckpt), "--resolution", "128", "--out", str(out)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    params = sum(t.numel() for t in load_file(out / "model.safetensors").values())
    files = ", ".join(sorted(f.name for f in out.iterdir() if f.is_file()))
    assert last == (
        f"converted the llamagen-vq checkpoint {ckpt}; parameters {params / 1e6:.2f}M, "
        f"files {files}. Wrote: export folder {out}."
    )
    assert "model.safetensors" in files and "config.json" in files


def test_parameter_count_reads_the_safetensors_header(tmp_path):
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(5)}, tmp_path / WEIGHTS)
    assert parameter_count(tmp_path) == 11
