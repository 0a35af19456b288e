"""ReconstructionEval through the real CLI and Lightning, on tiny tokenizers.

A 12-image validation split of real photo crops keeps Inception work small (64-d features). The
VQ run goes ``train.py`` -> results.json (numbers + protocol) -> PNG grid -> checkpoint, then
``--evaluate`` of that checkpoint in 1 and in 2 processes must repeat its numbers. Group (WeTok),
bit (binary) and continuous (KL) code spaces log the metrics that apply to them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, run
from PIL import Image
from pytorch_lightning.trainer.states import TrainerFn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_pfid import _write_split

from vistok.common.checkpoints import read_checkpoint
from vistok.common.cli import VistokCLI, main
from vistok.common.images import label_band
from vistok.evaluation.callbacks import ReconstructionEval

COMMON = {"val/rfid", "val/psnr_full", "val/ssim", "val/lpips"}
PFID = {"val/pfid", "val/pfid@0", "val/pfid@0.5", "val/pfid@1"}
EXPECTED = {
    "vq": COMMON | PFID | {"val/codebook_usage", "val/codebook_perplexity"},
    "wetok": COMMON | PFID | {"val/codebook_usage", "val/codebook_perplexity", "val/bit_entropy"},
    "binary": COMMON | PFID | {"val/bit_entropy"},
    "kl": COMMON,
}
EVAL_KEYS = set().union(*EXPECTED.values())


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Inception on a shared 2-core machine: 1 thread is faster
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    return {"shards": _write_split(tmp / "shards", 12), "stats": str(tmp / "stats"), "tmp": tmp}


def _args(family: str, split, run_dir, grid: int = 0) -> list[str]:
    return [
        "--config",
        f"tokenizer/{family}.yaml",
        "--config",
        "presets/cpu_small.yaml",
        *TINY,
        "--config",
        "eval/reconstruction_small.yaml",
        f"--data.init_args.train_shards={split['shards']}",
        f"--data.init_args.val_shards={split['shards']}",
        "--trainer.enable_progress_bar=false",
        f"--run_dir={run_dir}",
        "--trainer.callbacks.init_args.num_images=1000",  # the whole 12-image split
        "--trainer.callbacks.init_args.fid_feature=64",
        "--trainer.callbacks.init_args.pfid_strengths=[0.0,0.5,1.0]",
        f"--trainer.callbacks.init_args.grid_images={grid}",
        "--trainer.callbacks.init_args.every_n_steps=0",
        f"--trainer.callbacks.init_args.stats_dir={split['stats']}",
    ]


def _entry(run_dir) -> dict:
    entries = json.loads((run_dir / "results.json").read_text())
    assert len(entries) == 1
    return entries[0]


def _evaluated(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k in EVAL_KEYS}


@pytest.mark.slow
def test_vq_through_the_cli_reproducible_and_same_in_two_processes(split, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the subprocesses: 1 thread is faster here
    tmp = split["tmp"]
    fit_dir = tmp / "vq_fit"
    steps = ["--trainer.max_steps=1", "--trainer.val_check_interval=1"]
    run(["train.py", *_args("vq", split, fit_dir, grid=4), *steps])
    fitted = _entry(fit_dir)
    m, proto = fitted["metrics"], fitted["protocol"]["reconstruction_eval"]
    assert EXPECTED["vq"] <= set(m)
    assert all(v == v and v >= 0 for k, v in m.items() if "fid" in k)  # finite, not NaN
    assert m["val/pfid@0"] == pytest.approx(m["val/rfid"], rel=1e-6)
    assert m["val/pfid"] == m["val/pfid@0.5"]
    # The module's own validation saw the same 12 images (one batch): two implementations agree.
    assert m["val/psnr_full"] == pytest.approx(m["val/psnr"], rel=1e-4)
    assert m["val/codebook_usage"] == pytest.approx(m["val/quant_usage"], rel=1e-6)
    assert (proto["images"], proto["image_set"]) == (12, "validation split (whole split)")
    assert proto["weights"] == "ema" and proto["resolution"] == [32, 32]
    assert proto["pfid"]["strengths"] == [0.0, 0.5, 1.0] and proto["pfid"]["seed"] == 0
    assert list((tmp / "stats").glob(proto["reference"]["stats_key"] + ".safetensors"))
    # Grid: originals, reconstructions, one row per strength; 4 tiles of 32 px, 2 px padding.
    # Row titles in a band on the left; the same picture in TensorBoard.
    grid = Image.open(fit_dir / "images" / "perturb_0000001.png")
    titles = ["original", "reconstruction", "s=0", "s=0.5", "s=1"]
    band = label_band(titles, row_height=34, pad=2)
    assert grid.size == (band.width + 4 * 34 + 2, 5 * 34 + 2)
    assert np.array_equal(np.asarray(grid.convert("RGB"))[:, : band.width], np.asarray(band))
    events = EventAccumulator(str(fit_dir), size_guidance={"images": 0})
    events.Reload()
    assert {"perturb", "recon"} <= set(events.Tags()["images"])
    # The metric networks stay on the callback: no Inception or VGG weight in the checkpoint.
    ckpt = fit_dir / "checkpoints" / "last.ckpt"
    keys = read_checkpoint(ckpt)["state_dict"]
    assert not [k for k in keys if "inception" in k or "lpips" in k.lower() or "_fids" in k]

    # Same checkpoint, evaluated again (in this process, through the same CLI code): same numbers.
    eval_dir = tmp / "vq_eval"
    main([*_args("vq", split, eval_dir), f"--ckpt_path={ckpt}", "--evaluate"])
    # The evaluation has its own folder, named after the checkpoint's step, which it carries.
    again = _entry(eval_dir / "eval" / "step0000001")
    assert again["step"] == 1 and again["run"] == "validate"
    assert _evaluated(again["metrics"]) == _evaluated(m)
    assert again["protocol"]["reconstruction_eval"]["reference"]["from_cache"]

    # Two processes, each evaluating half of the split, give the same numbers.
    ddp_dir = tmp / "vq_ddp"
    args = [*_args("vq", split, ddp_dir), f"--ckpt_path={ckpt}", "--evaluate"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, "train.py", *args, "--trainer.devices=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ddp = _entry(ddp_dir / "eval" / "step0000001")
    assert ddp["protocol"]["reconstruction_eval"]["processes"] == 2
    assert ddp["protocol"]["reconstruction_eval"]["images"] == 12
    for key, value in _evaluated(m).items():
        assert ddp["metrics"][key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize("family", ["wetok", "binary", "kl"])
def test_each_code_space_logs_what_applies_to_it(family, split, tmp_path):
    args = [*_args(family, split, tmp_path), "--trainer.callbacks.init_args.pfid_strengths=[1.0]"]
    args += ["--trainer.callbacks.init_args.num_images=6"]  # a prefix: 6 of the 12 images
    cli = VistokCLI(args)
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ReconstructionEval)]
    assert len({id(f.inception) for f in callback._fids.values()}) == 1  # one shared network
    m = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k in EVAL_KEYS}
    expected = EXPECTED[family] - {"val/pfid@0"}
    assert set(m) == expected
    proto = _entry(tmp_path)["protocol"]["reconstruction_eval"]
    assert proto["images"] == 6 and proto["image_set"].endswith(
        "(first images of each rank's stream)"
    )
    assert "first6-1ranks" in proto["reference"]["id"]  # a prefix is cached under its layout
    if family == "kl":
        assert proto["pfid"] is None and "pfid" not in proto["definitions"]
    else:
        assert m["val/pfid@1"] > 0 and m["val/pfid"] == m["val/pfid@0.5"]
        assert 0.0 <= m["val/bit_entropy"] <= 1.0
    if family == "wetok":
        assert 0 < m["val/codebook_usage"] <= 1 and 1 <= m["val/codebook_perplexity"] <= 256


def test_due_every_n_steps_and_always_when_evaluating():
    cb = ReconstructionEval(every_n_steps=100)
    fit = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING))
    due = []
    for step in (50, 100, 150, 220, 250, 310):
        fit.global_step = step
        if cb._due(fit):
            due.append(step)
            cb._last_step = step
    assert due == [100, 220, 310]
    validate = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.VALIDATING), global_step=310)
    assert cb._due(validate)
    restored = ReconstructionEval(every_n_steps=100)
    restored.load_state_dict(cb.state_dict())
    fit.global_step = 350
    assert not restored._due(fit)

    # A validation that does not evaluate drops the previous evaluation's numbers (else
    # results.json would record them again under the new step) and its protocol.
    cb._logged, cb.protocol = {"val/rfid", "val/pfid"}, {"reconstruction_eval": {}}
    fit.sanity_checking = False
    fit.callback_metrics = {"val/rfid": 3.0, "val/pfid": 4.0, "val/l1": 0.1}
    cb.on_validation_epoch_start(fit, None)
    assert fit.callback_metrics == {"val/l1": 0.1} and cb.protocol is None


def test_strengths_are_checked_and_the_headline_is_always_on_the_curve():
    assert ReconstructionEval(pfid_strengths=[1.0, 0.25], pfid_headline=0.5).strengths == [
        0.25,
        0.5,
        1.0,
    ]
    with pytest.raises(ValueError, match="strengths"):
        ReconstructionEval(pfid_strengths=[1.5])
    with pytest.raises(ValueError, match="at least 2"):
        ReconstructionEval(num_images=1)
