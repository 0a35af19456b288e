"""sample.py with speculative decoding: the flags reach the sampler, results.json reports passes
per image and the acceptance rate, greedy speculative samples equal plain greedy samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_ar_cli import save_generator, save_tokenizer

from vistok.sample import main as sample_main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sample_py_reports_passes_and_acceptance_and_keeps_greedy_outputs(tmp_path):
    save_tokenizer(tmp_path / "tok.ckpt")
    _, gen = save_generator(tmp_path, tmp_path / "tok.ckpt", ema=True)  # random weights
    base = ["--generator", gen, "--num-images", "3", "--batch-size", "2", "--fid", "off"]
    greedy = [*base, "--temperature", "0", "--no-save-png"]
    plain = sample_main([*greedy, "--out", str(tmp_path / "plain")])
    fast = sample_main(
        [*greedy, "--speculative", "jacobi", "--window", "8", "--out", str(tmp_path / "fast")]
    )
    a = np.load(tmp_path / "plain" / "samples.npz")["arr_0"]
    b = np.load(tmp_path / "fast" / "samples.npz")["arr_0"]
    assert np.array_equal(a, b)
    assert plain.get("speculative") is None
    spec = fast["speculative"]
    tokens = 64  # the tiny VQ's 8 x 8 code map
    assert 0 < spec["forward_passes_per_image"] <= tokens
    assert 0 <= spec["acceptance_rate"] <= 1
    assert fast["protocol"]["speculative"]["window"] == 8
    assert json.loads((tmp_path / "fast" / "results.json").read_text())["speculative"] == spec

    relaxed = sample_main(
        [
            *base,
            "--speculative",
            "jacobi",
            "--relaxed",
            "lantern",
            "--lantern-k",
            "5",
            "--lantern-delta",
            "0.05",
            "--out",
            str(tmp_path / "relaxed"),
        ]
    )
    assert relaxed["protocol"]["speculative"]["relaxed"] == "lantern"
    assert relaxed["protocol"]["speculative"]["approximate"] is True
    assert relaxed["speculative"]["forward_passes_per_image"] <= tokens


def test_relaxed_without_speculative_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        sample_main(["--generator", "x.ckpt", "--relaxed", "lantern", "--out", str(tmp_path)])


def test_diffusion_flags_are_refused_for_an_ar_generator(tmp_path):
    save_tokenizer(tmp_path / "tok.ckpt")
    _, gen = save_generator(tmp_path, tmp_path / "tok.ckpt", ema=False)
    base = ["--generator", gen, "--num-images", "1", "--fid", "off", "--out", str(tmp_path)]
    for flags in (["--steps", "10"], ["--sampler", "heun"]):
        with pytest.raises(SystemExit, match="diffusion generators only"):
            sample_main([*base, *flags])
